"""The lane-by-lane emulations of the tensor-core kernels (scripts/*_sim.py) run here, without a GPU:
they transcribe a kernel's index math and emulate its instructions from their PTX definitions, and
must reproduce the plain computation (attention, the MoE experts) in f64. A kernel edit that breaks a fragment layout or an address fails here
before it reaches a GPU (the emulation is edited alongside the kernel)."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("script", ["fa_prefill_sim.py", "expert_gemm_sim.py", "fa_wgmma_sim.py"])
def test_kernel_emulation_matches_the_reference(script):
    r = subprocess.run([sys.executable, str(SCRIPTS / script), "--quick"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "all cases match" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
