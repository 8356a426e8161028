"""benchmarks/bench_losses.py: bad flags stop before any timing, with one line that says what to pass."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

CASES = [
    (["--processes", "0"], "--processes must be at least 1, got 0"),
    (["--processes", "x"], "argument --processes: invalid int value"),
    (["--device", "tpu"], "not a device torch knows; pass cpu or cuda"),
    pytest.param(["--device", "cuda"], "no usable CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is valid here")),
]


@pytest.mark.parametrize("flags,message", CASES)
def test_bad_flag_is_a_usage_error_without_a_traceback(flags, message):
    result = subprocess.run([sys.executable, "benchmarks/bench_losses.py", *flags], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
