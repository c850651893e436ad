"""`covspec bench` end to end: every method on the same samples, per-request JSONL, the table; the edge on a thread
of this process or in its own process."""

from __future__ import annotations

import json

import pytest

from covspec.cli import main


@pytest.mark.parametrize("edge", ["thread", "process"])
def test_bench_runs_the_methods_side_by_side(edge, tmp_path, capsys, monkeypatch):
    import covspec.runtime.engine as engine_module
    import pipelines.bench as bench_module
    from covspec.runtime.edge_process import EdgeProcess

    events: list[str] = []  # the order this process loads models and the edge process ends in
    for module in (engine_module, bench_module):
        real = module.load_adapter

        def recording(path, *args, key="models.target.path", _real=real, **kwargs):
            events.append(f"load {key}")
            return _real(path, *args, key=key, **kwargs)

        monkeypatch.setattr(module, "load_adapter", recording)
    real_close = EdgeProcess.close

    def closing(self, *args, **kwargs):
        events.append("edge process closed")
        return real_close(self, *args, **kwargs)

    monkeypatch.setattr(EdgeProcess, "close", closing)
    out = tmp_path / "bench.jsonl"
    argv = ["bench", "data.limit=2", "generation.max_new_tokens=12", "threads=1",
            "methods=[target_only,vanilla_sd,covspec]", "--out", str(out), "--edge", edge]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    methods = ["target_only", "vanilla_sd", "covspec", "hf_assisted"]
    assert sorted({r["method"] for r in rows}) == sorted(methods)
    assert len(rows) == 2 * len(methods)  # one row per sample and method, the HF peer's included
    reference = {r["sample_id"]: r["token_ids"] for r in rows if r["method"] == "target_only"}
    for r in rows:
        assert r["token_ids"] == reference[r["sample_id"]], r["method"]  # greedy: every method is target-exact
    assert all({"tree_rounds", "tree_hits", "tree_nodes"} <= r.keys() for r in rows if r["method"] == "covspec")
    if edge == "process":  # one copy of the target at a time: this process loads it once the edge process is gone
        assert events == ["load models.draft.path", "edge process closed", "load models.target.path"]
        assert [r["method"] for r in rows][-2:] == ["hf_assisted"] * 2  # the HF peer's pass, after the methods
    else:
        assert events == ["load models.target.path", "load models.draft.path"]
        assert [r["method"] for r in rows][:4] == methods  # interleaved, sample by sample
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
