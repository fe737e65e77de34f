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


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory) -> Path:
    """A tiny random-weight MultiTalk set in the official layout (seed 0)."""
    from multitalk.checkpoints.tiny import make_tiny_weights

    return make_tiny_weights(tmp_path_factory.mktemp("tiny-official"), "official", seed=0)


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory) -> Path:
    """The same weights (seed 0) in the diffusers layout."""
    from multitalk.checkpoints.tiny import make_tiny_weights

    return make_tiny_weights(tmp_path_factory.mktemp("tiny-diffusers"), "diffusers", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_official):
    from multitalk.pipeline import MultiTalkPipeline

    return MultiTalkPipeline.from_pretrained(str(tiny_official))
