"""Edge batching benchmark: verified tokens per second of one batched target forward, by batch size.

    python -m pipelines.edge_batching [CONFIG] [key=value ...] [--batches 1,4,8,16] [--k 5] [--repeats 20] \
        [--run results/<run_id>]

Opens ``max(batches)`` real sessions on an ``Edge`` (the toy target by default; the prompts of the benchmark's
samples, so their lengths differ), then times ``Edge.process`` on batches of VerifyRequests (k drafted tokens each,
greedy) and of target_only decode steps, interleaving the batch sizes so machine noise hits them alike. Every
verify is undone after it is timed (the sessions are re-opened), so each measurement sees the same cache lengths.
Prints medians: ms per batch, verified (scored) tokens per second, and the ratio to batch 1; beside it the *paired*
ratio: batch b against batch 1 within each repeat (timed moments apart), median and quartiles over the repeats, which
the shared host's drift between repeats does not move.

It also times batched prefills, and batched *fused* prefills (each prompt with a first block of k tokens in the same
forward, as the edge runs a speculative session's first round: ``verification.prefill``), and derives **edge
capacity at saturation** (the edge always has B requests waiting) from these costs: target_only makes 1 token per
session per decode step; a speculative method makes tau tokens per verification round (its mean accepted length);
each request also pays one prefill. With N tokens per request, capacity = B N / (t_prefill(B) + N t_decode(B)) for
target_only; B N / (t_fused(B) + (N / tau - 1) t_verify(B)) for the speculative method with its first round fused
into the prefill (the default), and B N / (t_prefill(B) + (N / tau) t_verify(B)) with a separate prefill. tau and N
come from a ``covspec run`` (``--run results/<run_id>``: its summary.json, method covspec) or ``--tau`` /
``--tokens``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from covspec.cli import add_config_arguments, config_from_args, pipeline_main
from covspec.data import load_benchmark
from covspec.models.loading import load_adapter
from covspec.protocol import OpenSession, VerifyRequest, decode, encode, new_session_id
from covspec.protocol.messages import ErrorReply
from covspec.runtime.device import png_bytes
from covspec.runtime.edge import Edge, Frame


def _opens(target, samples, max_new_tokens: int) -> list[OpenSession]:
    """One covspec OpenSession per sample (the device's work: prompt ids, PNG)."""
    return [OpenSession(new_session_id(), "covspec", target.prepare(s.image(), s.question).input_ids.tolist(),
                        png_bytes(s.image()), "png", 0.0, 1.0, max_new_tokens, 0, 4) for s in samples]  # fmt: skip


def _open_all(edge: Edge, msgs: list[OpenSession]) -> list[str]:
    """Open the sessions in one ``process`` call (a batched prefill, or deferred prefills when fusing)."""
    for replies in edge.process([Frame(encode(m)) for m in msgs]):
        for reply, _ in replies:
            if isinstance(reply, ErrorReply):
                raise RuntimeError(reply.message)
    return [m.session_id for m in msgs]


def measure(cfg, batches: list[int], k: int, repeats: int) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    m = cfg.models.target
    target = load_adapter(m.path, m.dtype, m.device, key="models.target.path")
    edge = Edge(target, prefill="separate")  # prefill, verify and decode: each its own forward
    fusing = Edge(target, prefill="fused")  # prefill + first block in one forward (a saturated edge is never idle)
    n = max(batches)
    samples = load_benchmark(cfg.data, seed=cfg.seed)
    samples = [samples[i % len(samples)] for i in range(n)]
    times: dict[tuple[str, int], list[float]] = {
        (kind, b): [] for kind in ("verify", "decode", "prefill", "fused") for b in batches
    }
    for _ in range(repeats):
        for b in batches:
            msgs = _opens(target, samples[:b], 64)
            t = time.perf_counter()
            _open_all(edge, msgs)
            times[("prefill", b)].append(time.perf_counter() - t)
            edge.sessions.clear()
            for kind, width, on in (("verify", k, edge), ("decode", 1, edge), ("fused", k, fusing)):
                msgs = _opens(target, samples[:b], 64)
                t = time.perf_counter()
                sids = _open_all(on, msgs)  # fused: the prefills wait for the blocks
                opening = time.perf_counter() - t if kind == "fused" else 0.0  # its opens' checks, image decoding
                # a different draft per session: the rows are real tokens of the vocabulary
                frames = [Frame(encode(VerifyRequest(sid, 0, [(7 * i + j) % 40 + 5 for j in range(width)],
                                                     committed_len=0, last_token=-1)))
                          for i, sid in enumerate(sids)]  # fmt: skip
                t = time.perf_counter()
                out = on.process(frames)
                times[(kind, b)].append(time.perf_counter() - t + opening)
                for replies in out:
                    for _msg, frame in replies:
                        if isinstance(decode(frame), ErrorReply):
                            raise RuntimeError(f"edge refused a benchmark frame: {decode(frame)}")
                on.sessions.clear()
    if fusing.stats.fused_prefills != sum(batches) * repeats:
        raise RuntimeError(f"{fusing.stats.fused_prefills} fused prefills, expected {sum(batches) * repeats}")
    rows = []
    for kind, width in (("verify", k), ("decode", 1), ("prefill", 0), ("fused", 0)):
        base = None
        paired = paired_ratios({b: times[(kind, b)] for b in batches})
        for b in batches:
            med = statistics.median(times[(kind, b)])
            tps = b * (width or 1) / med  # prefill, fused: sessions per second
            base = base or tps
            rows.append({"kind": kind, "k": width, "batch": b, "ms": med * 1e3, "tokens_per_s": tps,
                         "vs_batch_1": tps / base, **paired[b]})  # fmt: skip
    return rows


def paired_ratios(times: dict[int, list[float]]) -> dict[int, dict[str, float]]:
    """Throughput of batch b over the smallest batch's, *within* each repeat (both timed seconds apart in the same
    interleaved pass), then the median and quartiles over repeats: ``b t_1 / t_b`` per repeat. Drift of the shared
    host between passes cancels in each pair; the ratio of medians does not pair them.
    ``times``: batch size -> seconds per batch, repeat i at index i of every list."""
    small = min(times)
    out = {}
    for b, values in times.items():
        ratios = sorted(b / small * t1 / tb for t1, tb in zip(times[small], values, strict=True))
        q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        out[b] = {"paired_vs_batch_1": q[1], "paired_p25": q[0], "paired_p75": q[2]}
    return out


def saturation(rows: list[dict], tau: float, tokens: float) -> list[dict]:
    """Edge capacity with B requests always waiting, from the measured batched costs (module docstring)."""
    ms = {(r["kind"], r["batch"]): r["ms"] / 1e3 for r in rows}
    out = []
    for b in sorted({r["batch"] for r in rows}):
        target = b * tokens / (ms[("prefill", b)] + tokens * ms[("decode", b)])
        spec = b * tokens / (ms[("fused", b)] + max(tokens / tau - 1, 0.0) * ms[("verify", b)])
        separate = b * tokens / (ms[("prefill", b)] + tokens / tau * ms[("verify", b)])
        spec_decode = b * tau / ms[("verify", b)]  # prefill excluded
        target_decode = b / ms[("decode", b)]
        out.append({"batch": b, "target_only": target, "speculative": spec, "ratio": spec / target,
                    "separate_prefill": separate, "ratio_separate": separate / target,
                    "ratio_decode_only": spec_decode / target_decode})  # fmt: skip
    return out


def _from_run(path: str) -> tuple[float, float]:
    import json
    from pathlib import Path

    from covspec.errors import InputError

    file = Path(path) / "summary.json"
    if not file.is_file():
        raise InputError(f"--run {path}: no summary.json there (a covspec run results directory)")
    rows = {r["method"]: r for r in json.loads(file.read_text(encoding="utf-8"))}
    if "covspec" not in rows:
        raise InputError(f"{file}: no covspec row")
    row = rows["covspec"]
    return row["mean_accepted_length"], row["tokens"] / row["samples"]


@pipeline_main("edge_batching")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.edge_batching", description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--k", type=int, default=5, help="drafted tokens per verification")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--run", default=None, help="a covspec run's results directory: tau and tokens per request")
    parser.add_argument("--tau", type=float, default=None, help="mean accepted length of the speculative method")
    parser.add_argument("--tokens", type=float, default=None, help="generated tokens per request")
    add_config_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(args)
    batches = [int(b) for b in args.batches.split(",")]
    rows = measure(cfg, batches, args.k, args.repeats)
    match = "" if cfg.threads == cfg.cluster.edge_threads else (
        f" (covspec run's edge computes on cluster.edge_threads = {cfg.cluster.edge_threads}: "
        f"threads={cfg.cluster.edge_threads} to time it so)")  # fmt: skip
    print(f"edge batching on {cfg.models.target.path}, {cfg.threads} torch threads{match}, medians of {args.repeats}")
    print(f"{'kind':8} {'k':>3} {'batch':>5} {'ms/batch':>9} {'tokens/s':>9} {'vs batch 1':>10} "
          f"{'paired: median [p25-p75]':>25}")  # fmt: skip
    for r in rows:
        print(f"{r['kind']:8} {r['k']:>3} {r['batch']:>5} {r['ms']:>9.2f} {r['tokens_per_s']:>9.0f} "
              f"{r['vs_batch_1']:>9.2f}x {r['paired_vs_batch_1']:>10.2f}x [{r['paired_p25']:.2f}-"
              f"{r['paired_p75']:.2f}]")  # fmt: skip
    print(f"(prefill: sessions per second; fused: sessions per second, each prompt with a {args.k}-token first block "
          "in the same forward; paired: batch b over batch 1 within each repeat, median over repeats)")  # fmt: skip
    tau, tokens = _from_run(args.run) if args.run else (args.tau, args.tokens)
    if tau and tokens:
        print(f"\nedge capacity at saturation (tokens per edge second), tau={tau:.2f}, {tokens:.1f} tokens/request:")
        print(f"{'batch':>5} {'target_only':>12} {'speculative':>12} {'ratio':>7} {'separate prefill':>17} "
              f"{'ratio':>7} {'ratio w/o prefill':>18}")  # fmt: skip
        for r in saturation(rows, tau, tokens):
            print(
                f"{r['batch']:>5} {r['target_only']:>12.0f} {r['speculative']:>12.0f} {r['ratio']:>6.2f}x "
                f"{r['separate_prefill']:>17.0f} {r['ratio_separate']:>6.2f}x {r['ratio_decode_only']:>17.2f}x"
            )
        print(
            "(speculative: the first round fused into the prefill, as the edge runs it; separate prefill: "
            "prefill, then every round verified)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
