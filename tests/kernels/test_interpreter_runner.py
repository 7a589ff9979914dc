"""Runs every ``interp`` case of tests/kernels/ in Triton's CPU interpreter, in one subprocess.

Triton chooses interpreter or compiler when it is imported (``TRITON_INTERPRET``), and this pytest process has
already imported it, so the cases cannot run here; the subprocess sets ``TRITON_INTERPRET=1`` and selects
``-m interp``. Run them directly with ``TRITON_INTERPRET=1 pytest -m interp tests/kernels``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the runner; the cases run here")
def test_interpreter_cases():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "interp", str(HERE)],
                          cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 38, proc.stdout[-3000:]  # every interp case ran (none skipped)
    assert "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]
