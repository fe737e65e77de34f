"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

# Sample inputs live next to the repository (../shared/fixtures), not inside it.
FIXTURES_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Path of the shared sample inputs; skips the test when they are not present."""
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"sample inputs not found at {FIXTURES_DIR}")
    return FIXTURES_DIR
