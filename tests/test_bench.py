"""`covspec bench` end to end: every method on the same samples, per-request JSONL, the table; the edge on a thread
of this process or in its own process."""

from __future__ import annotations

import json

import pytest

from covspec.cli import main


@pytest.mark.parametrize("edge", ["thread", "process"])
def test_bench_runs_the_methods_side_by_side(edge, tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    argv = ["bench", "data.limit=2", "generation.max_new_tokens=12", "threads=1",
            "methods=[target_only,vanilla_sd,covspec]", "--out", str(out), "--edge", edge]  # fmt: skip
    if edge == "process":
        argv.append("--no-hf-assisted")
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    methods = ["target_only", "vanilla_sd", "covspec"] + (["hf_assisted"] if edge == "thread" else [])
    assert sorted({r["method"] for r in rows}) == sorted(methods)
    assert len(rows) == 2 * len(methods)  # one row per sample and method, the HF peer's included
    reference = {r["sample_id"]: r["token_ids"] for r in rows if r["method"] == "target_only"}
    for r in rows:
        assert r["token_ids"] == reference[r["sample_id"]], r["method"]  # greedy: every method is target-exact
    assert all({"tree_rounds", "tree_hits", "tree_nodes"} <= r.keys() for r in rows if r["method"] == "covspec")
    printed = "".join(capsys.readouterr().out.split())  # rich wraps the title
    assert f"edgeina{edge}" in printed and "covspec" in printed


def test_an_ablations_projected_bytes_use_its_wire_mode():
    """An ablation talks to the edge as covspec: its projected bytes (MoreCandidates included, which only covspec
    sends) are covspec's formula, not an error about an unknown mode."""
    from covspec.data.shapes import load_split
    from covspec.protocol import Round, projected_decoding_bytes
    from covspec.runtime.device import RequestResult
    from pipelines.bench import PROJECTED_VOCAB, result_row

    sample = load_split("test", 1)[0]
    rounds = [Round(4, 1, 2), Round(3, 3)]
    r = RequestResult("covspec_no_tree", [5, 6, 7, 8, 9, 10], "", 0.1, 0.05, rounds=2, round_log=rounds)
    row = result_row(sample, "covspec_no_tree", r, 50, True, 2, "covspec")
    want = projected_decoding_bytes("covspec", rounds, PROJECTED_VOCAB, sampling=True, num_candidates=2)["total"]
    assert row["projected_bytes_decoding"] == want
