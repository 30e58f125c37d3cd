"""The installed `hetserve` console script: up, generate, status, leader --device, join, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import openai

import pytest

from conftest import Cluster, free_port, hetserve_cmd
from hetserve.model.arch import architecture
from hetserve.model.resolve import ModelError


def hetserve(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(hetserve_cmd() + list(args), capture_output=True, text=True, timeout=timeout)


def test_up_generate_status(cluster_factory, tmp_path):
    cluster = cluster_factory(2)
    gen = hetserve("generate", "--server", cluster.serve, "--wait", "180", "--max-tokens", "8", "Say hi.")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() and "completion tokens]" in gen.stderr
    raw = hetserve("generate", "--server", cluster.serve, "--raw", "--max-tokens", "4", "--seed", "3",
                   "--temperature", "0.8", "The sky is")
    assert raw.returncode == 0 and "4 completion tokens" in raw.stderr, raw.stderr
    status = hetserve("status", "--server", cluster.serve)
    assert status.returncode == 0
    assert "worker-0" in status.stdout and "worker-1" in status.stdout and "serving" in status.stdout
    assert re.search(r"^worker-1: link [0-9.]+ ms, [0-9.]+ Gbit/s", status.stdout, re.M), status.stdout
    info = json.loads(hetserve("status", "--server", cluster.serve, "--json").stdout)
    assert [h["layers"] for h in info["hosts"]] == [[0, 15], [15, 30]]
    # Sizes chosen at runtime, from the stage times measured by the requests above.
    assert "batching (" in status.stdout and info["batching"]["max_in_flight"] >= 2
    assert info["batching"]["decode_round_ms"] > 0 and info["batching"]["prefill_ms_per_token"] > 0
    # A host joining later is used: the leader re-plans over all three.
    # It also sends every CPU product to oneDNN (--cpu-transposed-up-to 0), and says so.
    log = tmp_path / "extra.log"
    extra = subprocess.Popen(hetserve_cmd() + ["join", "--leader", cluster.listen, "--name", "extra", "--threads", "1",
                                               "--model", "smollm2-135m", "--cpu-transposed-up-to", "0",
                                               "--log-level", "info"], stderr=open(log, "w"))
    try:
        def three_stages() -> bool:
            info = json.loads(hetserve("status", "--server", cluster.serve, "--json").stdout)
            slices = sorted(h["layers"] for h in info["hosts"] if h["layers"])
            return info["state"] == "serving" and len(slices) == 3 and slices[0][0] == 0 and slices[-1][1] == 30 \
                and all(a[1] == b[0] for a, b in zip(slices, slices[1:]))

        deadline = time.monotonic() + 120
        while not three_stages() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert three_stages()
        gen = hetserve("generate", "--server", cluster.serve, "--max-tokens", "4", "Say hi.")
        assert gen.returncode == 0 and "4 completion tokens" in gen.stderr, gen.stderr
        assert "CPU float32 products of x up to 0 values run transposed" in log.read_text()
    finally:
        extra.terminate()
        extra.wait(30)


def test_leader_runs_a_stage_and_splits_by_memory(model_dir):
    listen, serve = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    leader = subprocess.Popen(hetserve_cmd() + ["leader", "--listen", listen, "--serve", serve, "--hosts", "2",
                                                "--device", "cpu", "--max-context", "512", "--log-level", "warning"])
    small = subprocess.Popen(hetserve_cmd() + ["join", "--leader", listen, "--name", "small", "--memory", "600MiB",
                                               "--log-level", "warning"])
    try:
        gen = hetserve("generate", "--server", serve, "--wait", "180", "--max-tokens", "4", "Hello")
        assert gen.returncode == 0, gen.stderr
        info = json.loads(hetserve("status", "--server", serve, "--json").stdout)
        hosts = {h["name"]: h for h in info["hosts"]}
        assert set(hosts) == {"leader-stage", "small"}
        big_layers = hosts["leader-stage"]["layers"][1] - hosts["leader-stage"]["layers"][0]
        small_layers = hosts["small"]["layers"][1] - hosts["small"]["layers"][0]
        assert big_layers + small_layers == 30 and small_layers < big_layers
    finally:
        leader.send_signal(signal.SIGTERM)
        assert leader.wait(30) == 0
        assert small.wait(30) == 0  # the leader's Shutdown ends the host cleanly


def child_with(*words: str) -> int:
    """The pid of the process whose command line holds every word."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w.encode() in cmdline for w in words):
            return int(pid)
    raise AssertionError(f"no process with {words}")


def test_the_leaders_own_stage_is_started_again_after_it_fails(model_dir):
    """A host whose device fails for good exits 1 for its service manager to start it again; the
    leader's own stage (--device) had none, and the cluster stayed degraded without it."""
    listen, serve = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    leader = subprocess.Popen(hetserve_cmd() + ["leader", "--listen", listen, "--serve", serve, "--device", "cpu",
                                                "--max-context", "256", "--log-level", "warning"])
    try:
        assert hetserve("generate", "--server", serve, "--wait", "180", "--max-tokens", "2", "Hi").returncode == 0
        first = child_with("join", listen, "leader-stage")
        os.kill(first, signal.SIGKILL)  # meanwhile the cluster is degraded: one host, none left
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                if child_with("join", listen, "leader-stage") != first:
                    break
            except AssertionError:
                continue
        else:
            raise AssertionError("the leader's stage was not started again")
        gen = hetserve("generate", "--server", serve, "--wait", "180", "--max-tokens", "2", "Hi")
        assert gen.returncode == 0, gen.stderr
        info = json.loads(hetserve("status", "--server", serve, "--json").stdout)
        assert info["state"] == "serving" and [h["state"] for h in info["hosts"]] == ["ready"]
    finally:
        leader.send_signal(signal.SIGTERM)
        assert leader.wait(30) == 0


def test_settings_that_cannot_work_exit_2_which_systemd_does_not_restart(model_dir):
    """A prefill chunk whose hidden states could not cross between hosts (ZeroMQ drops a message
    past its limit), a leader or host reachable from other machines without keys: exit 2
    (RestartPreventExitStatus=2), not 1, after which the units restarted them every 5 s for ever."""
    big = hetserve("leader", "--model", str(model_dir), "--listen", f"127.0.0.1:{free_port()}", "--serve",
                   f"127.0.0.1:{free_port()}", "--max-context", "4096", "--prefill-tokens", "200000", timeout=120)
    assert big.returncode == 2 and "pass the 256 MiB message limit between hosts; use at most" in big.stderr, big.stderr
    open_leader = hetserve("leader", "--model", str(model_dir), "--listen", f"0.0.0.0:{free_port()}", "--serve",
                           f"127.0.0.1:{free_port()}", timeout=120)
    assert open_leader.returncode == 2 and "reachable from other machines" in open_leader.stderr, open_leader.stderr
    open_host = hetserve("join", "--leader", "192.0.2.1:5555", "--device", "cpu", timeout=120)
    assert open_host.returncode == 2 and "is on another machine" in open_host.stderr, open_host.stderr


def test_client_errors_are_one_clear_line(tmp_path):
    gen = hetserve("generate", "--server", f"127.0.0.1:{free_port()}", "hi", timeout=30)
    assert gen.returncode == 1 and "cannot reach hetserve" in gen.stderr and "Traceback" not in gen.stderr
    bad = hetserve("leader", "--model", "no-such-model", "--listen", f"127.0.0.1:{free_port()}",
                   "--serve", f"127.0.0.1:{free_port()}", timeout=60)
    assert bad.returncode == 1 and "unknown model 'no-such-model'" in bad.stderr and "Traceback" not in bad.stderr
    missing = hetserve("convert", "/nonexistent.gguf", "/tmp/out", timeout=30)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    under_a_file = hetserve("convert", str(gguf), str(gguf / "out"), timeout=60)  # was a FileExistsError traceback
    assert under_a_file.returncode == 1 and f"cannot write {gguf / 'out'}" in under_a_file.stderr, under_a_file.stderr
    home = subprocess.run(hetserve_cmd() + ["profile", "--model", "smollm2-135m"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "HETSERVE_HOME": str(gguf / "home")})  # a home it cannot make
    assert home.returncode == 1 and "cannot prepare the model smollm2-135m: Not a directory" in home.stderr, home.stderr
    size = hetserve("join", "--leader", "127.0.0.1:1", "--memory", "lots", timeout=30)
    assert size.returncode == 2 and "not a size" in size.stderr
    up_size = hetserve("up", "--memory", "5x", timeout=30)  # was each host's exit 2 after the leader started
    assert up_size.returncode == 2 and "Invalid value for --memory: '5x' is not a size" in up_size.stderr
    for verb in (["generate", "hi"], ["status"]):
        address = hetserve(*verb, "--server", "localhost:99999", timeout=30)
        assert address.returncode == 1 and "'localhost:99999' is not HOST:PORT" in address.stderr, address.stderr
    listen = hetserve("leader", "--device", "cpu", "--listen", "foo:bar", timeout=30)
    assert listen.returncode == 2 and "Invalid value for --listen" in listen.stderr
    model = hetserve("profile", "--model", "no-such-model", timeout=60)
    assert model.returncode == 1 and "unknown model 'no-such-model'" in model.stderr
    profile = hetserve("plan", "--host", "a=8GiB@/nonexistent/profile.json", timeout=60)
    assert profile.returncode == 2 and "cannot read the profile /nonexistent/profile.json" in profile.stderr
    llama = Path(__file__).resolve().parents[1] / "examples" / "profiles" / "h100-llama-3-8b-bf16.json"
    other = hetserve("plan", "--host", f"a=8GiB@{llama}", timeout=120)
    assert other.returncode == 2 and "was measured for another model" in other.stderr, other.stderr
    (tmp_path / "plan.json").write_text('{"model": "smollm2-135m"}')
    (tmp_path / "token").write_bytes(b"\xff\xfe")
    plan = hetserve("leader", "--plan", str(tmp_path / "plan.json"), timeout=60)
    assert plan.returncode == 2 and "is not a plan (hetserve plan --out): KeyError" in plan.stderr, plan.stderr
    token = hetserve("status", "--token-file", str(tmp_path / "token"), timeout=60)
    assert token.returncode == 2 and "cannot read" in token.stderr, token.stderr
    for done in (gen, bad, address, listen, model, profile, other, plan, token):
        assert "Traceback" not in done.stderr, done.stderr


def test_keygen_never_replaces_keys_unasked(tmp_path):
    """Replacing a key pair locks out every peer holding the old public key: only with --force."""
    made = hetserve("keygen", str(tmp_path / "keys"), "--name", "leader", timeout=30)
    assert made.returncode == 0, made.stderr
    public = (tmp_path / "keys" / "leader.key").read_text()
    assert (tmp_path / "keys" / "leader.key_secret").stat().st_mode & 0o077 == 0
    again = hetserve("keygen", str(tmp_path / "keys"), "--name", "leader", timeout=30)
    assert again.returncode == 1 and "exists" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "keys" / "leader.key").read_text() == public
    forced = hetserve("keygen", str(tmp_path / "keys"), "--name", "leader", "--force", timeout=30)
    assert forced.returncode == 0 and (tmp_path / "keys" / "leader.key").read_text() != public
    (tmp_path / "file").write_text("")
    blocked = hetserve("keygen", str(tmp_path / "file"), "--name", "h1", timeout=30)
    assert blocked.returncode != 0 and "Traceback" not in blocked.stderr, blocked.stderr


def test_unsupported_architecture_is_named():
    class Config:
        model_type = "gpt2"

    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        architecture(Config())


def test_up_stops_cleanly_on_sigterm(model_dir):
    cluster = Cluster(1)
    try:
        gen = hetserve("generate", "--server", cluster.serve, "--wait", "180", "--max-tokens", "2", "Hi")
        assert gen.returncode == 0, gen.stderr
    finally:
        assert cluster.stop() == 0  # a failure above must not leave the cluster running for later tests


def test_a_lost_cancellation_does_not_keep_a_daemon_running_after_sigterm():
    """Python 3.11's asyncio.wait_for can drop a cancellation that lands as its awaitable completes;
    a host then ran on after SIGTERM (test_security timed out waiting for it). The daemons' signal
    handling cancels again until the main task ends."""
    import sys

    from hetserve.lifecycle import STOP_AGAIN_S

    script = (
        "import asyncio\n"
        "from hetserve.lifecycle import run_until_signal\n"
        "async def main():\n"
        "    print('ready', flush=True)\n"
        "    try:\n"
        "        await asyncio.sleep(3600)\n"
        "    except asyncio.CancelledError:\n"
        "        pass  # lost, as wait_for can lose one\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(run_until_signal(main()))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(3 * STOP_AGAIN_S) == 0
    finally:
        proc.kill()
        proc.wait()


def test_status_text_says_what_the_table_cannot():
    """Notes (why a host is unused), links, fetched weights and the live plan were in --json only."""
    from hetserve.cli.clients import status_lines

    host = {"name": "h0", "stage": None, "layers": None, "device": "cpu", "device_name": "x86", "usable_gib": 4.0,
            "precision": "float32", "state": "unused", "health": "ok", "last_seen_s": 0.2, "load": 0.0, "steps": 0,
            "prefill_ms": 0.0, "decode_ms": 0.0, "fetched_bytes": 3 << 20, "note": "no disk room: its slice ...",
            "link_ms": 0.12, "link_gbps": 9.5}
    info = {"model": "m", "layers": 30, "dtype": "float32", "state": "serving", "uptime_s": 1.0, "running": 0,
            "queued": 0, "free_slots": 4, "in_flight": 0, "generated_tokens": 0, "tokens_per_s": 0.0, "hosts": [host],
            "plan": {"predicted_tokens_per_s": 12.34, "predicted_ppl": 10.5, "base_ppl": 10.0, "max_ppl_increase": 0.05}}
    text = "\n".join(status_lines(info))
    assert "h0: link 0.12 ms, 9.5 Gbit/s; 3.0 MiB of weights fetched from the leader; no disk room" in text
    assert "plan: predicted 12.3 tokens/s, perplexity 10.500 (base 10.000, at most +5.0%)" in text


def test_convert_gguf_matches_the_cached_default(tmp_path, model_dir):
    from safetensors.torch import load_file

    from hetserve.model.resolve import builtin_gguf

    out = tmp_path / "smollm2"
    done = hetserve("convert", str(builtin_gguf("smollm2-135m")), str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    ours, cached = load_file(out / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert ours.keys() == cached.keys() and all(ours[k].equal(cached[k]) for k in ours)
    again = hetserve("convert", str(builtin_gguf("smollm2-135m")), str(out), timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_a_conversion_killed_mid_way_leaves_no_folder_for_good(tmp_path):
    """convert_gguf writes into a temporary folder beside the target; one left by a killed
    conversion (the model's size in float32) is removed before the next conversion starts."""
    from hetserve.model.resolve import ModelError, ensure_converted

    stale = tmp_path / ".smollm2.a1b2c3"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / ".other.x").mkdir()
    with pytest.raises(ModelError, match="does not exist"):
        ensure_converted(tmp_path / "missing.gguf", tmp_path / "smollm2", progress=False)
    assert not stale.exists() and (tmp_path / ".other.x").is_dir()


def test_no_capacity_is_503(model_dir):
    """A leader still waiting for its hosts answers 503."""
    http, listen, serve = (f"127.0.0.1:{free_port()}" for _ in range(3))
    leader = subprocess.Popen(hetserve_cmd() + ["leader", "--hosts", "2", "--http", http, "--listen", listen,
                                                "--serve", serve, "--log-level", "warning"])
    try:
        api = openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused", max_retries=0, timeout=30)
        for _ in range(300):
            try:
                api.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.2)
        with pytest.raises(openai.InternalServerError) as info:
            api.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=2)
        assert info.value.status_code == 503 and "no capacity" in info.value.body["message"]
    finally:
        leader.terminate()
        assert leader.wait(30) == 0


def test_json_logs_record_the_events_that_matter(model_dir, tmp_path):
    serve, listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    log_file = tmp_path / "up.log"
    with open(log_file, "w") as log:
        up = subprocess.Popen(hetserve_cmd() + ["up", "--workers", "1", "--serve", serve, "--listen", listen,
                                                "--max-context", "256", "--log-json"], stderr=log)
        try:
            gen = hetserve("generate", "--server", serve, "--wait", "180", "--max-tokens", "2", "Hi")
            assert gen.returncode == 0, gen.stderr
        finally:
            up.send_signal(signal.SIGTERM)
            assert up.wait(30) == 0
    entries = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    assert entries and all({"ts", "level", "role", "logger", "msg"} <= set(e) for e in entries)
    messages = " | ".join(e["msg"] for e in entries)
    for event in ("joined from", "plan: stage 0", "ready in", "serving: 1 stage", "stopped by signal"):
        assert event in messages, event


def test_a_live_plan_keeps_the_kv_cache_it_was_planned_for(tmp_path):
    """A plan saved by --plan-out budgeted each host's memory for that leader's --max-seqs x
    (--max-context + 1) KV tokens; re-used with --plan it was given the workload's batch and
    lengths instead, up to several times the KV cache the hosts had room for."""
    import click

    from hetserve.cli.options import apply_plan
    from hetserve.config import Limits
    from hetserve.plan.planner import Plan, PlannedStage, Workload

    def saved(workload: Workload):
        plan = Plan(model="smollm2-135m", dtype="float32", workload=workload, max_ppl_increase=0.05, base_ppl=1.0,
                    predicted_ppl=1.0, prefill_microbatch=2, decode_microbatch=4, predicted_tokens_per_s=1.0,
                    stages=[PlannedStage("worker-0", 0, 30, [], 0.0, 0.0, 0, 0)])
        plan.save(tmp_path / "plan.json")
        return str(tmp_path / "plan.json")

    live = saved(Workload(256, 128, 8, kv_tokens=2 * 257))
    with pytest.raises(click.UsageError, match="514 KV-cache tokens"):
        apply_plan(live, "smollm2-135m", Limits())  # 8 x 2049 by default
    _, _, _, limits = apply_plan(live, "smollm2-135m", Limits(max_seqs=2, max_context=256))
    # the prefill micro-batch within the operator's bound; decode as the scheduler splits the running
    assert (limits.max_seqs, limits.max_context, limits.prefill_seqs, limits.decode_seqs) == (2, 256, 2, 8)
    _, _, _, limits = apply_plan(live, "smollm2-135m", Limits(max_seqs=2, max_context=256, prefill_seqs=1))
    assert limits.prefill_seqs == 1
    _, _, _, limits = apply_plan(saved(Workload(256, 128, 8)), "smollm2-135m", Limits())
    assert (limits.max_seqs, limits.max_context) == (8, 384)  # planned for its workload: exactly that


def test_every_option_has_help():
    import click

    from hetserve.cli import main

    missing = []

    def walk(cmd, path):
        missing.extend(f"{path} {p.opts[0]}" for p in cmd.params
                       if isinstance(p, click.Option) and not p.help and p.name != "help")
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(main, "hetserve")
    assert not missing, missing


def test_settings_precedence_cli_over_env_over_file(tmp_path):
    config = tmp_path / "h.toml"
    config.write_text('log_level = "debug"\n[leader]\nhosts = 2\nmax-seqs = 4\nmax_context = 1024\n')
    env = {**os.environ, "HETSERVE_LEADER_MAX_SEQS": "16", "HETSERVE_LEADER_MAX_CONTEXT": "4096"}
    done = subprocess.run(hetserve_cmd() + ["config", "show", "leader", "--config", str(config), "--max-context", "512"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    assert rows["hosts"] == ["2", "file", str(config)]
    assert rows["log_level"] == ['"debug"', "file", str(config)]
    assert rows["max_seqs"] == ["16", "env", "HETSERVE_LEADER_MAX_SEQS"]
    assert rows["max_context"] == ["512", "command", "line"]
    assert rows["listen"] == ['"0.0.0.0:5555"', "default"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[leader]\nbogus = 1\n")
    refused = hetserve("leader", "--config", str(bad), timeout=60)
    assert refused.returncode == 2 and "no option 'bogus'" in refused.stderr
    bad.write_text('[leader]\ndecode_ahead = "maybe"\n')
    refused = hetserve("leader", "--config", str(bad), timeout=60)
    assert refused.returncode == 2 and "decode_ahead: 'maybe' is not one of 'auto', 'on', 'off'" in refused.stderr
    for text, message in (('log_levl = "debug"\n', "'log_levl' is no command's option"),
                          ("[leadr]\nhosts = 2\n", "[leadr] is not a command"),
                          ('leader = "10.0.0.1:5555"\n', "[leader] must be a table")):  # join's option, leader's table
        bad.write_text(text)
        refused = hetserve("config", "show", "leader", "--config", str(bad), timeout=60)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_settings_go_by_the_flag_in_files_and_the_environment(tmp_path):
    """`--plan` (parameter plan_file) is `plan` in a file and HETSERVE_LEADER_PLAN in the environment,
    as `--help` names it; `--json` of status is HETSERVE_STATUS_JSON."""
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    config = tmp_path / "leader.toml"
    config.write_text(f'[leader]\nplan = "{plan}"\n')
    shown = hetserve("config", "show", "leader", "--config", str(config), timeout=60)
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines()}
    assert rows["plan"] == [json.dumps(str(plan)), "file", str(config)]
    env = {**os.environ, "HETSERVE_LEADER_PLAN": str(plan), "HETSERVE_STATUS_JSON": "1",
           "HETSERVE_PLAN_MAX_PPL_INCREASE": "3%", "HETSERVE_PROFILE_REMEASURE": "1"}
    for verb, key in (("leader", "plan"), ("status", "json"), ("plan", "max_ppl_increase"), ("profile", "remeasure")):
        shown = subprocess.run(hetserve_cmd() + ["config", "show", verb], capture_output=True, text=True, timeout=60,
                               env=env)
        rows = {line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines()}
        assert rows[key][1:] == ["env", f"HETSERVE_{verb.upper()}_{key.upper()}"], shown.stdout


def test_up_spreads_local_hosts_over_the_gpus():
    """`hetserve up --device cuda` on a box of 2 GPUs puts each stage on a GPU of its own; a list
    is taken in turn; one GPU, or a device named, is every host's."""
    from hetserve.cli import local_host_devices

    assert local_host_devices("cuda", 2, gpus=2) == ["cuda:0", "cuda:1"]
    assert local_host_devices("cuda", 3, gpus=2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert local_host_devices("cuda", 2, gpus=1) == ["cuda", "cuda"]
    assert local_host_devices("cuda:1", 2, gpus=2) == ["cuda:1", "cuda:1"]
    assert local_host_devices("cuda:1, cpu", 3, gpus=2) == ["cuda:1", "cpu", "cuda:1"]
    assert local_host_devices("cpu", 2, gpus=0) == ["cpu", "cpu"]


def test_a_quality_target_is_a_percentage_or_a_fraction_below_one():
    """`--max-ppl-increase 2` meant 2 % and planned for 200 %, silently."""
    import click

    from hetserve.cli.options import parse_fraction

    assert parse_fraction("2%") == pytest.approx(0.02) and parse_fraction("0.02") == 0.02
    assert parse_fraction("150%") == 1.5  # written as a percentage, any size is meant
    for text, why in (("2", "would be 200%: write 2% for percent"), ("-1%", "0 or more"), ("nan", "0 or more"),
                      ("two", "not a fraction")):
        with pytest.raises(click.BadParameter, match=why):
            parse_fraction(text)
