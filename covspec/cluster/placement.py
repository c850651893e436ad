"""Placing actors: pinning an actor's process to CPU cores (``cluster.edge_cores`` and ``cluster.device_cores``), and
checking that actors and trials whose models are on a GPU reserve one (``check_gpus``).

Ray's fractional CPUs are bookkeeping: they isolate nothing. To emulate devices that bring their own compute on one
machine, the edge replicas and the device actors can be pinned to disjoint cores (``os.sched_setaffinity``, Linux).
Every thread of the process is pinned, and threads it starts later inherit the mask.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from covspec.config import Config, ray_host_port
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


def check_gpus(cfg: Config, command: str) -> None:
    """Raises ConfigError, naming both keys, if a model on ``cuda`` would run in a Ray actor or trial that reserves
    no GPU (``command``: ``run``, whose edge replicas and device actors reserve ``cluster.edge_gpus`` /
    ``cluster.device_gpus``, or ``tune``, whose trials reserve ``tune.trial_gpus``), or on a ``cuda:N`` it cannot see.

    Ray hides the GPUs from an actor or trial that reserves none (it empties ``CUDA_VISIBLE_DEVICES``) and shows the
    ones it reserves as ``cuda:0``, ``cuda:1``, ...: without this check the model would fail to load inside the
    actor, after Ray and Serve had started."""
    if command not in ("run", "tune"):
        raise ValueError(f"command must be 'run' or 'tune', got {command!r}")
    if command == "run":
        c = cfg.cluster
        places = [("target", "an edge replica", "cluster.edge_gpus", c.edge_gpus),
                  ("draft", "a device actor", "cluster.device_gpus", c.device_gpus)]  # fmt: skip
    else:
        places = [(role, "a trial", "tune.trial_gpus", cfg.tune.trial_gpus) for role in ("target", "draft")]
    for role, who, key, gpus in places:
        device = getattr(cfg.models, role).device
        if not device.startswith("cuda"):
            continue
        if gpus <= 0:
            raise ConfigError(f"models.{role}.device is {device!r} but {key} is 0: Ray hides the GPUs from "
                              f"{who} that reserves none; set {key} (e.g. 1, or a fraction to share one)")  # fmt: skip
        index, seen = int(device.partition(":")[2] or 0), max(1, math.ceil(gpus))
        if index >= seen:
            sees = "its GPU as cuda:0" if seen == 1 else f"its {seen} GPUs as cuda:0 to cuda:{seen - 1}"
            raise ConfigError(f"models.{role}.device is {device!r} but {who} reserving {key}={gpus:g} sees {sees}; "
                              "use cuda")  # fmt: skip


def check_resources(cfg: Config, have: dict[str, float]) -> None:
    """Raises ConfigError, naming the keys, if the edge replicas and the device actors of ``cfg.cluster`` together
    reserve more CPUs or GPUs than the Ray cluster has in all (``have``: ``ray.cluster_resources()``).

    Ray would keep such actors pending without a word, and the run would wait for them until its start-up timeout."""
    c = cfg.cluster
    for kind, edge, device in (("CPU", c.edge_cpus, c.device_cpus), ("GPU", c.edge_gpus, c.device_gpus)):
        need = c.edge_replicas * edge + c.num_devices * device
        total = have.get(kind, 0.0)
        if need > total + 1e-9:
            low = kind.lower()
            raise ConfigError(
                f"cluster.edge_replicas x cluster.edge_{low}s + cluster.num_devices x cluster.device_{low}s = "
                f"{c.edge_replicas} x {edge:g} + {c.num_devices} x {device:g} = {need:g} {kind}s, but this Ray "
                f"cluster has {total:g}: lower them (fractions are fine) or join a larger cluster"
            )


def connect_ray(address: str | None, timeout_s: float = 5.0, **init_kwargs) -> bool:
    """Start a local Ray (``address`` None) or join the cluster at ``address`` (``cluster.address``: ``auto``, or
    ``host:port``), unless Ray is already initialized in this process; returns whether it started or joined one
    (then the caller shuts it down).

    Ray itself retries an address nobody answers at for minutes, and reports a missing ``auto`` cluster with a
    traceback; here both are a ``ConfigError`` naming the key, within ``timeout_s``.
    """
    import socket

    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address:
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, **init_kwargs)
        return True
    where = ray_host_port(address)  # None: auto (Ray finds the cluster this machine started)
    if where is not None:
        try:
            socket.create_connection(where, timeout=timeout_s).close()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(f"cluster.address: no Ray cluster answers at {address!r} ({reason})") from None
    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cluster.address: cannot join a Ray cluster at {address!r}: {first}") from None
    return True
