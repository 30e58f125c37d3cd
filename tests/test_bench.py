"""`hetserve bench`: statistics on hand-made timings, the workload, and the command against a real cluster."""

from __future__ import annotations

import json
import socketserver
import subprocess
import threading

import pytest

from conftest import free_port, hetserve_cmd
from hetserve.bench.baseline import row_lengths
from hetserve.bench.report import format_table
from hetserve.bench.run import _notes, baseline_work
from hetserve.bench.stats import RequestResult, percentile, ratios, summarize
from hetserve.bench.workload import (SOURCE_TEXT, RequestSpec, WorkloadError, parse_prompts, synthetic_prompts,
                                     token_count)

# index, sent, first token, last token, finished, output tokens, prompt tokens, finish reason, error
RESULTS = [
    RequestResult(0, 0.0, 0.5, 2.5, 2.5, 5, 10, "length"),  # TTFT 0.5, TPOT 2.0 / 4 = 0.5
    RequestResult(1, 1.0, 1.2, 1.7, 2.3, 3, 12, "stop"),  # TTFT 0.2, TPOT 0.5 / 2 = 0.25
    RequestResult(2, 0.0, 0.3, 0.3, 0.4, 1, 8, "length"),  # TTFT 0.3, one token: no TPOT
    RequestResult(3, 2.5, None, None, 2.6, 0, None, None, "overloaded: 4 running and 4 queued"),
]


def hetserve(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(hetserve_cmd() + list(args), capture_output=True, text=True, timeout=timeout)


def test_percentile_interpolates_between_closest_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 25) == 1.75
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="percentile 101 is not in"):
        percentile([1.0], 101)


def test_summarize_counts_completed_requests_over_the_duration():
    s = summarize(RESULTS, duration_s=4.0)
    assert (s.requests, s.completed, s.errors, s.error_codes) == (4, 3, 1, {"overloaded": 1})
    assert s.output_tokens == 9 and s.output_tokens_per_s == 9 / 4 and s.requests_per_s == 3 / 4
    assert s.ttft_ms_p50 == pytest.approx(300.0) and s.ttft_ms_p99 == pytest.approx(496.0)  # of 200, 300, 500 ms
    assert s.tpot_ms_p50 == pytest.approx(375.0) and s.tpot_ms_p99 == pytest.approx(497.5)  # of 250, 500 ms
    assert s.latency_ms_p50 == pytest.approx(1300.0)  # of 400, 1300, 2500 ms
    assert s.mean_prompt_tokens == 10.0 and s.mean_output_tokens == 3.0
    assert s.finish_reasons == {"length": 2, "stop": 1}


def test_summarize_with_nothing_completed():
    s = summarize(RESULTS[3:], duration_s=0.1)
    assert (s.completed, s.output_tokens_per_s, s.ttft_ms_p50, s.tpot_ms_p99) == (0, 0.0, None, None)
    assert s.mean_output_tokens is None


def test_ratios_and_table():
    ours, theirs = summarize(RESULTS, 2.0), summarize(RESULTS, 4.0)
    ratio = ratios(ours, theirs)
    assert ratio["output_tokens_per_s"] == 2.0 and ratio["tpot_ms_p50"] == 1.0
    assert ratios(ours, summarize(RESULTS[3:], 1.0))["output_tokens_per_s"] is None  # nothing to divide by
    table = format_table([("hetserve", ours), ("transformers generate (cpu)", theirs)], ratio, "hetserve / hf")
    lines = table.splitlines()
    assert len(lines) == 4 and "TTFT p50 ms" in lines[0] and "TPOT p99 ms" in lines[0]
    assert lines[1].split()[:4] == ["hetserve", "4", "1", "4.5"]
    assert lines[3].startswith("hetserve / hf") and "2.00x" in lines[3] and "1.00x" in lines[3]
    assert "-" in format_table([("none", summarize(RESULTS[3:], 1.0))]).splitlines()[1].split()


def test_notes_give_each_error_code_its_message_and_say_why_output_ran_short():
    failed = RequestResult(4, 0.0, None, None, 0.1, 0, None, None, "bad_request: 'max_tokens' must be below the context")
    s = summarize(RESULTS + [failed], duration_s=4.0)
    assert s.error_messages == {"overloaded": "4 running and 4 queued",
                                "bad_request": "'max_tokens' must be below the context"}
    notes = _notes("hetserve", s, asked=5.0, short={"stop": 1, "length": 1})
    assert "hetserve: 1 request(s) failed with bad_request: 'max_tokens' must be below the context" in notes
    assert "end-of-sequence" in notes[-1] and "filled the server's context" in notes[-1]
    assert "end-of-sequence" not in _notes("hetserve", s, asked=5.0, short={"length": 2})[-1]


def test_the_baseline_generates_what_hetserve_did():
    """Each completed request up to the tokens hetserve produced (a context cut it short, or sampling
    ended it early); max_tokens where it produced them all."""
    spec = RequestSpec("Hello", 5)
    completed = [(RESULTS[0], spec), (RESULTS[1], spec), (RESULTS[2], RequestSpec("Hi", 1))]
    assert baseline_work(completed) == [(0, RequestSpec("Hello", 5)), (1, RequestSpec("Hello", 3)),
                                        (2, RequestSpec("Hi", 1))]


class _StalledServer(socketserver.ThreadingTCPServer):
    """Answers status as a serving cluster and swallows every request: a leader that froze."""

    daemon_threads = allow_reuse_address = True

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                body = json.loads(line)
                if body.get("cmd") == "status":
                    self.wfile.write((json.dumps({"id": body["id"], "event": "status", "state": "serving",
                                                  "model": "m", "hosts": []}) + "\n").encode())


def test_a_stalled_server_ends_the_run_with_timeouts(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello", "max_tokens": 4}\n')
    with _StalledServer(("127.0.0.1", 0), _StalledServer.Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        address = f"127.0.0.1:{server.server_address[1]}"
        done = hetserve("bench", "--server", address, "--prompts", str(prompts), "-c", "2", "--requests", "4",
                        "--warmup", "0", "--reply-timeout", "1", "--no-progress", timeout=120)
        assert done.returncode == 1, done.stderr
        assert "2 request(s) failed with timeout: no reply from the server in 1 s" in done.stderr, done.stderr
        assert "error: no request completed" in done.stderr and "Traceback" not in done.stderr
        warm = hetserve("bench", "--server", address, "--prompts", str(prompts), "--reply-timeout", "1",
                        "--no-progress", timeout=120)  # the warm-up request is the one left unanswered
        assert warm.returncode == 1 and warm.stderr.startswith("error: no reply from the server in 1 s"), warm.stderr
        server.shutdown()


def test_a_model_without_a_tokenizer_is_one_clear_line(model_dir, tmp_path):
    """Weights without tokenizer files (random_model.py without --tokenizer) for synthetic prompts."""
    for f in model_dir.iterdir():
        if not f.name.startswith("tokenizer"):
            (tmp_path / f.name).symlink_to(f)
    with _StalledServer(("127.0.0.1", 0), _StalledServer.Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        done = hetserve("bench", "--server", f"127.0.0.1:{server.server_address[1]}", "--model", str(tmp_path),
                        "--no-progress", timeout=120)
        server.shutdown()
    assert done.returncode == 1 and done.stderr.startswith(f"error: cannot load a tokenizer from {tmp_path}"), \
        done.stderr


def test_baseline_device_must_exist_here(monkeypatch):
    import torch

    from hetserve.bench.baseline import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda:0")
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        check_device("cuda:7")  # found before the whole hetserve run, not after it


async def test_a_connection_reset_while_sending_is_a_client_error():
    """Not a ConnectionResetError traceback out of bench or `hetserve generate`."""
    import asyncio

    from hetserve.client import ClientError, LineClient

    class ResetWriter:
        def write(self, data):
            pass

        async def drain(self):
            raise ConnectionResetError(104, "Connection reset by peer")

    reader = asyncio.StreamReader()
    client = LineClient(reader, ResetWriter())
    with pytest.raises(ClientError, match="closed the connection"):
        await client.call({"prompt": "Hi"})
    reader.feed_eof()
    await client._reader_task


async def test_connecting_is_bounded_and_a_system_connect_timeout_is_retried_as_any_error(monkeypatch):
    """A server that never accepts ends a connect after reply_timeout; the system's own connect
    timeout (a TimeoutError, an OSError) is "cannot reach", not a TypeError from the bound's message."""
    import asyncio

    from hetserve.client import ClientError, LineClient, ReplyTimeout

    async def stalls(*args, **kwargs):
        await asyncio.sleep(60)

    monkeypatch.setattr(asyncio, "open_connection", stalls)
    with pytest.raises(ReplyTimeout, match="no connection to 127.0.0.1:9 in 0.2 s"):
        await LineClient.connect("127.0.0.1:9", reply_timeout=0.2)

    async def times_out(*args, **kwargs):
        raise TimeoutError(110, "Connection timed out")

    monkeypatch.setattr(asyncio, "open_connection", times_out)
    with pytest.raises(ClientError, match="cannot reach hetserve at 127.0.0.1:9: Connection timed out"):
        await LineClient.connect("127.0.0.1:9")


def test_baseline_counts_each_row_to_its_own_limit_and_first_eos():
    generated = [[5, 2, 9, 9], [5, 6, 7, 8], [2, 0, 0, 0], [6, 6, 6, 6]]
    assert row_lengths(generated, {2}, [4, 3, 4, 1]) == [(2, True), (3, False), (1, True), (1, False)]


def test_prompts_file_parsing_and_errors():
    text = '{"prompt": "a b", "max_tokens": 4}\n\n{"prompt": "c"}\n'
    assert parse_prompts(text, "p.jsonl", 16) == [RequestSpec("a b", 4), RequestSpec("c", 16)]
    bad = {
        '{"prompt": "a"}\n{"prompt": "b",}': "p.jsonl line 2: invalid JSON",
        '["a"]': "line 1: expected an object",
        '{"prompt": "a", "temperature": 1}': "unknown fields temperature",
        '{"prompt": ""}': "'prompt' must be a non-empty string",
        '{"prompt": "a", "max_tokens": 0}': "'max_tokens' must be an integer",
        '{"prompt": "a", "max_tokens": true}': "'max_tokens' must be an integer",
        "\n\n": "holds no prompts",
    }
    for text, message in bad.items():
        with pytest.raises(WorkloadError, match=message):
            parse_prompts(text, "p.jsonl", 16)


def test_synthetic_prompts_have_the_exact_token_count(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source = SOURCE_TEXT.read_text()
    for length in (1, 7, 300):
        prompts = synthetic_prompts(tokenizer, 6, length, source)
        assert len(set(prompts)) == 6
        assert [token_count(tokenizer, p) for p in prompts] == [length] * 6
    # A window longer than the whole text wraps around it.
    assert token_count(tokenizer, synthetic_prompts(tokenizer, 1, 50, "one two three.")[0]) == 50


def test_bench_against_a_cluster_with_the_hf_baseline(cluster_factory, model_dir, tmp_path):
    cluster = cluster_factory(1)
    out = tmp_path / "bench.json"
    done = hetserve("bench", "--server", cluster.serve, "--wait", "180", "-c", "2", "--requests", "4",
                    "--prompt-tokens", "16", "--output-tokens", "6", "--baseline", "hf", "--threads", "1",
                    "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "hetserve / hf" in done.stdout and "Traceback" not in done.stderr
    report = json.loads(out.read_text())
    for summary in (report["hetserve"], report["baseline"]["summary"]):
        assert summary["requests"] == summary["completed"] == 4 and summary["errors"] == 0
        assert summary["output_tokens_per_s"] > 0 and summary["requests_per_s"] > 0
        assert 0 < summary["ttft_ms_p50"] <= summary["ttft_ms_p99"]
        assert 0 < summary["tpot_ms_p50"] <= summary["tpot_ms_p99"]
        assert summary["mean_prompt_tokens"] == 16  # as the server counted: the synthetic prompts fit exactly
    # Greedy on the same model: both sides stop at the same tokens.
    assert report["hetserve"]["output_tokens"] == report["baseline"]["summary"]["output_tokens"]
    assert report["ratio"]["output_tokens_per_s"] > 0
    assert report["server"]["model"] == "smollm2-135m" and report["config"]["concurrency"] == 2
    assert report["baseline"]["dtype"] == "float32"  # the server's, not given
    assert "transformers generate (cpu, float32)" in done.stdout

    # A baseline that fails (weights it cannot read) keeps hetserve's run: table, JSON, the reason.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "model.safetensors").unlink()
    (broken / "model.safetensors").write_bytes(b"\xff" * 1000)
    done = hetserve("bench", "--server", cluster.serve, "-c", "2", "--requests", "2", "--prompt-tokens", "16",
                    "--output-tokens", "4", "--baseline", "hf", "--threads", "1", "--model", str(broken),
                    "--json", str(out), "--no-progress")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "hetserve" in done.stdout and "no baseline: the transformers baseline failed: SafetensorError" in done.stderr
    report = json.loads(out.read_text())
    assert report["hetserve"]["completed"] == 2 and "SafetensorError" in report["baseline"]["error"]


def test_hf_baseline_quantizes_its_layers_as_a_stage_does(model_dir):
    """--baseline-precision int8: the baseline's decoder layers are quanto's int8 linears (weights
    only), the head stays in the compute dtype, and it still generates each request to its limit."""
    from optimum.quanto import QLinear

    from hetserve.bench.baseline import BaselineSpec, HFBaseline

    hf = HFBaseline(BaselineSpec(model_dir, "cpu", "float32", threads=1, precision="int8"), "Hello")
    layer = hf.model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, QLinear) and layer.mlp.down_proj.activation_qtype is None
    assert not isinstance(hf.model.lm_head, QLinear)
    run = hf.run([(0, RequestSpec("The capital of France is", 5)), (1, RequestSpec("One, two,", 3))], 2)
    assert sorted((r.index, r.output_tokens) for r in run.results) == [(0, 5), (1, 3)]


def test_bench_bad_input_is_one_clear_line(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    long = tmp_path / "long.jsonl"  # past the server's 1 MiB line: it could only answer unread
    long.write_text(json.dumps({"prompt": "é " * 400_000}) + "\n")
    cases = {
        ("--server", f"127.0.0.1:{free_port()}"): "error: cannot reach hetserve at 127.0.0.1:",
        ("--prompts", str(prompts)): f"error: {prompts} line 2: 'prompt' must be a non-empty string",
        ("--prompts", str(tmp_path / "missing.jsonl")): "error: cannot read",
        ("--prompts", str(long)): f"error: {long} line 1: the request would be",
    }
    for args, message in cases.items():
        done = hetserve("bench", *args, timeout=120)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_baseline_ignores_the_models_own_generation_settings(model_dir, tmp_path):
    """A model whose generation_config asks for a repetition penalty or n-gram bans made the
    baseline run processors hetserve does not, and produce other text than greedy decoding."""
    from hetserve.bench.baseline import BaselineSpec, HFBaseline

    for f in model_dir.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "generation_config.json").unlink()
    own = json.loads((model_dir / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {**own, "repetition_penalty": 5.0, "no_repeat_ngram_size": 1, "min_new_tokens": 10}))
    prompt = "1, 2, 3, 4, 5,"
    plain, fussy = (HFBaseline(BaselineSpec(d, "cpu", "float32", threads=1), "Hi") for d in (model_dir, tmp_path))
    want, _ = plain._generate([RequestSpec(prompt, 12)], None)
    got, _ = fussy._generate([RequestSpec(prompt, 12)], None)
    assert got == want


def test_the_baseline_warms_up_at_the_batch_it_runs(model_dir, monkeypatch):
    """A warm-up of one row left the first timed batch of -c rows to pay that shape's one-off
    costs: half the baseline's batches in a run of two requests per client."""
    from hetserve.bench.baseline import BaselineSpec, HFBaseline

    sizes = []
    generate = HFBaseline._generate

    def spy(self, batch, clock):
        sizes.append(len(batch))
        return generate(self, batch, clock)

    monkeypatch.setattr(HFBaseline, "_generate", spy)
    HFBaseline(BaselineSpec(model_dir, "cpu", "float32", threads=1), "Hello", 3)
    assert sizes == [3]
