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


def test_a_rows_projected_bytes_are_its_requests_frames_resized():
    """An ablation talks to the edge as covspec: its projected bytes are those of the frames it sent and got (a
    MoreCandidates included, which only covspec sends), re-sized for the real vocabulary, whatever its name."""
    from covspec.data.shapes import load_split
    from covspec.protocol import (
        PROJECTED_VOCAB,
        MoreCandidates,
        Projection,
        TrafficCounter,
        VerifyRequest,
        VerifyResponse,
        encode,
        new_session_id,
        projected_frame_bytes,
    )
    from covspec.runtime.device import RequestResult
    from pipelines.bench import result_row

    sample, sid = load_split("test", 1)[0], new_session_id()
    frames = [("up", VerifyRequest(sid, 0, [5, 6, 7], 0, -1, b"\0" * 12)), ("up", MoreCandidates(sid, 0)),
              ("down", VerifyResponse(sid, 0, 1, -1, [8, 9], b"\0" * 8))]  # fmt: skip
    traffic = TrafficCounter(Projection(PROJECTED_VOCAB, 50))
    for direction, msg in frames:
        traffic.record(direction, msg, len(encode(msg)))
    r = RequestResult("covspec_no_tree", [5, 6, 7, 8], "", 0.1, 0.05, rounds=1, traffic=traffic)
    row = result_row(sample, "covspec_no_tree", r)
    want = sum(projected_frame_bytes(m, PROJECTED_VOCAB, 50) for _, m in frames)
    assert row["projected_bytes_decoding"] == want > traffic.decoding_bytes
