import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(Path(__file__).parent))

CASES = ["dense_tied_bf16", "dense_untied_f32_gqa4", "dense_yarn_bf16", "moe_top2_bf16", "moe_mixed_sharded_bf16"]


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES
