"""The systemd units pass `systemd-analyze verify` without a warning; the example TOML files load."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import hetserve_cmd

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_verify_cleanly(tmp_path):
    exe = hetserve_cmd()[0]
    if not exe.endswith("hetserve"):
        pytest.skip("the hetserve console script is not installed")
    units = []
    for name, instance in (("hetserve-leader.service", "hetserve-leader.service"),
                           ("hetserve-worker@.service", "hetserve-worker@0.service")):
        text = (SYSTEMD / name).read_text().replace("/opt/hetserve/bin/hetserve", exe)
        (tmp_path / instance).write_text(text)
        units.append(str(tmp_path / instance))
    done = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_units_are_hardened_and_restart():
    for name in ("hetserve-leader.service", "hetserve-worker@.service"):
        text = (SYSTEMD / name).read_text()
        for setting in ("User=hetserve", "RestartPreventExitStatus=2", "NoNewPrivileges=yes", "ProtectSystem=strict",
                        "PrivateTmp=yes", "EnvironmentFile=-/etc/hetserve/hetserve.env", "--config /etc/hetserve/"):
            assert setting in text, f"{name} lacks {setting}"
    assert "Restart=on-failure" in (SYSTEMD / "hetserve-leader.service").read_text()
    # A leader that stops tells its hosts to exit with status 0: on-failure left every worker
    # stopped after a leader restart, waiting for nobody.
    worker = (SYSTEMD / "hetserve-worker@.service").read_text()
    assert "Restart=always" in worker and "--device cuda:%i" in worker


@pytest.mark.parametrize("command,toml,expect", [
    # keys: a leader listening beyond loopback, or a host joining one elsewhere, refuses to start without
    ("leader", "leader.toml", {"hosts": "2", "http": '"127.0.0.1:8000"', "keys": '"KEYS"'}),
    ("join", "worker.toml", {"leader": '"leader.example.internal:5555"', "keys": '"KEYS"'}),
])
def test_example_config_files_load(command, toml, expect, tmp_path):
    """Each file as shipped, but for its keys directory (which must exist): here a temporary one."""
    text = (SYSTEMD / toml).read_text()
    assert 'keys = "/etc/hetserve/keys"' in text
    (tmp_path / "keys").mkdir()
    config = tmp_path / toml
    config.write_text(text.replace("/etc/hetserve/keys", str(tmp_path / "keys")))
    done = subprocess.run(hetserve_cmd() + ["config", "show", command, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    for key, value in expect.items():
        value = value.replace("KEYS", str(tmp_path / "keys"))
        assert rows[key][0] == value and rows[key][1:] == ["file", str(config)]
