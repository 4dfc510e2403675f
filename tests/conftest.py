import sys
from pathlib import Path

import pytest

import qwen3rs

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(Path(__file__).parent))

# Devices the model-level tests run on: the CPU always, CUDA where a GPU is usable (skipped otherwise).
GPU = pytest.mark.skipif(not qwen3rs.cuda_available(), reason=f"no usable CUDA GPU: {qwen3rs.cuda_unavailable_reason()}")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, GPU])]

CASES = ["dense_tied_bf16", "dense_untied_f32_gqa4", "dense_yarn_bf16", "moe_top2_bf16", "moe_mixed_sharded_bf16"]


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES
