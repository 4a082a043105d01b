"""Shared test fixtures. ../shared (real data beside the checkout) is optional: tests that need it skip,
except under CI=true, where a missing ../shared fails them (a CI that skips them tests less than it says)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))  # the scripts live flat at the repo root


@pytest.fixture
def shared():
    if not (SHARED / "README.md").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("../shared is not beside the checkout, and CI=true: tests that need it must run")
        pytest.skip("../shared is not beside the checkout")
    return SHARED
