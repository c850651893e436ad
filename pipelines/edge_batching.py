"""Edge batching benchmark: verified tokens per second of one batched target forward, by batch size.

    python -m pipelines.edge_batching [CONFIG] [key=value ...] [--batches 1,4,8,16] [--k 5] [--repeats 20]

Opens ``max(batches)`` real sessions on an ``Edge`` (the toy target by default; the prompts of the benchmark's
samples, so their lengths differ), then times ``Edge.process`` on batches of VerifyRequests (k drafted tokens each,
greedy) and of target_only decode steps, interleaving the batch sizes so machine noise hits them alike. Every
verify is undone after it is timed (the sessions are re-opened), so each measurement sees the same cache lengths.
Prints medians: ms per batch, verified (scored) tokens per second, and the ratio to batch 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from covspec.cli import add_config_arguments, config_from_args
from covspec.data import load_benchmark
from covspec.models.loading import load_adapter
from covspec.protocol import OpenSession, VerifyRequest, decode, encode, new_session_id
from covspec.protocol.messages import ErrorReply
from covspec.runtime.device import png_bytes
from covspec.runtime.edge import Edge, Frame


def _open(edge: Edge, target, sample, max_new_tokens: int) -> str:
    sid = new_session_id()
    ids = target.prepare(sample.image(), sample.question).input_ids.tolist()
    msg = OpenSession(sid, "covspec", ids, png_bytes(sample.image()), "png", 0.0, 1.0, max_new_tokens, 0, 4)
    for reply, _ in edge.process([Frame(encode(msg))])[0]:
        if isinstance(reply, ErrorReply):
            raise RuntimeError(reply.message)
    return sid


def measure(cfg, batches: list[int], k: int, repeats: int) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    m = cfg.models.target
    target = load_adapter(m.path, m.dtype, m.device, key="models.target.path")
    edge = Edge(target)
    n = max(batches)
    samples = load_benchmark(cfg.data, seed=cfg.seed)
    samples = [samples[i % len(samples)] for i in range(n)]
    times: dict[tuple[str, int], list[float]] = {(kind, b): [] for kind in ("verify", "decode") for b in batches}
    for _ in range(repeats):
        for b in batches:
            for kind, width in (("verify", k), ("decode", 1)):
                sids = [_open(edge, target, s, 64) for s in samples[:b]]
                # a different draft per session: the rows are real tokens of the vocabulary
                frames = [Frame(encode(VerifyRequest(sid, 0, [(7 * i + j) % 40 + 5 for j in range(width)],
                                                     committed_len=0, last_token=-1)))
                          for i, sid in enumerate(sids)]  # fmt: skip
                t = time.perf_counter()
                out = edge.process(frames)
                times[(kind, b)].append(time.perf_counter() - t)
                for replies in out:
                    for _msg, frame in replies:
                        if isinstance(decode(frame), ErrorReply):
                            raise RuntimeError(f"edge refused a benchmark frame: {decode(frame)}")
                edge.sessions.clear()
    rows = []
    for kind, width in (("verify", k), ("decode", 1)):
        base = None
        for b in batches:
            med = statistics.median(times[(kind, b)])
            tps = b * width / med
            base = base or tps
            rows.append({"kind": kind, "k": width, "batch": b, "ms": med * 1e3, "tokens_per_s": tps,
                         "vs_batch_1": tps / base})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.edge_batching", description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--k", type=int, default=5, help="drafted tokens per verification")
    parser.add_argument("--repeats", type=int, default=20)
    add_config_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(args)
    batches = [int(b) for b in args.batches.split(",")]
    rows = measure(cfg, batches, args.k, args.repeats)
    print(f"edge batching on {cfg.models.target.path}, {cfg.threads} torch threads, medians of {args.repeats}")
    print(f"{'kind':8} {'k':>3} {'batch':>5} {'ms/batch':>9} {'tokens/s':>9} {'vs batch 1':>10}")
    for r in rows:
        print(f"{r['kind']:8} {r['k']:>3} {r['batch']:>5} {r['ms']:>9.2f} {r['tokens_per_s']:>9.0f} "
              f"{r['vs_batch_1']:>9.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
