"""Our Triton kernels' logic (weight-only matmuls, slot attention), checked on the CPU by Triton's
interpreter (tests/interpreted_kernels.py says what it covers). The interpreter needs triton and a
numpy older than the project's, which `make test` installs apart, in .venv/interp (triton 3.6's
interpreter fails on numpy 2.3 and later); without them the test is skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INTERP = Path(os.environ.get("HETSERVE_TRITON_INTERP", ROOT / ".venv" / "interp"))


@pytest.mark.skipif(not (INTERP / "triton").is_dir(), reason=f"no triton for the interpreter in {INTERP}")
def test_our_triton_kernels_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(INTERP), str(ROOT)])}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "interpreted_kernels.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "0 failing case(s)" in done.stdout
