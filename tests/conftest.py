"""Fixtures shared by the tests: demo data built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import make_demo_data


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """Challenge-format shards and a tokenizer made from the stdlib's docstrings (no downloads)."""
    out = tmp_path_factory.mktemp("demo") / "demo_sp1024"
    make_demo_data.build_demo_data(out, max_train_tokens=400_000, challenge_tokenizer=None)
    return out
