"""Shared fixtures. Keep fixtures small and deterministic; add new ones here when two test modules need them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def write_yaml(tmp_path: Path) -> Callable[[str, str], Path]:
    """Factory: ``write_yaml(text, name="config.yaml")`` writes a file under tmp_path and returns its path."""

    def write(text: str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def toy_pair():
    """The shipped toy (target, draft) adapters, loaded once per test session."""
    import torch

    from covspec.models.loading import load_adapter

    torch.set_num_threads(1)
    return load_adapter("toy-target"), load_adapter("toy-draft", key="models.draft.path")
