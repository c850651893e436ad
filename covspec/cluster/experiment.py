"""``covspec run``: one multi-device experiment on Ray, every configured method side by side, tracked in MLflow.

Flow: start (or join, ``cluster.address``) Ray; deploy the edge (``covspec.cluster.edge_app``) with Ray Serve;
start ``cluster.num_devices`` device actors (``covspec.cluster.devices``); then, method after method, spread the
benchmark's samples over the devices (each free device takes the next sample), write each result as it finishes
(``results/<run_id>/samples.jsonl``), and read the edge's busy time from its own clock before and after the method.
The table compares the methods measured in this one run. With ``cluster.repeats`` passes (3 by default) the methods
run forward, then reversed, then forward again, so that the machine's drift hits them alike; the table pools every
pass and a second one gives each method's ratios to target_only per pass and their median.

Faults: a device actor that dies mid-sample has the sample put back in the queue for another device (the actor
is restarted once by Ray and rejoins when it answers a ping); every sample is recorded exactly once. An edge
replica that dies is replaced by Serve; devices reopen their sessions from their committed tokens. The run fails
with a clear error (MLflow run FAILED, partial results kept) only when no device is left or a sample failed
``cluster.max_attempts`` times.

Resume: ``--resume RUN_ID`` reads ``results/<RUN_ID>/samples.jsonl``, skips the finished (method, sample) pairs and
continues the same MLflow run; the table covers every row of the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covspec.config import ClusterConfig, Config, config_to_yaml
from covspec.errors import ConfigError, CovspecError, InputError

RESULTS_ROOT = Path("results")


class RunError(CovspecError):
    """The experiment cannot make progress (no device left, a sample failing on every attempt, no edge)."""


class StartError(CovspecError):
    """The cluster could not start (its edge or its device actors): nothing ran, no run or results exist."""


@dataclass
class MethodPhase:
    """What one method's phase measured besides its rows."""

    wall_s: float = 0.0
    edge: dict[str, Any] = field(default_factory=dict)  # edge statistics accumulated during the phase
    retries: int = 0

    def plus(self, other: MethodPhase) -> MethodPhase:
        """Both phases pooled (walls, edge statistics and retries summed)."""
        from covspec.cluster.edge_app import add_stats

        return MethodPhase(self.wall_s + other.wall_s, add_stats(self.edge, other.edge), self.retries + other.retries)


def results_dir(run_id: str) -> Path:
    return RESULTS_ROOT / run_id


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a results JSONL; a torn last line (a crash mid-write) is ignored, any other bad line is an error."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise InputError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Cluster:
    """Ray, the edge application and the device actors of one experiment; ``close`` tears down what it started."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print) -> None:
        import ray
        from ray import serve
        from ray.exceptions import GetTimeoutError, RayActorError

        from covspec.cluster.devices import DeviceActor, device_options
        from covspec.cluster.edge_app import APP_NAME, DEPLOYMENT_NAME, StatsBoard, edge_app
        from covspec.cluster.placement import check_cores, check_gpus, check_resources, connect_ray

        self.cfg = cfg
        c = cfg.cluster
        check_gpus(cfg, "run")
        if not c.address and not ray.is_initialized():  # a local Ray, of this machine's cores: checked before it starts
            check_resources(cfg, {"CPU": float(os.cpu_count() or 2), "GPU": float("inf")})  # GPUs: Ray detects them
        if not c.address:  # a local Ray: the actors see this machine's cores, so a bad core is a config error now
            check_cores(c.edge_cores, "cluster.edge_cores")
            check_cores(c.device_cores, "cluster.device_cores")
        self._started_ray = connect_ray(c.address, log_to_driver=False)
        try:
            check_resources(cfg, ray.cluster_resources())
        except ConfigError:
            self._release_ray()
            raise
        self.namespace = ray.get_runtime_context().namespace
        tag = secrets.token_hex(4)
        self.board_name = f"covspec-edge-stats-{tag}"
        self.board = StatsBoard.options(name=self.board_name).remote()
        self.app_name = f"{APP_NAME}-{tag}"
        self.devices: list[Any] = []
        try:
            if c.http:
                serve.start(http_options={"host": c.http_host, "port": c.http_port})
            else:
                serve.start(proxy_location="Disabled")
            log(f"deploying the edge ({c.edge_replicas} replica(s), batches of <= {c.max_batch_size}) ...")
            try:
                serve.run(edge_app(cfg, self.board_name, self.namespace), name=self.app_name,
                          route_prefix="/covspec" if c.http else None)  # fmt: skip
            except RuntimeError as exc:  # the replica's own error is in the deployment's status, not in this one
                why = cause_line(_deployment_message(self.app_name, exc))
                raise StartError(f"the edge did not start: {why}") from None
            log(f"starting {c.num_devices} device actors ...")
            text = config_to_yaml(cfg)
            self.devices = [DeviceActor.options(name=f"covspec-device-{tag}-{i}", **device_options(cfg))
                            .remote(text, i, self.app_name) for i in range(c.num_devices)]  # fmt: skip
            try:
                self.info = ray.get([d.ping.remote() for d in self.devices], timeout=600)
            except RayActorError as exc:
                raise StartError(f"the device actors did not start: {cause_line(str(exc))}") from None
            except GetTimeoutError:
                raise StartError("the device actors did not start within 600 s (is another job holding the "
                                 "cluster's CPUs?)") from None  # fmt: skip
            edge = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=self.app_name).stats.remote().result()
        except BaseException:
            self.close()  # what did start goes (and Ray, if this started it)
            raise
        self.edge_nice: int = edge["nice"]
        self.edge_cores: list[int] = edge["cores"]

    def edge_stats(self) -> dict[str, Any]:
        import ray

        from covspec.cluster.edge_app import total_stats

        return total_stats(ray.get(self.board.read.remote(), timeout=60))

    def close(self) -> None:
        import ray
        from ray import serve

        for d in self.devices:
            ray.kill(d, no_restart=True)
        with contextlib.suppress(Exception):  # best effort: Serve may already be gone
            serve.delete(self.app_name)
        ray.kill(self.board, no_restart=True)
        self._release_ray()

    def _release_ray(self) -> None:
        import ray

        if self._started_ray:  # all of Ray goes, Serve's controller with it
            # serve.shutdown() would kill the controller first, and the raylet then prints two "Task
            # ServeController... failed" lines after the table; only the driver's handle on it needs forgetting.
            ray.shutdown()
            with contextlib.suppress(Exception):
                from ray.serve.context import _set_global_client

                _set_global_client(None)


def _deployment_message(app_name: str, error: Exception) -> str:
    """What Serve says of the deployments of ``app_name`` (their replicas' tracebacks), else ``error``'s text."""
    from ray import serve

    with contextlib.suppress(Exception):
        app = serve.status().applications[app_name]
        messages = [d.message for d in app.deployments.values() if d.message]
        if messages:
            return "\n".join(messages)
    return str(error)


def cause_line(text: str) -> str:
    """The last ``SomeError: message`` line of a traceback (the error that caused it, its class name without the
    module), else the text's last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        m = re.match(r"^(?:[\w]+\.)*(\w+(?:Error|Exception)): (.+)$", line)
        if m:
            return f"{m.group(1)}: {m.group(2)}"
    return lines[-1] if lines else "no reason given"


def run_method(
    cluster: Cluster, method: str, jobs: list, sink: Callable[[dict[str, Any]], None],
    progress: Callable[[], None] | None = None,
) -> MethodPhase:  # fmt: skip
    """Every job of ``method`` spread over the devices; each row goes to ``sink`` as it finishes."""
    import ray
    from ray.exceptions import (
        ActorDiedError,
        ActorUnavailableError,
        GetTimeoutError,
        RayActorError,
        RayTaskError,
        UnserializableException,
    )

    cfg = cluster.cfg
    queue = deque(jobs)
    attempts: dict[str, int] = {}
    free = list(range(len(cluster.devices)))
    running: dict[Any, tuple[int, Any]] = {}  # future -> (device index, job)
    pinging: dict[Any, int] = {}  # ping future -> device index (a device that failed, maybe restarted)
    lost: set[int] = set()
    phase = MethodPhase()
    before = cluster.edge_stats()
    start = time.perf_counter()
    while queue or running:
        while queue and free:
            i = free.pop(0)
            job = queue.popleft()
            running[cluster.devices[i].run.remote(job)] = (i, job)
        if not running and queue and not pinging:
            raise RunError(f"{method}: no device is left to run {len(queue)} remaining samples")
        ready, _ = ray.wait(list(running) + list(pinging), num_returns=1, timeout=cfg.cluster.sample_timeout_s)
        if not ready:
            raise RunError(f"{method}: no sample finished within cluster.sample_timeout_s="
                           f"{cfg.cluster.sample_timeout_s:g} s")  # fmt: skip
        fut = ready[0]
        if fut in pinging:
            i = pinging.pop(fut)
            try:
                ray.get(fut, timeout=0)
                free.append(i)  # restarted and answering: back in the pool
            except (RayActorError, ActorDiedError, ActorUnavailableError, GetTimeoutError):
                lost.add(i)
            continue
        i, job = running.pop(fut)
        try:
            row = ray.get(fut, timeout=0)
        except (RayActorError, ActorDiedError, ActorUnavailableError, RayTaskError, UnserializableException) as err:
            attempts[job.sample_id] = attempts.get(job.sample_id, 0) + 1
            phase.retries += 1
            if attempts[job.sample_id] >= cfg.cluster.max_attempts:
                cause = getattr(err, "cause", None) or err
                last = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                raise RunError(f"{method}: sample {job.sample_id} failed {attempts[job.sample_id]} times "
                               f"(last: {last[:300]})") from None  # fmt: skip
            queue.appendleft(job)  # another device takes it next
            if isinstance(err, RayTaskError | UnserializableException) and not isinstance(err, RayActorError):
                free.append(i)  # the request failed (e.g. its edge session could not be reopened), the device lives
            else:
                pinging[cluster.devices[i].ping.remote()] = i  # the actor died: back once Ray has restarted it
            continue
        row["attempts"] = attempts.get(job.sample_id, 0) + 1
        sink(row)
        free.append(i)
        if progress:
            progress()
    phase.wall_s = time.perf_counter() - start
    from covspec.cluster.edge_app import diff_stats

    phase.edge = diff_stats(cluster.edge_stats(), before)
    return phase


def summarize_run(cfg: Config, rows: list[dict[str, Any]], phases: dict[str, MethodPhase],
                  measured_in: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One summary per method: the bench table's columns plus system throughput and edge capacity.

    ``measured_in``: the figures per second of ``phases`` (wall, edge busy and CPU time) count only the tokens of the
    rows with this ``measured_in`` tag, the rows those phases produced (a resumed run's earlier rows were timed by
    another process); None: every row."""
    from pipelines.bench import MethodStats, summarize

    stats: dict[str, MethodStats] = {m: MethodStats() for m in cfg.methods}
    reference = {r["sample_id"]: r["token_ids"] for r in rows if r["method"] == "target_only"}
    for row in rows:
        if row["method"] in stats:
            ref = reference.get(row["sample_id"])
            row["matches_target_only"] = None if ref is None else row["token_ids"] == ref
            stats[row["method"]].add(row)
    report = {"stats": {m: s for m, s in stats.items() if s.rows}, "config": cfg,
              "costs": {"draft_step_s": 1.0, "target_step_s": 1.0, "target_verify_s": 1.0}}  # fmt: skip
    out = summarize(report)
    base = next((r for r in out if r["method"] == "target_only"), None)
    for row in out:
        name = row["method"].removesuffix(" (lossy)")
        s, phase = stats[name], phases.get(name)
        tokens = sum(r["num_tokens"] for r in s.rows if measured_in is None or r.get("measured_in") == measured_in)
        row.pop("bound_speedup", None)
        row.pop("alpha", None)
        row["tokens"] = s.sum("num_tokens")
        row["measured_tokens"] = tokens  # those of the rows the phases timed
        row["tokens_per_s_per_device"] = row.pop("tokens_per_s")  # sum of tokens / sum of request latencies
        if phase is not None and phase.wall_s > 0:
            row["wall_s"] = phase.wall_s
            row["system_tokens_per_s"] = tokens / phase.wall_s
            busy = phase.edge.get("busy_s", 0.0)
            row["edge_busy_s"] = busy
            row["edge_busy_fraction"] = busy / phase.wall_s
            row["edge_capacity"] = tokens / busy if busy > 0 else None
            cpu = phase.edge.get("cpu_s", 0.0)
            row["edge_cpu_s"] = cpu
            row["edge_capacity_cpu"] = tokens / cpu if cpu > 0 else None
            for key in ("thread_cpu_s", "prefill_s", "prefill_cpu_s", "prefill_thread_cpu_s"):  # diagnostics
                row[f"edge_{key}"] = phase.edge.get(key, 0.0)
            row["edge_prefill_share"] = phase.edge.get("prefill_s", 0.0) / busy if busy > 0 else None
            sizes = phase.edge.get("batch_sizes", {})
            n = sum(sizes.values())
            row["mean_batch"] = sum(int(k) * v for k, v in sizes.items()) / n if n else None
            forwards = phase.edge.get("prefill_forwards", 0)
            row["mean_prefill_batch"] = phase.edge.get("prefills", 0) / forwards if forwards else None
            for key in ("prefills", "fused_prefills", "idle_prefills"):  # how the edge prefilled (docs/engine.md)
                row[f"edge_{key}"] = phase.edge.get(key, 0)
            row["retries"] = phase.retries
            row["edge_errors"] = phase.edge.get("errors", 0)  # frames the edge answered with an ErrorReply
        row["device_busy_s"] = s.sum("device_busy_s")
        row["session_reopens"] = s.sum("session_reopens")
    if base is not None:
        for row in out:
            for key in ("system_tokens_per_s", "edge_capacity", "edge_capacity_cpu", "tokens_per_s_per_device"):
                if row.get(key) and base.get(key):
                    row[f"{key}_vs_target_only"] = row[key] / base[key]
            # The most this method's edge capacity could be if its verification cost nothing: tokens per second of
            # its prefill alone, against target_only's capacity. Every lossless method prefills the whole prompt.
            # On both clocks: devices drafting on the edge's cores stretch its busy clock, not its CPU clock.
            phase = phases.get(row["method"].removesuffix(" (lossy)"))
            edge = phase.edge if phase is not None else {}
            for prefill_key, cap_key, out_key in (
                ("prefill_s", "edge_capacity", "edge_capacity_ceiling_vs_target_only"),
                ("prefill_cpu_s", "edge_capacity_cpu", "edge_capacity_ceiling_cpu_vs_target_only"),
            ):
                prefill = edge.get(prefill_key, 0.0)
                if prefill > 0 and base.get(cap_key):
                    row[out_key] = row["measured_tokens"] / prefill / base[cap_key]
    return out


def pooled(passes: list[dict[str, MethodPhase]]) -> dict[str, MethodPhase]:
    """Each method's phases of every pass, pooled (in the order the methods first ran)."""
    out: dict[str, MethodPhase] = {}
    for phases in passes:
        for method, phase in phases.items():
            out[method] = out[method].plus(phase) if method in out else phase
    return out


PASS_RATIOS = (("speedup", "system_tokens_per_s_vs_target_only"), ("cap vs t.o.", "edge_capacity_vs_target_only"),
               ("CPU vs t.o.", "edge_capacity_cpu_vs_target_only"))  # fmt: skip


def add_pass_ratios(cfg: Config, summary: list[dict[str, Any]], rows: list[dict[str, Any]],
                    passes: list[dict[str, MethodPhase]], measured_in: str | None = None) -> None:  # fmt: skip
    """Adds each method's ratios to target_only per pass (``<key>_by_repeat``, None where a pass has no phase
    measured in this process, e.g. before a resume) and their median over the passes (``<key>_median``)."""
    by_pass = []
    for r, phases in enumerate(passes):
        mine = [row for row in rows if row.get("repeat", 0) == r]
        summary_r = summarize_run(cfg, mine, phases, measured_in) if mine and phases else []
        by_pass.append({row["method"]: row for row in summary_r})
    for row in summary:
        for _, key in PASS_RATIOS:
            values = [p.get(row["method"], {}).get(key) for p in by_pass]
            row[f"{key}_by_repeat"] = values
            present = [v for v in values if v is not None]
            row[f"{key}_median"] = statistics.median(present) if present else None


COLUMNS = [
    ("method", "method", "s"), ("sys tok/s", "system_tokens_per_s", ".1f"),
    ("speedup", "system_tokens_per_s_vs_target_only", ".2f"), ("edge cap tok/s", "edge_capacity", ".1f"),
    ("cap vs t.o.", "edge_capacity_vs_target_only", ".2f"), ("cap/CPU", "edge_capacity_cpu", ".1f"),
    ("CPU vs t.o.", "edge_capacity_cpu_vs_target_only", ".2f"), ("tok/s/dev", "tokens_per_s_per_device", ".1f"),
    ("acc.len", "mean_accepted_length", ".2f"), ("B/tok", "decoding_bytes_per_token", ".1f"),
    ("upload B/req", "upload_bytes_per_request", ".0f"), ("vs vanilla", "reduction_vs_vanilla", ".2%"),
    ("vs vanilla@152k*", "projected_reduction_vs_vanilla", ".3%"), ("EM", "exact_match", ".1%"),
    ("=target", "identical_to_target_only", ".0%"), ("p50 s", "latency_p50_s", ".3f"),
    ("p95 s", "latency_p95_s", ".3f"), ("edge busy", "edge_busy_fraction", ".0%"),
    ("prefill", "edge_prefill_share", ".0%"), ("cap ceiling", "edge_capacity_ceiling_vs_target_only", ".2f"),
    ("ceil/CPU", "edge_capacity_ceiling_cpu_vs_target_only", ".2f"),
    ("batch", "mean_batch", ".1f"), ("pf batch", "mean_prefill_batch", ".1f"),
]  # fmt: skip


def pass_table(summary: list[dict[str, Any]]):
    """Each method's ratios to target_only in every pass (methods in alternating order) and their median."""
    from rich.table import Table

    table = Table(title="per pass (methods forward, then reversed, ...): ratios to target_only in the same pass")
    table.add_column("method", no_wrap=True)
    for title, _ in PASS_RATIOS:
        table.add_column(f"{title} per pass", justify="right")
        table.add_column("median", justify="right")
    for row in summary:
        cells = [row["method"]]
        for _, key in PASS_RATIOS:
            values = row.get(f"{key}_by_repeat") or []
            cells.append(" / ".join("-" if v is None else f"{v:.2f}" for v in values))
            median = row.get(f"{key}_median")
            cells.append("-" if median is None else f"{median:.2f}")
        table.add_row(*cells)
    return table


def _bound(summary: list[dict[str, Any]]) -> str:
    """target_only's own capacity ceilings in this run (busy / CPU clock), if it ran."""
    row = next((r for r in summary if r["method"] == "target_only"), None)
    busy, cpu = (None, None) if row is None else (row.get("edge_capacity_ceiling_vs_target_only"),
                                                   row.get("edge_capacity_ceiling_cpu_vs_target_only"))  # fmt: skip
    if busy is None or cpu is None:
        return ""
    return f" (in this run {busy:.2f}x busy, {cpu:.2f}x CPU)"


def format_table(cfg: Config, summary: list[dict[str, Any]], run_id: str, width: int = 240,
                 nice: tuple[int, int] | None = None) -> str:  # fmt: skip
    """The comparison table as text (rich), with the notes that explain its columns."""
    from rich.console import Console
    from rich.table import Table

    c = cfg.cluster
    passes = f" x {c.repeats} passes (pooled)" if c.repeats > 1 else ""
    table = Table(title=f"covspec run {run_id}: {cfg.data.label()}, {cfg.data.limit} samples x "
                  f"{len(cfg.methods)} methods{passes} on {c.num_devices} devices, edge {c.edge_replicas} replica(s); "
                  f"link rtt {cfg.link.rtt_ms:g} ms; T={cfg.generation.temperature:g}")  # fmt: skip
    longest = max((len(row["method"]) for row in summary), default=6)
    for title, _, _ in COLUMNS:
        if title == "method":
            table.add_column(title, no_wrap=True, min_width=longest)
        else:
            table.add_column(title, justify="right")
    for row in summary:
        table.add_row(*["-" if row.get(k) is None else format(row[k], spec) for _, k, spec in COLUMNS])
    console = Console(file=io.StringIO(), width=width, record=True)
    console.print(table)
    if any(f"{key}_by_repeat" in row for row in summary for _, key in PASS_RATIOS):
        console.print(pass_table(summary))
    console.print(
        "sys tok/s: generated tokens of all devices / wall time of the method's phase; speedup is against "
        "target_only in this run.\nedge cap: generated tokens per second of edge busy time (the edge's own clock, "
        "all replicas); cap/CPU: per second of edge CPU time, which devices sharing the cores do not stretch "
        "(docs/cluster.md). prefill: share of edge busy time spent prefilling; cap ceiling: edge capacity vs "
        "target_only if verification cost nothing and only the prefill remained (tokens / prefill time); ceil/CPU: "
        "the same on the CPU clock (prefill CPU time against target_only's cap/CPU); target_only's own ceiling bounds "
        f"every lossless method's, since each prefills the prompt once{_bound(summary)}.\n"
        "tok/s/dev: tokens / request "
        "latency, as one device sees it. B/tok: decoding traffic per generated token (both directions, counted from "
        "serialized frames); upload B/req: the one-time image + prompt.\n* projected: the same frames re-sized for a "
        f"151,936-token vocabulary (ids, distribution rows). Placement: {c.num_devices} device actors x "
        f"{c.device_cpus:g} CPU, "
        f"{c.device_threads} torch thread(s) each; edge {c.edge_replicas} x {c.edge_cpus:g} CPU, {c.edge_threads} "
        f"thread(s){'' if nice is None else f'; niceness: devices {nice[0]}, edge {nice[1]}'}{_pinning(c)}; this "
        f"machine has {os.cpu_count()} cores{'' if c.edge_cores or c.device_cores else ' shared by all of them'}."
    )  # fmt: skip
    refused = [f"{row['method']} {row['edge_errors']}" for row in summary if row.get("edge_errors")]
    if refused:
        console.print(f"Edge error replies: {', '.join(refused)} (frames the edge refused: sessions it had lost, "
                      "which devices reopen, or a disagreement between device and edge; docs/cluster.md, "
                      "Faults).")  # fmt: skip
    return console.export_text()


def _pinning(c: ClusterConfig) -> str:
    """The placement note's part on pinned cores (``cluster.edge_cores`` / ``cluster.device_cores``)."""
    parts = [f"{who} pinned to core(s) {', '.join(map(str, cores))}"
             for who, cores in (("edge", c.edge_cores), ("devices", c.device_cores)) if cores]  # fmt: skip
    return "".join(f"; {p}" for p in parts)


def _plots(summary: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Throughput and bytes per token per method, and the accepted-length histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = [r["method"] for r in summary]
    for key, label, fname in (
        ("system_tokens_per_s", "system tokens/s", "throughput.png"),
        ("edge_capacity", "edge capacity (tokens per edge-busy s)", "edge_capacity.png"),
        ("decoding_bytes_per_token", "decoding bytes per token (log)", "bytes_per_token.png"),
    ):
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(names, [r.get(key) or 0 for r in summary], color="tab:blue")
        ax.set_ylabel(label)
        if key == "decoding_bytes_per_token":
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        paths.append(out / fname)
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in names:
        lengths = [n + 1 for r in rows if r["method"] == name for n in _accepted(r)]
        if lengths:
            ax.hist(lengths, bins=range(1, max(lengths) + 2), alpha=0.5, label=name)
    ax.set_xlabel("tokens committed per verification round (accepted + 1)")
    ax.set_ylabel("rounds")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accepted_length_hist.png", dpi=100)
    plt.close(fig)
    paths.append(out / "accepted_length_hist.png")
    return paths


def _accepted(row: dict[str, Any]) -> list[int]:
    return list(row.get("accepted_per_round") or [])


def _write_report(out: Path, jsonl: Path, summary: list[dict[str, Any]], table: str, rows: list[dict]) -> None:
    """Table, summary and plots into ``out`` and the active MLflow run (with the results JSONL)."""
    from covspec import tracking

    if table:
        (out / "table.txt").write_text(table, encoding="utf-8")
        (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        for row in summary:
            tracking.log_metrics({k: v for k, v in row.items() if k != "method"}, prefix=f"{row['method']}.")
        for path in _plots(summary, rows, out):
            tracking.log_artifact(path, "plots")
        tracking.log_artifact(out / "table.txt")
        tracking.log_artifact(out / "summary.json")
    if jsonl.exists():
        tracking.log_artifact(jsonl)


def run_experiment(
    cfg: Config,
    resume: str | None = None,
    log: Callable[[str], None] = print,
    progress_factory=None,
    cluster: Cluster | None = None,
    on_table: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the experiment of ``cfg``; returns {"run_id", "summary", "table", "dir", "phases"}.

    ``cluster``: an existing ``Cluster`` (built from a config with the same models and cluster section) to reuse;
    by default one is started for the run and torn down after it, once the report is written and the MLflow
    run ended. ``on_table`` receives the table as soon as it exists (before the teardown).
    """
    from covspec import tracking
    from covspec.cluster.devices import Job
    from covspec.cluster.placement import check_gpus
    from covspec.data import load_benchmark
    from covspec.data.metrics import exact_match, token_f1
    from covspec.models.loading import check_pair_files

    check_gpus(cfg, "run")  # before a run or a results directory exists
    check_pair_files(cfg.models.target, cfg.models.draft)  # a pair the devices and the edge could not share
    samples = load_benchmark(cfg.data, seed=cfg.seed)
    run_id = resume
    done: set[tuple[str, str]] = set()
    rows: list[dict[str, Any]] = []
    if resume is not None:
        path = results_dir(resume) / "samples.jsonl"
        if not path.is_file():
            raise InputError(f"--resume {resume}: no results at {path} (run ids are the names under {RESULTS_ROOT}/)")
        kept = read_rows(path)
        # rewrite without a torn last line, so that new rows start on a line of their own
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        rows = [r for r in kept if r.get("method") in cfg.methods and r.get("repeat", 0) < cfg.cluster.repeats]
        done = {(r["method"], r["sample_id"], r.get("repeat", 0)) for r in rows}
    tags = {"covspec.command": "run"}
    own = cluster is None
    try:
        if own:  # before a run or a results directory exists: a cluster that cannot start leaves neither
            cluster = Cluster(cfg, log)
        with tracking.start_run(cfg, "covspec-run", tags, run_id=resume if cfg.tracking.enabled else None) as active:
            if run_id is None:
                run_id = active.info.run_id if active is not None else f"local-{secrets.token_hex(6)}"
            out = results_dir(run_id)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
            jsonl = out / "samples.jsonl"
            log(f"run {run_id}: results in {jsonl}")
            passes: list[dict[str, MethodPhase]] = [{} for _ in range(cfg.cluster.repeats)]
            current = {"repeat": 0}
            measured_in = secrets.token_hex(6)  # tags the rows timed by this process's phases
            try:
                with jsonl.open("a", encoding="utf-8") as sink_file:

                    def sink(row: dict[str, Any]) -> None:
                        sample = by_id[row["sample_id"]]
                        row.update({"repeat": current["repeat"], "measured_in": measured_in, "kind": sample.kind,
                                    "reference": sample.answer,
                                    "exact_match": exact_match(row["text"], sample.answer),
                                    "token_f1": token_f1(row["text"], sample.answer),
                                    "score": sample.score(row["text"]),
                                    "group": getattr(sample, "group", "")})  # fmt: skip
                        sink_file.write(json.dumps(row) + "\n")
                        sink_file.flush()
                        rows.append(row)

                    by_id = {s.sample_id: s for s in samples}
                    images = {s.sample_id: _png(s.image()) for s in samples}
                    if cfg.cluster.warmup:
                        log("warm-up (not measured) ...")
                        for method in ("target_only", "covspec"):
                            warm = [Job(method, s.sample_id, s.question, images[s.sample_id], i)
                                    for i, s in enumerate(samples[: cfg.cluster.num_devices])]  # fmt: skip
                            run_method(cluster, method, warm, lambda row: None)
                    repeats = cfg.cluster.repeats
                    for r in range(repeats):  # methods forward, then reversed, ...: drift hits them alike
                        current["repeat"] = r
                        for method in cfg.methods if r % 2 == 0 else cfg.methods[::-1]:
                            todo = {s.sample_id for s in samples if (method, s.sample_id, r) not in done}
                            jobs = [Job(method, s.sample_id, s.question, images[s.sample_id], cfg.seed * 100_003 + i)
                                    for i, s in enumerate(samples) if s.sample_id in todo]  # fmt: skip
                            if not jobs:
                                continue
                            label = method if repeats == 1 else f"{method} [{r + 1}/{repeats}]"
                            advance = progress_factory(label, len(jobs)) if progress_factory else None
                            passes[r][method] = run_method(cluster, method, jobs, sink, advance)
                            tracking.log_metrics({"wall_s": passes[r][method].wall_s}, step=r, prefix=f"{method}.")
            finally:  # the report is written (and the MLflow run ended) before Ray is shut down
                phases = pooled(passes)
                summary = summarize_run(cfg, rows, phases, measured_in) if rows else []
                if summary and cfg.cluster.repeats > 1:
                    add_pass_ratios(cfg, summary, rows, passes, measured_in)
                nice = (max(i["nice"] for i in cluster.info), cluster.edge_nice) if cluster is not None else None
                table = format_table(cfg, summary, run_id, nice=nice) if summary else ""
                _write_report(out, jsonl, summary, table, rows)
                if table and on_table is not None:
                    on_table(table)
    finally:
        if own and cluster is not None:
            cluster.close()
    return {"run_id": run_id, "summary": summary, "table": table, "dir": out, "phases": phases}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
