"""Cluster files, predicted profiles, the quality prior, and offline `hetserve plan --cluster`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import hetserve_cmd
from hetserve.plan.cluster import GiB, ClusterError, load_cluster, parse_cluster
from hetserve.plan.cost import DEVICE_SPECS, CostModel
from hetserve.plan.model_shape import config_shape, load_model_config
from hetserve.plan.offline import cluster_dtype, load_references, offline_hosts
from hetserve.plan.planner import Plan
from hetserve.plan.prior import depth_prior, source_sensitivity

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "examples" / "clusters"


def test_every_example_cluster_parses():
    files = sorted(CLUSTERS.glob("*.toml"))
    assert len(files) >= 5
    for path in files:
        cluster = load_cluster(path)
        assert cluster.hosts and all(h.device in DEVICE_SPECS for h in cluster.hosts)
    cluster = load_cluster(CLUSTERS / "llmpq-4xt4-2xv100.toml")
    assert [h.name for h in cluster.hosts] == ["t4-0", "t4-1", "t4-2", "t4-3", "v100-0", "v100-1"]
    assert cluster.hosts[0].memory_bytes == 16 * GiB and cluster.hosts[-1].memory_bytes == 32 * GiB
    assert cluster.workload == {"prompt": 512, "output": 100, "batch": 32}


def test_host_defaults_and_overrides():
    cluster = parse_cluster('link_gbps = 25\n[[host]]\nname = "a"\ndevice = "A10"\nmemory_gib = 20\n'
                            '[[host]]\nname = "b"\ndevice = "L4"\nlink_gbps = 5\nlink_ms = 1\n')
    a, b = cluster.hosts
    assert (a.memory_bytes, a.link_gbps, a.link_ms) == (20 * GiB, 25.0, 0.2)
    assert (b.memory_bytes, b.link_gbps, b.link_ms) == (24 * GiB, 5.0, 1.0)
    assert cluster.workload == {}


@pytest.mark.parametrize("text, message", [
    ('[[host]]\nname = "a"\ndevice = "RTX9090"\n', "unknown device 'RTX9090'; known kinds: T4, P100, V100-32G"),
    ('[[host]]\nname = "a"\n', "unknown device None"),
    ('[[host]]\ndevice = "T4"\n', "host #1: needs a name"),
    ('[[host]]\nname = "a"\ndevice = "T4"\ncount = 0\n', "count must be a whole number >= 1"),
    ('[[host]]\nname = "a"\ndevice = "T4"\nmemory_gib = "16GB"\n', "memory_gib must be a number > 0"),
    ('[[host]]\nname = "a"\ndevice = "T4"\nlink_gbps = 0\n', "link_gbps must be a number > 0"),
    ('[[host]]\nname = "a"\ndevice = "T4"\nmemroy_gib = 8\n', "unknown key(s) memroy_gib; known: count, device"),
    ('[[host]]\nname = "a"\ndevice = "T4"\ncount = 2\n[[host]]\nname = "a-1"\ndevice = "T4"\n',
     "two hosts are named 'a-1'"),
    ('description = "x"\n', "no hosts"),
    ('hosts = 3\n[[host]]\nname = "a"\ndevice = "T4"\n', "unknown key(s) hosts"),
    ('[workload]\nbatch = -1\n[[host]]\nname = "a"\ndevice = "T4"\n', "batch must be a whole number >= 1"),
    ('[workload]\nprompts = 5\n[[host]]\nname = "a"\ndevice = "T4"\n', "[workload]: unknown key(s) prompts"),
    ("[[host]\n", "is not valid TOML"),
    # TOML's nan passed every comparison, inf overflowed int(); a list is no device name
    ('[[host]]\nname = "a"\ndevice = "T4"\nlink_gbps = nan\n', "link_gbps must be a number > 0, not nan"),
    ('[[host]]\nname = "a"\ndevice = "T4"\nmemory_gib = inf\n', "memory_gib must be a number > 0, not inf"),
    ('[[host]]\nname = "a"\ndevice = ["T4"]\n', "unknown device ['T4']"),
])
def test_invalid_cluster_files_are_refused_with_the_reason(text, message):
    with pytest.raises(ClusterError) as info:
        parse_cluster(text, "c.toml")
    assert message in str(info.value) and str(info.value).startswith("c.toml")


def test_cluster_dtype_and_device_precisions():
    assert cluster_dtype(["T4", "A100-40G"]) == "float16"  # no bf16 before Ampere
    assert cluster_dtype(["H100", "A10", "CPU"]) == "bfloat16"
    shape = config_shape(*load_model_config("opt-30b"))
    hosts = offline_hosts(parse_cluster('[[host]]\nname = "t"\ndevice = "T4"\n[[host]]\nname = "h"\ndevice = "H100"\n'),
                          shape, load_references())
    t4, h100 = (h.profile for h in hosts)
    assert set(t4.layer_bytes) == {"native", "int8", "int4"} and "fp8" in h100.layer_bytes
    assert t4.device == "predicted:T4" and t4.dtype == "float16" and t4.layer_bytes["native"] == shape.layer_params * 2
    assert t4.embed_bytes == shape.embed_params * 2 and t4.head_bytes == shape.head_params * 2
    # The same layer is slower on the slower chip, in both phases and the head.
    for phase, batch, tokens in (("prefill", 4, 512), ("decode", 16, 600)):
        assert CostModel(t4).layer_ms("native", phase, batch, tokens) > CostModel(h100).layer_ms("native", phase, batch, tokens)
    assert t4.head_ms["decode"][0] > h100.head_ms["decode"][0]


def test_prior_keeps_the_whole_model_increase_and_the_depth_profile():
    source = source_sensitivity()
    prior = depth_prior(source, 80, ["native", "int8", "fp8", "int4"])
    for p in ("int8", "int4"):
        assert sum(prior.delta[p]) == pytest.approx(sum(max(0.0, d) for d in source.delta[p]))
        assert len(prior.delta[p]) == 80 and min(prior.delta[p]) >= 0
    assert prior.delta["fp8"] == prior.delta["int8"]
    assert prior.base_loss == 0.0 and prior.predicted_ppl(["native"] * 80) == 1.0
    # SmolLM2's int4 sensitivity peaks in its first half; the mapped prior keeps that.
    assert sum(prior.delta["int4"][:40]) > sum(prior.delta["int4"][40:])


def run_plan(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(hetserve_cmd() + ["plan", *args], capture_output=True, text=True, timeout=timeout)


def small_config(tmp_path: Path, layers: int = 6) -> Path:
    """A Llama-3-8B-wide model with few layers: a plan that solves in seconds."""
    config = {**load_model_config("llama-3-8b")[1], "num_hidden_layers": layers, "_name_or_path": "tiny-llama"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_offline_plan_end_to_end(tmp_path):
    cluster = tmp_path / "small.toml"
    # 3 GiB each (2.7 usable): the embedding and head (~1 GiB each) and 6 layers even at int8
    # (1.2 GiB) do not fit one host, so both are used and memory binds.
    cluster.write_text('[workload]\nprompt = 128\noutput = 32\nbatch = 4\n'
                       '[[host]]\nname = "a10"\ndevice = "A10"\nmemory_gib = 3\n'
                       '[[host]]\nname = "t4"\ndevice = "T4"\nmemory_gib = 3\n')
    out = tmp_path / "plan.json"
    done = run_plan("--cluster", str(cluster), "--model-config", str(small_config(tmp_path)), "--max-ppl-increase",
                    "5%", "--batch", "2", "--precisions", "native,int8", "--out", str(out))
    assert done.returncode == 0, done.stderr
    plan = Plan.load(out)
    assert plan.model == "tiny-llama" and plan.dtype == "float16" and plan.workload.batch == 2  # command line wins
    assert plan.workload.prompt_tokens == 128  # the file's, where the command line is silent
    assert sorted(s.host for s in plan.stages) == ["a10", "t4"] and sum(s.end - s.start for s in plan.stages) == 6
    assert {p for s in plan.stages for p in s.precisions} <= {"native", "int8"}
    assert all(s.memory_bytes <= s.capacity_bytes for s in plan.stages)
    assert 1.0 <= plan.predicted_ppl <= 1.05 and plan.baselines
    assert "from a prior, not measured" in done.stdout and "predicted, not measured" in done.stdout
    assert any("prior, not measured" in n for n in plan.notes) and any("predicted" in n for n in plan.notes)
    assert "plan speed-up" in done.stdout
    assert json.loads(out.read_text())["notes"] == plan.notes


def test_layer_groups_keep_whole_groups_and_count_every_layer(tmp_path):
    cluster = tmp_path / "small.toml"
    cluster.write_text('[[host]]\nname = "a"\ndevice = "A10"\nmemory_gib = 4\n'
                       '[[host]]\nname = "b"\ndevice = "A10"\nmemory_gib = 4\n')
    out = tmp_path / "plan.json"
    done = run_plan("--cluster", str(cluster), "--model-config", str(small_config(tmp_path)), "--layer-group", "2",
                    "--max-orders", "2", "--batch", "2", "--prompt", "64", "--output", "16", "--out", str(out))
    assert done.returncode == 0, done.stderr
    plan = Plan.load(out)
    assert all(s.start % 2 == 0 and s.end % 2 == 0 for s in plan.stages)
    precisions = [p for s in plan.stages for p in s.precisions]
    assert len(precisions) == 6 and all(precisions[i] == precisions[i + 1] for i in range(0, 6, 2))
    assert any("groups of 2" in n for n in plan.notes) and any("--max-orders" in n for n in plan.notes)
    done = run_plan("--cluster", str(cluster), "--model-config", str(small_config(tmp_path)), "--layer-group", "4")
    assert done.returncode == 1 and "does not divide the 6 layers: use one of 1, 2, 3, 6" in done.stderr


def test_infeasible_model_is_refused_with_the_reason_and_nearest_option(tmp_path):
    cluster = tmp_path / "tiny.toml"
    cluster.write_text('[[host]]\nname = "t4"\ndevice = "T4"\ncount = 2\n')
    done = run_plan("--cluster", str(cluster), "--model-config", "bloom-176b", "--batch", "1")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "does not fit these hosts at any precision" in done.stderr and "add at least" in done.stderr
    done = run_plan("--cluster", str(cluster), "--model-config", "llama-3-8b", "--batch", "64", "--prompt", "2048",
                    "--output", "2048")
    assert done.returncode == 1 and "nearest option: --batch" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--model-config", "opt-66b", "--host", "a=1GiB"], "give the hosts with --cluster"),
    (["--cluster", "examples/clusters/llmpq-3xt4-1xv100.toml", "--host", "a=1GiB"], "one of the two"),
    (["--cluster", "examples/clusters/llmpq-3xt4-1xv100.toml", "--model-config", "opt-67b"], "no model config 'opt-67b'"),
    (["--cluster", "missing.toml", "--model-config", "opt-30b"], "cannot read missing.toml"),
    (["--cluster", "examples/clusters/llmpq-3xt4-1xv100.toml", "--model-config", "opt-30b", "--precisions", "int8"],
     "give native and any of"),
])
def test_bad_offline_requests_are_one_clear_line(args, message):
    done = subprocess.run(hetserve_cmd() + ["plan", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
