"""The edge verifier as a Ray Serve deployment wrapping the same ``Edge`` as the in-process engine.

Every frame from every device reaches ``EdgeServer.frames`` through a deployment handle (no HTTP). The frame is
put into ``@serve.batch``; one batch (up to ``cluster.max_batch_size`` items, waiting at most
``cluster.batch_wait_ms`` after the first) is answered by ``Edge.process``: **one batched target forward** for all
verifications in it, over sessions of different lengths. target_only streams run through the same batches, as in
a continuous-batching LLM server: one stepper task submits a ``Step`` (one decode step) for *every* active stream
at once, so all of them decode in one batched forward per step (together with any frames that arrive meanwhile),
and each stream's call yields its tokens as they come.

Serve forms a batch from what arrives within the wait window, and it forms the next one while the previous is
still computing. So the batch body hands its items to the replica's ``EngineLoop``: one worker thread that, each
time the model is free, takes *every* batch queued meanwhile (up to ``cluster.max_batch_size`` items) into one
``Edge.process`` call. Under load, everything that arrived during a forward is verified together in the next one
(continuous batching); when idle, a request waits at most the batch window. ``max_ongoing_requests`` is raised above the
batch size (Serve's default of 5 would cap every batch at 5) and above the number of devices (a target_only
stream holds its call open).

Edge statistics (busy time from the edge's own clock, batch sizes) go to a ``StatsBoard`` actor after every
batch, keyed by replica, so a run can read them even after a replica was replaced.

With ``cluster.edge_replicas > 1`` the deployment routes with Serve's consistent-hash router on the device's
identity, so a device's sessions stay on the replica holding their caches; when replicas change, a device whose
session is gone reopens it from its committed tokens.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from typing import Any

import ray
from ray import serve

from covspec.config import Config, config_to_yaml
from covspec.runtime.edge import Edge, Frame, Reply, Step, Work, prefill_policy

APP_NAME = "covspec-edge"
DEPLOYMENT_NAME = "EdgeServer"


@ray.remote(num_cpus=0)
class StatsBoard:
    """Latest cumulative edge statistics per replica (replicas report after every batch)."""

    def __init__(self) -> None:
        self._stats: dict[str, dict[str, Any]] = {}

    def report(self, replica: str, stats: dict[str, Any]) -> None:
        self._stats[replica] = stats

    def read(self) -> dict[str, dict[str, Any]]:
        return dict(self._stats)


_SUMMED = ("busy_s", "cpu_s", "thread_cpu_s", "prefill_s", "prefill_cpu_s", "prefill_thread_cpu_s", "forward_s",
           "forwards", "fused_prefills", "idle_prefills", "prefill_forwards", "prefills", "verify_rounds",
           "decode_steps", "errors", "batches")  # fmt: skip


def add_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a + b`` of two edge statistics (counters and the batch size histogram; a missing key is zero)."""
    out = {k: a.get(k, 0) + b.get(k, 0) for k in _SUMMED}
    sizes = {int(size): n for size, n in a.get("batch_sizes", {}).items()}
    for size, n in b.get("batch_sizes", {}).items():
        sizes[int(size)] = sizes.get(int(size), 0) + n
    out["batch_sizes"] = sizes
    return out


def total_stats(board: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sum of every replica's statistics (``busy_s``, counts, batch size histogram)."""
    out = add_stats({}, {})  # zeros
    for stats in board.values():
        out = add_stats(out, stats)
    return {**out, "replicas": len(board)}


def diff_stats(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """``after - before`` of two ``total_stats``."""
    out = {k: after[k] - before.get(k, 0) for k in _SUMMED}
    sizes = {s: n - before.get("batch_sizes", {}).get(s, 0) for s, n in after["batch_sizes"].items()}
    out["batch_sizes"] = {s: n for s, n in sizes.items() if n > 0}
    return out


class EngineLoop:
    """Runs ``edge.process`` on one worker thread, merging every batch submitted while it was busy."""

    def __init__(self, edge: Edge, max_items: int) -> None:
        self.edge = edge
        self.max_items = max_items
        self._pending: list[tuple[list[Work], asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._run, name="edge-engine", daemon=True).start()

    async def submit(self, items: list[Work]) -> list[list[Reply]]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            self._pending.append((items, loop, future))
            self._cv.notify()
        return await future

    def _take(self) -> list[tuple[list[Work], asyncio.AbstractEventLoop, asyncio.Future]]:
        with self._cv:
            while not self._pending:
                self._cv.wait()
            taken, count = [], 0
            while self._pending and (not taken or count + len(self._pending[0][0]) <= self.max_items):
                group = self._pending.pop(0)
                taken.append(group)
                count += len(group[0])
            return taken

    def _run(self) -> None:
        while True:
            with self._cv:
                idle = not self._pending
            if idle and self.edge.prefill_idle():  # nothing queued: prefill sessions still waiting for a block
                continue
            groups = self._take()
            items = [item for group, _, _ in groups for item in group]
            try:
                out = self.edge.process(items)
            except Exception as exc:  # a bug: every waiting caller gets the exception, the loop keeps serving
                for _, loop, future in groups:
                    loop.call_soon_threadsafe(_set_exception, future, exc)
                continue
            start = 0
            for group, loop, future in groups:
                loop.call_soon_threadsafe(_set_result, future, out[start : start + len(group)])
                start += len(group)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)


class EdgeServer:
    """One edge replica: the target model, its sessions, and the batching front (see the module docstring)."""

    def __init__(self, cfg_yaml: str, board_name: str | None = None, namespace: str | None = None) -> None:
        import torch

        from covspec.cluster.placement import pin_process
        from covspec.config import load_config_text
        from covspec.models.loading import load_adapter

        cfg = load_config_text(cfg_yaml)
        torch.set_num_threads(cfg.cluster.edge_threads)
        self.cores = pin_process(cfg.cluster.edge_cores, "cluster.edge_cores")  # before the engine thread starts
        m = cfg.models.target
        self.edge = Edge(load_adapter(m.path, m.dtype, m.device, key="models.target.path"),
                         session_ttl_s=cfg.cluster.session_ttl_s,
                         prefill=prefill_policy(cfg.verification.prefill, shared=True))  # fmt: skip
        self.replica = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.nice = os.getpriority(os.PRIO_PROCESS, 0)  # this thread's; the engine thread started below inherits it
        self._board = ray.get_actor(board_name, namespace=namespace) if board_name else None
        self._engine = EngineLoop(self.edge, cfg.cluster.max_batch_size)
        self._batched.set_max_batch_size(cfg.cluster.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.cluster.batch_wait_ms / 1e3)
        self._streams: dict[str, tuple[str, asyncio.Queue]] = {}  # target_only session -> (peer, replies queue)
        self._stepper: asyncio.Task | None = None

    async def frames(self, peer: str, payload: bytes):
        """Streams the encoded replies to one frame of device ``peer`` (a target_only stream until it ends)."""
        replies = await self._batched(Frame(payload, peer))
        for _, frame in replies:
            yield frame
        sid = self.edge.stream_opened(replies)
        if sid is None:
            return
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[sid] = (peer, queue)
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.get_running_loop().create_task(self._step_streams())
        try:
            while True:
                replies = await queue.get()
                for _, frame in replies:
                    yield frame
                if not self.edge.stream_continues(replies):
                    break
        finally:  # the caller went away mid-stream: stop decoding for it
            if self._streams.pop(sid, None) is not None:
                self.edge.drop(sid)

    async def _step_streams(self) -> None:
        """One decode step for every active target_only stream per batch, until no stream is left."""
        while self._streams:
            active = list(self._streams.items())
            results = await asyncio.gather(*[self._batched(Step(sid, peer)) for sid, (peer, _) in active])
            for (sid, (_, queue)), replies in zip(active, results, strict=True):
                queue.put_nowait(replies)
                if not self.edge.stream_continues(replies):
                    self._streams.pop(sid, None)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[Work]) -> list[list[Reply]]:
        out = await self._engine.submit(items)
        if self._board is not None:
            self._board.report.remote(self.replica, self.edge.stats.to_dict())
        return out

    async def stats(self) -> dict[str, Any]:
        """This replica's statistics and live sessions."""
        return {"replica": self.replica, "sessions": len(self.edge.sessions), "nice": self.nice, "cores": self.cores,
                **self.edge.stats.to_dict()}  # fmt: skip

    async def crash(self) -> None:
        """Ends this replica's process (fault-injection tests only: Serve replaces the replica)."""
        os._exit(1)

    async def __call__(self, request) -> dict[str, Any]:
        """HTTP (only when ``cluster.http`` is on, bound to ``cluster.http_host``): read-only statistics."""
        return await self.stats()


def edge_app(cfg: Config, board_name: str | None, namespace: str | None):
    """The bound Serve application of the edge for ``cfg.cluster``."""
    c = cfg.cluster
    ongoing = max(4 * c.max_batch_size, 4 * c.num_devices, 32)
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "num_replicas": c.edge_replicas,
        "max_ongoing_requests": ongoing,
        "ray_actor_options": {"num_cpus": c.edge_cpus, "num_gpus": c.edge_gpus},
        "health_check_period_s": 2.0,
        "graceful_shutdown_timeout_s": 1.0,
    }
    if c.edge_replicas > 1:
        from ray.serve.config import RequestRouterConfig

        options["request_router_config"] = RequestRouterConfig(
            request_router_class="ray.serve.experimental.consistent_hash_router:ConsistentHashRouter",
            request_router_kwargs={"num_fallback_replicas": 0},
        )
    deployment = serve.deployment(EdgeServer).options(**options)
    return deployment.bind(config_to_yaml(cfg), board_name, namespace)
