"""Shared fixtures. Keep fixtures small and deterministic; add new ones here when two test modules need them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The suite runs on two pytest-xdist workers (``-n 2 --dist loadgroup`` in pyproject.toml). Tests that share
    a costly session resource stay on one worker: every ``ray`` test (one local Ray for the session) and the
    sampling module (its pool of worker processes)."""
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif item.module is not None and item.module.__name__.rpartition(".")[2] == "test_runtime_sampling":
            item.add_marker(pytest.mark.xdist_group("sampling"))


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


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray (2 CPUs) for the whole test session, token auth off for speed (``test_cluster`` runs the
    ``covspec run`` command in a subprocess with Ray's default token auth on). Shut down at the end of the session."""
    import os
    import tempfile

    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    try:
        yield ray
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
