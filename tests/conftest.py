"""Shared test fixtures. ../shared (real data beside the checkout) is optional: tests that need it skip."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))  # the scripts live flat at the repo root


@pytest.fixture
def shared():
    if not (SHARED / "README.md").is_file():
        pytest.skip("../shared is not beside the checkout")
    return SHARED
