"""Visual token pruning: scores on constructed inputs, selectors, pruners, config refusal, engine equality."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from covspec.config import PruningConfig, ScoreWeights, load_config
from covspec.data.shapes import load_split
from covspec.decoding.autoregressive import generate
from covspec.errors import ConfigError
from covspec.models.tiny import TINY_SPECS, tiny_llava
from covspec.protocol import ErrorReply, OpenSession, ProtocolError, decode, encode, expected_bytes, new_session_id
from covspec.pruning import PRUNERS, AttentionPruner, JointPruner, RandomPruner, build_pruner
from covspec.pruning import scores as S
from covspec.pruning.probe import probe_attention, question_rows, visual_positions
from covspec.pruning.select import greedy_diverse, lattice_cells, num_kept, stratified_top, top_k, uniform_grid
from covspec.runtime.device import png_bytes
from covspec.runtime.edge import Edge
from covspec.runtime.engine import LocalEngine, colocated_profile

# -- scores on constructed inputs ------------------------------------------------------------------


def _unique_tokens(n: int, h: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, h, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("n", "h"), [(20, 64), (60, 16)])  # token-space and feature-space formulas
def test_duplicated_tokens_get_low_lowrank_scores(n, h):
    x = _unique_tokens(n, h)
    x[n - 4 :] = x[3]  # token 3 and four exact copies of it
    scores = S.lowrank_dependency(x)
    dup = torch.tensor([3, *range(n - 4, n)])
    unique = torch.tensor([i for i in range(n) if i not in dup.tolist()])
    assert scores[dup].max() < scores[unique].min()
    assert scores.min() >= 0 and scores.max() == pytest.approx(1.0)


def test_lowrank_matches_the_leave_one_out_residual():
    """d_i = min_b ||u_i - U_{-i}^T b||^2 + lam ||b||^2, up to the min-max normalization."""
    x = _unique_tokens(12, 8, seed=1)
    lam = 0.3
    u = x / x.norm(dim=1, keepdim=True)
    direct = []
    for i in range(12):
        others = torch.cat([u[:i], u[i + 1 :]])  # [11, 8]
        b = torch.linalg.solve(others @ others.T + lam * torch.eye(11), others @ u[i])
        direct.append(float((u[i] - others.T @ b).pow(2).sum() + lam * b.pow(2).sum()))
    assert torch.allclose(S.lowrank_dependency(x, ridge=lam), S.minmax(torch.tensor(direct)), atol=1e-4)


def test_token_aligned_with_the_question_is_most_relevant():
    visual = _unique_tokens(30, 32)
    question = _unique_tokens(5, 32, seed=2)
    visual[17] = 4.0 * question[2]
    rel = S.embedding_relevance(visual, question)
    assert int(rel.argmax()) == 17 and float(rel[17]) == 1.0
    attn = torch.full((2, 5, 30), 0.01)
    attn[:, :, 9] = 0.5  # every head and row attends to token 9
    assert int(S.attention_relevance(attn).argmax()) == 9


def test_activity_and_normalization():
    x = _unique_tokens(10, 8)
    x[4] *= 10
    act = S.token_activity(x)
    assert int(act.argmax()) == 4 and float(act.min()) == 0.0
    assert torch.equal(S.minmax(torch.full((5,), 3.0)), torch.zeros(5))


# -- selectors -------------------------------------------------------------------------------------


def _valid(keep: torch.Tensor, k: int, n: int) -> None:
    assert keep.dtype == torch.long and keep.shape == (k,)
    assert torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == k
    assert int(keep.min()) >= 0 and int(keep.max()) < n


def test_selectors_return_exactly_k_sorted_distinct():
    x = _unique_tokens(50, 16)
    x[10:30] = x[0]  # many duplicates
    scores = torch.rand(50, generator=torch.Generator().manual_seed(3))
    scores[7] = scores[8] = 2.0  # a tie
    for k in (1, 2, 7, 25, 49, 50):
        _valid(top_k(scores, k), k, 50)
        _valid(greedy_diverse(x, k), k, 50)
        _valid(greedy_diverse(x, k, scores, diversity=0.5), k, 50)
    for n in (144, 64, 50, 16, 7):
        for k in range(1, n + 1):
            _valid(uniform_grid(n, k), k, n)
            _valid(stratified_top(torch.rand(n), k), k, n)
    assert top_k(scores, 2).tolist() == [7, 8]
    assert top_k(torch.zeros(10), 3).tolist() == [0, 1, 2]  # ties: lower index first


def test_greedy_diversity_covers_clusters_before_repeating():
    centers = _unique_tokens(4, 16, seed=5)
    x = centers.repeat_interleave(10, dim=0) + 1e-3 * _unique_tokens(40, 16, seed=6)  # 4 clusters of 10
    keep = greedy_diverse(x, 4)
    assert sorted(i // 10 for i in keep.tolist()) == [0, 1, 2, 3]


def test_stratified_keeps_the_best_token_of_every_cell():
    cell, _ = lattice_cells(144, 14)
    assert sorted(cell.unique().tolist()) == list(range(14))
    scores = torch.rand(144, generator=torch.Generator().manual_seed(7))
    keep = stratified_top(scores, 14)
    assert sorted(cell[keep].tolist()) == list(range(14))  # one token per cell
    for c in range(14):
        members = torch.nonzero(cell == c).flatten()
        assert int(keep[cell[keep] == c]) == int(members[scores[members].argmax()])
    # A flat region keeps the uniform lattice's token.
    assert torch.equal(stratified_top(torch.zeros(144), 14), uniform_grid(144, 14))


def test_uniform_grid_is_spread_over_the_grid():
    keep = uniform_grid(144, 36)  # 12 x 12 grid, a 6 x 6 lattice of stride 2
    rows, cols = keep // 12, keep % 12
    assert sorted(set(rows.tolist())) == [1, 3, 5, 7, 9, 11] and sorted(set(cols.tolist())) == [1, 3, 5, 7, 9, 11]


def test_num_kept():
    assert num_kept(144, 1.0) == 144 and num_kept(144, 0.25) == 36 and num_kept(144, 0.1) == 14
    assert num_kept(144, 0.001) == 1 and num_kept(144, 0.5, keep_count=10) == 10 and num_kept(5, 0.5, 99) == 5


# -- pruners on a tiny model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    adapter = tiny_llava(TINY_SPECS[2], 3)  # 100 visual tokens, 3 layers, GQA
    sample = load_split("test", 1)[0]
    return adapter, sample


def test_every_pruner_returns_valid_indices_and_is_identity_at_1(tiny):
    adapter, sample = tiny
    for selection in ("greedy", "topk"):
        for relevance in ("attention", "embedding"):
            pruner = JointPruner(0.2, relevance=relevance, selection=selection)
            _valid(pruner.select(adapter, adapter.prepare(sample.image(), sample.question)), 20, 100)
    for name, cls in PRUNERS.items():
        for ratio in (0.5, 0.25, 0.1):
            inputs = adapter.prepare(sample.image(), sample.question)
            keep = cls(ratio).select(adapter, inputs)
            _valid(keep, num_kept(100, ratio), 100)
        assert cls(1.0).select(adapter, adapter.prepare(sample.image(), sample.question)) is None, name
        assert cls(0.5, keep_count=100).select(adapter, adapter.prepare(sample.image(), sample.question)) is None
        _valid(cls(1.0, keep_count=9).select(adapter, adapter.prepare(sample.image(), sample.question)), 9, 100)


def test_random_pruner_is_seeded(tiny):
    adapter, sample = tiny
    inputs = adapter.prepare(sample.image(), sample.question)
    a, b = RandomPruner(0.3, seed=4), RandomPruner(0.3, seed=4)
    first = [a.select(adapter, inputs).tolist() for _ in range(3)]
    assert first == [b.select(adapter, inputs).tolist() for _ in range(3)] and first[0] != first[1]


@pytest.mark.parametrize("layer", [0, 2])
def test_probe_attention_matches_the_models_eager_attention(tiny, layer):
    adapter, sample = tiny
    inputs = adapter.prepare(sample.image(), sample.question)
    rows = question_rows(inputs)
    ours = probe_attention(adapter, inputs, layer, rows)  # [heads, T, L]
    model = adapter.model
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.inference_mode():
            out = model(input_ids=inputs.input_ids[None], pixel_values=inputs.pixel_values, output_attentions=True)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    theirs = out.attentions[layer][0][:, rows]  # [heads, T, L]
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_attention_pruner_reads_the_probe_layer(tiny):
    adapter, sample = tiny
    inputs = adapter.prepare(sample.image(), sample.question)
    attn = probe_attention(adapter, inputs, 1)[:, :, visual_positions(inputs)]
    expected = top_k(S.attention_received(attn), 25)
    assert torch.equal(AttentionPruner(0.25, layer=1).select(adapter, inputs), expected)


# -- invalid ratios and weights --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("pruning.keep_ratio=0", "pruning.keep_ratio"),
        ("pruning.keep_ratio=1.5", "pruning.keep_ratio"),
        ("pruning.keep_ratio=-0.1", "pruning.keep_ratio"),
        ("pruning.keep_ratio=.nan", "pruning.keep_ratio"),
        ("pruning.weights.relevance=-1", "pruning.weights.relevance"),
        ("pruning.method=fastv", "pruning.method"),
    ],
)
def test_invalid_pruning_config_is_refused(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_all_zero_weights_are_refused():
    zeros = ["pruning.weights.relevance=0", "pruning.weights.activity=0", "pruning.weights.lowrank=0"]
    with pytest.raises(ConfigError, match=r"pruning\.weights"):
        load_config(overrides=zeros)


def test_build_pruner_and_constructors_refuse_bad_values():
    with pytest.raises(ConfigError, match=r"pruning\.keep_ratio"):
        build_pruner(PruningConfig(method="joint", keep_ratio=0.0))
    with pytest.raises(ConfigError, match=r"pruning\.weights\.lowrank"):
        build_pruner(PruningConfig(method="joint", keep_ratio=0.5, weights=ScoreWeights(lowrank=-2.0)))
    assert build_pruner(PruningConfig(method="none")) is None
    assert isinstance(build_pruner(PruningConfig(method="joint", keep_ratio=0.25)), JointPruner)
    for bad in (0, 0.0, -0.5, 1.01, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="keep_ratio"):
            JointPruner(bad)
        with pytest.raises(ValueError, match="keep_ratio"):
            RandomPruner(bad)
    with pytest.raises(ValueError, match=r"weights\.activity"):
        JointPruner(0.5, {"relevance": 1.0, "activity": -1.0, "lowrank": 0.0})
    with pytest.raises(ValueError, match="not all be zero"):
        JointPruner(0.5, {"relevance": 0, "activity": 0, "lowrank": 0})
    with pytest.raises(ValueError, match="exactly the keys"):
        JointPruner(0.5, {"relevance": 1.0})
    with pytest.raises(ValueError, match="keep_count"):
        JointPruner(0.5, keep_count=0)
    with pytest.raises(ValueError, match="selection"):
        JointPruner(0.5, selection="best")


# -- through the engine ----------------------------------------------------------------------------

PAIRS = {
    "other-draft": (TINY_SPECS[2], 2, TINY_SPECS[2], 5),
    "self-draft": (TINY_SPECS[2], 2, TINY_SPECS[2], 2),  # the target as its own draft: pruning is all that differs
}


def _engine(target, draft, edge, **pruning) -> LocalEngine:
    overrides = [f"pruning.{k}={v}" for k, v in pruning.items()] + ["generation.max_new_tokens=16"]
    return LocalEngine(load_config(overrides=overrides), target, draft, edge)


@pytest.mark.parametrize("pair", PAIRS)
def test_greedy_covspec_equals_target_only_under_every_pruner(pair):
    tspec, tseed, dspec, dseed = PAIRS[pair]
    target = tiny_llava(tspec, tseed)
    draft = target if tseed == dseed else tiny_llava(dspec, dseed)
    edge = Edge(target)
    samples = load_split("test", 2, offset=1)
    base = _engine(target, draft, edge)
    expected = {s.sample_id: base.run("target_only", s.image(), s.question, colocated_profile()).token_ids
                for s in samples}  # fmt: skip
    for s in samples:
        assert expected[s.sample_id] == generate(target, target.prepare(s.image(), s.question), 16).token_ids
    for method in PRUNERS:
        for ratio in (0.25, 0.1):
            engine = _engine(target, draft, edge, method=method, keep_ratio=ratio)
            for s in samples:
                r = engine.run("covspec", s.image(), s.question, colocated_profile())
                assert r.token_ids == expected[s.sample_id], (pair, method, ratio)
                m = r.metrics()
                assert m["visual_tokens"] == 100 and m["visual_tokens_kept"] == num_kept(100, ratio)
                assert m["pruner_s"] > 0 and m["draft_prefill_s"] > 0 and m["lossy"] is False
    assert not edge.sessions


def test_prune_target_is_lossy_and_labelled():
    target = tiny_llava(TINY_SPECS[2], 2)
    edge = Edge(target)
    sample = load_split("test", 1, offset=2)[0]
    engine = _engine(target, target, edge, method="joint", keep_ratio=0.25, prune_target="true")
    r = engine.run("covspec", sample.image(), sample.question, colocated_profile())
    assert r.lossy and r.metrics()["lossy"] is True
    inputs = target.prepare(sample.image(), sample.question)
    keep = engine.pruner.select(target, inputs)
    assert r.token_ids == generate(target, inputs, 16, keep=keep).token_ids  # the pruned target's own output
    assert r.num_accepted == r.num_drafted  # draft and target see the same tokens: every draft is accepted
    assert r.traffic.total("up", "upload") > 0
    unpruned = _engine(target, target, edge, method="none", prune_target="true").run(
        "covspec", sample.image(), sample.question
    )
    assert not unpruned.lossy  # nothing was pruned: not lossy


def _open(target, sample, keep) -> bytes:
    inputs = target.prepare(sample.image(), sample.question)
    msg = OpenSession(new_session_id(), "covspec", inputs.input_ids.tolist(), png_bytes(sample.image()), "png",
                      0.0, 1.0, 8, 0, 2, keep)  # fmt: skip
    return encode(msg)


def test_edge_validates_kept_indices():
    target = tiny_llava(TINY_SPECS[0], 0)  # 16 visual tokens
    edge = Edge(target)
    sample = load_split("test", 1)[0]
    for keep in ([3, 3], [5, 2]):
        with pytest.raises(ProtocolError, match="keep must be strictly increasing"):
            decode(_open(target, sample, keep))
    (reply, _), *_ = list(edge.handle(_open(target, sample, [0, 16])))
    assert isinstance(reply, ErrorReply) and reply.code == "invalid_field" and "keep" in reply.message
    (reply, _), *_ = list(edge.handle(_open(target, sample, [0, 5, 15])))
    assert type(reply).__name__ == "SessionOpened"
    assert edge.sessions[reply.session_id].state.pruned == 13


def test_open_session_bytes_formula_counts_keep():
    target = tiny_llava(TINY_SPECS[0], 0)
    sample = load_split("test", 1)[0]
    for keep in ([], [0, 5, 15], list(range(0, 200, 2))):
        frame = _open(target, sample, keep)
        msg = decode(frame)
        n = expected_bytes("OpenSession", msg.prompt_ids, len(msg.image), "covspec", max_new_tokens=8, seed=0,
                           num_candidates=2, keep=keep)  # fmt: skip
        assert n == len(frame), keep


def test_engine_builds_the_configured_pruner():
    target = tiny_llava(TINY_SPECS[0], 0)
    engine = _engine(target, target, Edge(target), method="diversity", keep_ratio=0.5)
    assert type(engine.pruner).__name__ == "DiversityPruner" and engine.pruner.keep_ratio == 0.5
    assert _engine(target, target, Edge(target), method="none").pruner is None
    cfg = dataclasses.replace(engine.cfg, pruning=PruningConfig(method="joint", keep_ratio=0.0))
    with pytest.raises(ConfigError, match=r"pruning\.keep_ratio"):
        LocalEngine(cfg, target, target, Edge(target))


# -- the evaluation pipeline -----------------------------------------------------------------------


def test_prune_eval_pipeline_end_to_end(tmp_path, capsys):
    from pipelines import prune_eval

    argv = ["data.limit=1", "generation.max_new_tokens=6", "threads=1", "tracking.enabled=false", "--ratios", "0.25",
            "--pruners",
            "joint,uniform", "--timing-samples", "1", "--out", str(tmp_path)]  # fmt: skip
    assert prune_eval.main(argv) == 0
    rows = (tmp_path / "prune_eval.csv").read_text().splitlines()
    assert rows[0].startswith("method,pruner,merge,keep_ratio") and len(rows) == 1 + 5  # none, 2 pruners x merge
    report = json.loads((tmp_path / "prune_eval.json").read_text())
    labels = [s["method"] for s in report["summary"]]
    assert labels == ["none", "joint+merge", "uniform+merge", "joint", "uniform"]
    for merge in (True, False):
        joint = next(s for s in report["summary"] if s["pruner"] == "joint" and s["merge"] is merge)
        assert joint["visual_tokens_kept"] == 36 and joint["identical_to_target_only"] == 1.0
        assert joint["pruner_ms"] > 0 and joint["draft_prefill_ms"] > 0
    assert "joint@0.25 accepted length vs unpruned >= 95%" in report["goals"]  # checked on the merging rows
    assert (tmp_path / "accepted_length_vs_keep_ratio.png").stat().st_size > 0
    # chains of a fixed gamma (adaptive drafting and branching depend on timing) unless asked for; the title says so
    used = report["config"]
    assert used["drafting"]["policy"] == "fixed" and used["branching"] == {**used["branching"], "budget": 0, "tree": 0}
    assert "gamma=5, chains, no wait-time branching" in capsys.readouterr().out
    argv = [*argv[: argv.index("--ratios")], "--ratios", "1", "--as-configured", "--out", str(tmp_path / "b")]
    assert prune_eval.main(argv) == 0
    used = json.loads((tmp_path / "b" / "prune_eval.json").read_text())["config"]
    assert used["drafting"]["policy"] == "adaptive" and used["branching"]["budget"] == used["branching"]["tree"] == 2
    assert "adaptive (tau=0.4), trees of 2, wait-time branching 2" in capsys.readouterr().out
    assert prune_eval.main(["--pruners", "fastv"]) == 2


def test_prune_scale_times_a_random_draft_of_the_given_shape(tmp_path, capsys):
    from pipelines import prune_scale

    argv = ["--hidden", "56", "--heads", "7", "--kv-heads", "1", "--layers", "1", "--intermediate", "64", "--side",
            "6", "--ratios", "0.25", "--pruners", "joint,random", "--samples", "1", "--repeats", "1", "--out",
            str(tmp_path)]  # fmt: skip
    assert prune_scale.main(argv) == 0
    report = json.loads((tmp_path / "prune_scale.json").read_text())
    assert report["visual_tokens"] == 36 and report["spec"]["hidden"] == 56 and report["spec"]["layers"] == 1
    by = {s["method"]: s for s in report["summary"]}
    assert list(by) == ["none", "joint+merge", "random+merge"]
    assert by["none"]["lm_prefill_ms"] is None and by["none"]["draft_prefill_ms"] > 0
    joint = by["joint+merge"]
    assert joint["pruner_ms"] > 0 and joint["vision_ms"] > 0 and joint["lm_prefill_ms"] > 0
    assert joint["prefill_saved_ms"] == pytest.approx(by["none"]["draft_prefill_ms"] - joint["draft_prefill_ms"])
    assert "pruner overhead / prefill saved" in capsys.readouterr().out
    assert prune_scale.main(["--pruners", "fastv"]) == 2
    assert prune_scale.main(["--layers", "0"]) == 2
    assert "--layers" not in capsys.readouterr().err  # a clear line, no argparse usage dump
