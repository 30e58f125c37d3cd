"""Serving through faults (real processes on 127.0.0.1): a stage host killed mid-generation, a host
coming back, the leader restarting, and losing the capacity to hold the model."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time

import pytest

from conftest import PROMPTS, free_port, hetserve_cmd, wait_for
from hetserve.client import LineClient

MAX_NEW = 40


async def generate(client: LineClient, prompt: str, max_tokens: int = MAX_NEW) -> list[int]:
    events = await client.call({"prompt": prompt, "max_tokens": max_tokens})
    assert events[-1]["event"] == "done", events[-1]
    return [e["token_id"] for e in events if e["event"] == "token"]


async def wait_status(client: LineClient, predicate, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = await client.status()
        if predicate(status) or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


def started_hosts(d, names, home, log):
    return {name: d.join(name, home, "--model", str(d.model_dir), log=log) for name in names}


async def test_killed_stage_host_requests_finish_identically(daemons, model_dir, reference, tmp_path):
    leader_log = tmp_path / "leader.log"
    d = daemons(model_dir, 3, leader_log=leader_log)
    hosts = started_hosts(d, ["h0", "h1", "h2"], tmp_path / "home", tmp_path / "hosts.log")
    client = await d.client()
    try:
        prompts = PROMPTS[:4]
        runs = [asyncio.create_task(generate(client, p)) for p in prompts]
        status = await wait_status(client, lambda s: s["generated_tokens"] >= 12)
        assert status["generated_tokens"] < 4 * MAX_NEW, "the kill must come mid-generation"
        hosts["h1"].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*runs), 180)
        done = time.monotonic() - killed
        for prompt, ids in zip(prompts, results):
            assert ids == reference(reference.tokenizer(prompt)["input_ids"], MAX_NEW), prompt
        status = await client.status()
        states = {h["name"]: h["state"] for h in status["hosts"]}
        assert states == {"h0": "ready", "h1": "dead", "h2": "ready"}
        assert sorted(h["layers"] for h in status["hosts"] if h["state"] == "ready") == [[0, 15], [15, 30]]
        recovered = re.search(r"serving again on 2 stage\(s\) ([0-9.]+) s after the fault", leader_log.read_text())
        assert recovered, "the leader logs its recovery"
        print(f"\nrecovery: {float(recovered.group(1)):.1f} s from detection to serving; "
              f"{done:.1f} s from the kill to every request done")

        # The host comes back: the leader re-plans over three again while requests run.
        hosts["h1"] = d.join("h1", tmp_path / "home", "--model", str(d.model_dir))
        runs = [asyncio.create_task(generate(client, p)) for p in prompts]
        status = await wait_status(client, lambda s: s["state"] == "serving" and sum(
            1 for h in s["hosts"] if h["state"] == "ready") == 3, 120)
        assert [h["state"] for h in status["hosts"]] == ["ready"] * 3
        for prompt, ids in zip(prompts, await asyncio.wait_for(asyncio.gather(*runs), 180)):
            assert ids == reference(reference.tokenizer(prompt)["input_ids"], MAX_NEW), prompt
    finally:
        await client.close()


async def test_leader_restart_adopts_the_hosts_without_reloading(daemons, model_dir, reference, tmp_path):
    host_log = tmp_path / "hosts.log"
    d = daemons(model_dir, 2)
    started_hosts(d, ["h0", "h1"], tmp_path / "home", host_log)
    client = await d.client()
    prompt = PROMPTS[0]
    want = reference(reference.tokenizer(prompt)["input_ids"], 8)
    assert await generate(client, prompt, 8) == want
    before = {h["name"]: h["layers"] for h in (await client.status())["hosts"]}
    await client.close()

    d.leader.send_signal(signal.SIGKILL)
    d.leader.wait()
    d.start_leader()
    client = await d.client()
    try:
        status = await client.status()
        assert {h["name"]: h["layers"] for h in status["hosts"]} == before
        assert await generate(client, prompt, 8) == want
        assert host_log.read_text().count("keeping the loaded slice") == 2, "neither host reloaded"
    finally:
        await client.close()


async def test_without_capacity_requests_fail_clearly_until_a_host_returns(daemons, model_dir, reference, tmp_path):
    d = daemons(model_dir, 1)
    host = d.join("h0", tmp_path / "home", "--model", str(model_dir))
    client = await d.client()
    try:
        run = asyncio.create_task(client.call({"prompt": PROMPTS[2], "max_tokens": 200}))
        await wait_status(client, lambda s: s["generated_tokens"] >= 4)
        host.send_signal(signal.SIGKILL)
        events = await asyncio.wait_for(run, 60)
        assert events[-1]["event"] == "error" and "cannot hold the model" in events[-1]["error"]["message"]
        refused = await client.call({"prompt": "Hello", "max_tokens": 4})
        assert refused[-1]["error"]["code"] == "unavailable"

        d.join("h0", tmp_path / "home", "--model", str(model_dir))
        assert (await wait_status(client, lambda s: s["state"] == "serving", 120))["state"] == "serving"
        prompt = PROMPTS[0]
        assert await generate(client, prompt, 8) == reference(reference.tokenizer(prompt)["input_ids"], 8)
    finally:
        await client.close()


async def test_a_host_the_layout_leaves_out_drops_its_slice(daemons, model_dir, reference, tmp_path):
    """--plan over h0 and h1 with h2 spare: h2 takes h1's place while h1 is gone, and when h1 is
    back and the plan applies again, h2 is told to drop the slice it no longer serves."""
    from hetserve.plan.planner import Plan, PlannedStage, Workload

    stages = [PlannedStage("h0", 0, 15, [], 0.0, 0.0, 0, 0), PlannedStage("h1", 15, 30, [], 0.0, 0.0, 0, 0)]
    Plan(str(model_dir), "float32", Workload(), 1.0, 0.0, 0.0, stages, 1, 1, 0.0).save(tmp_path / "plan.json")
    d = daemons(model_dir, 2, "--plan", str(tmp_path / "plan.json"))
    spare_log = tmp_path / "h2.log"
    hosts = started_hosts(d, ["h0", "h1"], tmp_path / "home", tmp_path / "hosts.log")
    client = await d.client()
    try:
        def states(status):
            return {h["name"]: h["state"] for h in status["hosts"]}

        started_hosts(d, ["h2"], tmp_path / "home", spare_log)
        status = await wait_status(client, lambda s: len(s["hosts"]) == 3 and s["state"] == "serving", 60)
        assert states(status) == {"h0": "ready", "h1": "ready", "h2": "unused"}
        hosts["h1"].send_signal(signal.SIGKILL)
        status = await wait_status(client, lambda s: s["state"] == "serving" and states(s)["h2"] == "ready", 120)
        assert states(status) == {"h0": "ready", "h1": "dead", "h2": "ready"}
        assert "released" not in spare_log.read_text()

        d.join("h1", tmp_path / "home", "--model", str(model_dir))
        status = await wait_status(client, lambda s: s["state"] == "serving" and states(s)["h1"] == "ready", 120)
        assert states(status) == {"h0": "ready", "h1": "ready", "h2": "unused"}
        assert wait_for(lambda: "released layers" in spare_log.read_text(), 30), spare_log.read_text()[-2000:]
        spare = next(h for h in status["hosts"] if h["name"] == "h2")
        assert spare["kv_bytes"] == spare["weight_bytes"] == 0, spare  # status and metrics: it holds none now
        prompt = PROMPTS[1]
        assert await generate(client, prompt, 8) == reference(reference.tokenizer(prompt)["input_ids"], 8)
    finally:
        await client.close()


NS, LEADER_IP, HOST_IP = "hsfault", "10.78.0.1", "10.78.0.2"


def sh(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True)


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair (root and iproute2 needed)."""
    sh(f"ip link del hsf0; ip netns del {NS}")
    made = sh(f"ip netns add {NS} && ip link add hsf0 type veth peer name hsf1 && ip link set hsf1 netns {NS} && "
              f"ip addr add {LEADER_IP}/30 dev hsf0 && ip link set hsf0 up && "
              f"ip netns exec {NS} ip addr add {HOST_IP}/30 dev hsf1 && ip netns exec {NS} ip link set hsf1 up && "
              f"ip netns exec {NS} ip link set lo up")
    if made.returncode != 0:
        sh(f"ip link del hsf0; ip netns del {NS}")
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    yield NS
    sh(f"ip link del hsf0; ip netns del {NS}")


async def test_host_cut_off_by_its_link_is_replaced_then_rejoins(netns, model_dir, reference, tmp_path):
    listen, serve = f"{LEADER_IP}:{free_port()}", f"127.0.0.1:{free_port()}"
    common = ["--insecure", "--log-level", "info"]
    leader_log = tmp_path / "leader.log"
    procs = [subprocess.Popen(hetserve_cmd() + ["leader", "--listen", listen, "--serve", serve, "--model",
                                                str(model_dir), "--hosts", "2", "--max-context", "256", *common],
                              stderr=open(leader_log, "w"), start_new_session=True)]
    for name, prefix in (("h0", []), ("h1", ["ip", "netns", "exec", NS])):
        procs.append(subprocess.Popen(prefix + hetserve_cmd() + ["join", "--leader", listen, "--name", name,
                                                                 "--model", str(model_dir), "--threads", "1", *common],
                                      start_new_session=True))
    client = await LineClient.connect(serve, wait=120)
    try:
        await client.wait_serving(300)
        prompt = PROMPTS[1]
        want = reference(reference.tokenizer(prompt)["input_ids"], MAX_NEW)
        run = asyncio.create_task(generate(client, prompt))
        await wait_status(client, lambda s: s["generated_tokens"] >= 4)
        sh("ip link set hsf0 down")
        status = await wait_status(client, lambda s: any(h["state"] == "dead" for h in s["hosts"]), 30)
        assert status["hosts"][1]["state"] == "dead", "the cut-off host is detected"
        await asyncio.sleep(3)
        sh("ip link set hsf0 up")
        assert await asyncio.wait_for(run, 180) == want, "the request finished on the remaining host"
        status = await wait_status(client, lambda s: s["state"] == "serving" and all(
            h["state"] == "ready" for h in s["hosts"]), 120)
        assert [h["state"] for h in status["hosts"]] == ["ready", "ready"], "the host is back in the pipeline"
        assert await generate(client, prompt) == want
        assert "is back" in leader_log.read_text() or "h1 rejoined" in leader_log.read_text()
    finally:
        await client.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
