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
