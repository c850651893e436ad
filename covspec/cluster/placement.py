"""Pinning an actor's process to CPU cores: ``cluster.edge_cores`` and ``cluster.device_cores``.

Ray's fractional CPUs are bookkeeping: they isolate nothing. To emulate devices that bring their own compute on one
machine, the edge replicas and the device actors can be pinned to disjoint cores (``os.sched_setaffinity``, Linux).
Every thread of the process is pinned, and threads it starts later inherit the mask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from covspec.errors import ConfigError


def available_cores() -> list[int]:
    """The cores this process may run on now (all of this machine's where the platform cannot tell)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def check_cores(cores: Sequence[int], key: str) -> None:
    """Raises ConfigError, naming ``key``, if ``cores`` are not all cores of this machine (or pinning needs Linux)."""
    if not cores:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError(f"{key} needs Linux (os.sched_setaffinity), got {list(cores)}")
    count = os.cpu_count() or 1
    missing = [c for c in cores if c >= count]
    if missing:
        raise ConfigError(f"{key}: core {missing[0]} is not on this machine (cores 0-{count - 1})")


def pin_process(cores: Sequence[int], key: str) -> list[int]:
    """Pin every thread of this process to ``cores`` (nothing when empty); returns the cores it may run on now."""
    check_cores(cores, key)
    if cores:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), set(cores))
            except ProcessLookupError:  # the thread ended meanwhile
                continue
            except OSError as exc:  # e.g. outside the cores this process's cgroup allows
                raise ConfigError(f"{key}: cannot pin to cores {list(cores)}: {exc.strerror}") from None
    return available_cores()
