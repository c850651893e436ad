"""A tuned config against the default one, side by side on the test split (the search only saw val samples).

    python -m pipelines.tune_compare BEST.yaml [--base CONFIG] [key=value ...] [--out compare.json]

One process, one target/draft pair: for each test sample, target_only, covspec with the base config and covspec with
``BEST.yaml`` run back to back (their order rotating from sample to sample), through the same emulated link (the base
config's ``link``, unless overridden) and with the same link seed. The data section comes from the base config
(default: the embedded default, 20 test samples); ``key=value`` overrides apply to both configs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from covspec.cli import pipeline_main
from covspec.config import Config, load_config

ROWS = ("target_only", "covspec (base)", "covspec (tuned)")


def compare(base: Config, tuned: Config, progress=None) -> list[dict[str, Any]]:
    """Per-row summaries: tokens/s, speedup over target_only, bytes/token, accepted length, identity, exact match."""
    from covspec.data import load_benchmark
    from covspec.data.metrics import exact_match
    from covspec.runtime.edge import Edge
    from covspec.runtime.engine import LocalEngine

    if tuned.models != base.models:
        raise ValueError("the tuned config must use the base config's models")
    tuned.data, tuned.link, tuned.generation, tuned.seed = base.data, base.link, base.generation, base.seed
    samples = load_benchmark(base.data, seed=base.seed)
    engine = LocalEngine.from_config(base)
    other = LocalEngine(tuned, engine.target, engine.draft, Edge(engine.target))
    runs = {"target_only": (engine, "target_only"), "covspec (base)": (engine, "covspec"),
            "covspec (tuned)": (other, "covspec")}  # fmt: skip
    for engine_, method in runs.values():  # unmeasured: first calls pay lazy initialization (kernels, caches)
        engine_.run(method, samples[0].image(), samples[0].question, link_seed=base.seed)
    sums: dict[str, dict[str, float]] = {name: defaultdict(float) for name in ROWS}
    for i, sample in enumerate(samples):
        image = sample.image()
        seed = base.seed * 100_003 + i
        order = ROWS[i % 3 :] + ROWS[: i % 3]
        results = {name: runs[name][0].run(runs[name][1], image, sample.question, link_seed=seed) for name in order}
        reference = results["target_only"].token_ids
        for name, r in results.items():
            m, s = r.metrics(), sums[name]
            s["samples"] += 1
            s["tokens"] += m["num_tokens"]
            s["latency_s"] += m["latency_s"]
            s["bytes"] += m["bytes_up"] + m["bytes_down"]
            s["rounds"] += m["rounds"]
            s["accepted"] += m["num_accepted"]
            s["identical"] += r.token_ids == reference
            s["exact"] += exact_match(r.text, sample.answer)
        if progress:
            progress()
    base_tps = sums["target_only"]["tokens"] / sums["target_only"]["latency_s"]
    out = []
    for name in ROWS:
        s = sums[name]
        tps = s["tokens"] / max(s["latency_s"], 1e-9)
        out.append({
            "row": name, "samples": int(s["samples"]), "tokens_per_s": tps, "speedup": tps / base_tps,
            "bytes_per_token": s["bytes"] / max(s["tokens"], 1),
            "mean_accepted_length": 1 + s["accepted"] / s["rounds"] if name != "target_only" and s["rounds"] else None,
            "identical_to_target_only": s["identical"] / s["samples"], "exact_match": s["exact"] / s["samples"],
        })  # fmt: skip
    return out


@pipeline_main("tune_compare")
def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from covspec.errors import CovspecError

    parser = argparse.ArgumentParser(prog="python -m pipelines.tune_compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("best", type=Path, help="the tuned config (e.g. results/tune/<name>/best.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to both configs")
    parser.add_argument("--base", default=None, help="the base config (default: the embedded default)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        base = load_config(args.base, args.overrides)
        tuned = load_config(args.best, args.overrides)
        rows = compare(base, tuned)
    except CovspecError as err:
        print(f"tune_compare: error: {err}", file=sys.stderr)
        return 2
    table = Table(title=f"{rows[0]['samples']} samples of {base.data.label()}, link rtt "
                  f"{base.link.rtt_ms:g} ms; tuned: {args.best}")  # fmt: skip
    cols = [("row", "row", "s"), ("tok/s", "tokens_per_s", ".1f"), ("vs target-only", "speedup", ".3f"),
            ("B/tok", "bytes_per_token", ".1f"), ("acc.len", "mean_accepted_length", ".2f"),
            ("=target", "identical_to_target_only", ".0%"), ("EM", "exact_match", ".1%")]  # fmt: skip
    for title, _, _ in cols:
        table.add_column(title, justify="left" if title == "row" else "right")
    for row in rows:
        table.add_row(*["-" if row[k] is None else format(row[k], spec) for _, k, spec in cols])
    Console(width=160).print(table)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
