"""Shared fixtures: the converted embedded model, a transformers reference, real local clusters."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hetserve.client import LineClient
from hetserve.model.resolve import resolve_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "List three colors:",
    "Water boils at",
    "The quick brown fox",
    "In 1492, Columbus",
    "import numpy as np\nx =",
]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model("smollm2-135m", progress=False).path


@pytest.fixture(scope="session")
def reference(model_dir):
    """transformers in one process: greedy token ids for a prompt, the ground truth."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cache: dict[tuple, list[int]] = {}

    def greedy(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in cache:
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                     max_new_tokens=max_new_tokens, do_sample=False)
            cache[key] = out[0, len(prompt_ids):].tolist()
        return cache[key]

    greedy.tokenizer = tokenizer
    greedy.model = model
    return greedy


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A free port below the kernel's ephemeral range. Hosts and stages bind port 0 (their data
    and weights sockets) while a test's leader is still starting; a port picked by binding 0
    could be handed to one of them before the leader binds it (seen: the leader exited with
    "address already in use" and the test hung on the host's socket)."""
    low = _ephemeral_low()
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def hetserve_cmd() -> list[str]:
    exe = shutil.which("hetserve", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "hetserve"]


class Cluster:
    """`hetserve up` as a real process tree on 127.0.0.1."""

    def __init__(self, workers: int, *extra: str):
        self.serve = f"127.0.0.1:{free_port()}"
        self.listen = f"127.0.0.1:{free_port()}"
        threads = str(max(1, (os.cpu_count() or 2) // workers))
        self.cmd = hetserve_cmd() + ["up", "--workers", str(workers), "--serve", self.serve, "--listen", self.listen,
                                     "--threads", threads, "--max-context", "512", "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(self.cmd, start_new_session=True)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("hetserve up did not stop within 30 s of SIGTERM")


@pytest.fixture
def cluster_factory(model_dir):
    clusters: list[Cluster] = []

    def start(workers: int, *extra: str) -> Cluster:
        cluster = Cluster(workers, *extra)
        clusters.append(cluster)
        return cluster

    yield start
    for cluster in clusters:
        with contextlib.suppress(ProcessLookupError):
            assert cluster.stop() == 0, "hetserve up did not exit cleanly"


@pytest.fixture(scope="module")
def shared_cluster(model_dir, request):
    """One 2-stage cluster for the protocol tests of a module (small limits on purpose)."""
    cluster = Cluster(2, "--max-seqs", "4", "--max-queued", "4")
    yield cluster
    assert cluster.stop() == 0


async def connect(cluster: Cluster, timeout: float = 180.0):
    client = await LineClient.connect(cluster.serve, wait=timeout)
    await client.wait_serving(timeout)
    return client


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class Daemons:
    """A leader and hosts as separate processes; each host has its own HETSERVE_HOME."""

    def __init__(self, model_dir: Path, hosts: int, *leader_args: str, leader_log: Path | None = None):
        self.listen, self.serve = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        self.model_dir, self.hosts = model_dir, hosts
        self.leader_args = leader_args
        self.procs: list[subprocess.Popen] = []
        self.start_leader(leader_log)

    def start_leader(self, log: Path | None = None) -> subprocess.Popen:
        """(Again, after a crash: the same addresses.)"""
        self.leader = self._spawn(["leader", "--listen", self.listen, "--serve", self.serve, "--model",
                                   str(self.model_dir), "--hosts", str(self.hosts), "--max-context", "256",
                                   *self.leader_args], stderr=open(log, "a") if log else None)
        return self.leader

    def _spawn(self, args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(hetserve_cmd() + args + ["--log-level", "info"], env={**os.environ, **(env or {})},
                                start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def join(self, name: str, home: Path, *args: str, log: Path | None = None) -> subprocess.Popen:
        out = open(log, "a") if log else None
        return self._spawn(["join", "--leader", self.listen, "--name", name, "--threads", "1", *args],
                           {"HETSERVE_HOME": str(home)}, stderr=out)

    async def client(self) -> LineClient:
        client = await LineClient.connect(self.serve, wait=120)
        await client.wait_serving(180)
        return client

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def daemons():
    started: list[Daemons] = []

    def start(*args, **kw) -> Daemons:
        started.append(Daemons(*args, **kw))
        return started[-1]

    yield start
    for d in started:
        d.stop()
