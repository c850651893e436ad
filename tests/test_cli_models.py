"""``covspec generate`` and ``covspec eval`` end to end on the shipped toy pair, checked against plain transformers.

The reference is ``LlavaForConditionalGeneration.generate(do_sample=False)`` on inputs built by the checkpoint's own
processor and chat template: greedy decoding is deterministic, so the CLI must print exactly its answer, whatever
the method (speculative decoding at temperature 0 is lossless).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from covspec.cli import main
from covspec.data.metrics import exact_match, token_f1
from covspec.data.shapes import KINDS, Sample, load_split, make_sample
from covspec.models.loading import BUILTIN

MAX_NEW_TOKENS = 48  # generation.max_new_tokens default
FAST = ["threads=1"]  # config override appended to every command: one torch thread, like the rest of the tests


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Private copies of the shipped pair, so that a training run rewriting the assets cannot change the
    target between the reference and the CLI runs."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {role: Path(shutil.copytree(BUILTIN[f"toy-{role}"], folder / f"toy-{role}")) for role in ("target", "draft")}


@pytest.fixture(scope="module")
def pair_args(checkpoints) -> list[str]:
    """Config overrides appended to every command that loads models."""
    return [f"models.target.path={checkpoints['target']}", f"models.draft.path={checkpoints['draft']}", *FAST]


@pytest.fixture(scope="module")
def hf_target(checkpoints):
    """(processor, model) of the toy target, loaded with plain transformers."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(1)
    path = checkpoints["target"]
    return AutoProcessor.from_pretrained(path), LlavaForConditionalGeneration.from_pretrained(path).eval()


def hf_greedy(hf_target, image, question: str) -> tuple[str, list[int]]:
    """Plain-transformers greedy answer and its new token ids without the final EOS."""
    processor, model = hf_target
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    enc = processor(images=image, text=text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    eos = processor.tokenizer.eos_token_id
    ids = new[: new.index(eos)] if eos in new else new
    return processor.tokenizer.decode(new, skip_special_tokens=True), ids


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """PNG files of test samples 0..4 (``test-<i>.png``)."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(len(KINDS)):
        make_sample("test", i).image().save(folder / f"test-{i}.png")
    return folder


def _question(sample: Sample, which: str) -> str:
    """The benchmark's question, or one written here about a shape that is in the image."""
    shape = sample.scene.shapes[0]
    if which == "benchmark":
        return sample.question
    if which == "own":  # not a benchmark template, but every word is in the toy vocabulary
        return f"What color is the {shape.kind} in the {shape.position}?"
    assert which == "own-unknown-words"  # "of", "it" and "Is" are <unk> to the toy tokenizer
    return f"What is in the {shape.position} of the image? Is it a {shape.color} {shape.kind}?"


def _generate(capsys, pair_args: list[str], *args: str) -> str:
    assert main(["generate", *args, *pair_args]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.out


# -- 1. same answer as plain transformers ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("index", "which"), [(0, "benchmark"), (1, "own"), (2, "own-unknown-words")])
def test_generate_prints_the_transformers_greedy_answer(capsys, hf_target, pair_args, image_dir, index, which):
    sample = make_sample("test", index)
    question = _question(sample, which)
    path = image_dir / f"test-{index}.png"
    expected, _ = hf_greedy(hf_target, sample.image(), question)
    assert expected.strip(), "the reference answer is empty: nothing is compared"
    out = _generate(capsys, pair_args, "--image", str(path), "--question", question)
    assert out.strip() == expected.strip()
    assert out.count("\n") == 1


# -- 2. --json, and every target-exact method gives the same tokens -----------------------------------------------


@pytest.mark.slow
def test_json_output_and_methods_agree_with_greedy(capsys, hf_target, pair_args, image_dir):
    index = KINDS.index("describe")  # the longest answers: several speculative rounds
    sample = make_sample("test", index)
    path = str(image_dir / f"test-{index}.png")
    expected_text, expected_ids = hf_greedy(hf_target, sample.image(), sample.question)

    results = {}
    for method in (None, "covspec", "target_only"):
        extra = ["--method", method] if method else []
        out = _generate(capsys, pair_args, "--image", path, "--question", sample.question, "--json", *extra)
        assert out.count("\n") == 1, "--json prints exactly one line"
        result = json.loads(out)
        assert {"answer", "token_ids", "metrics"} <= result.keys()
        assert isinstance(result["metrics"], dict)
        assert result["metrics"]["num_tokens"] == len(result["token_ids"])
        assert all(isinstance(t, int) for t in result["token_ids"])
        results[method or "default"] = result

    assert results["default"]["token_ids"] == expected_ids
    assert results["default"]["answer"].strip() == expected_text.strip()
    for method in ("covspec", "target_only"):
        assert results[method]["token_ids"] == results["default"]["token_ids"], method
        assert results[method]["answer"] == results["default"]["answer"], method
    assert results["covspec"]["metrics"]["rounds"] >= 1


# -- 3. user errors: exit 2, one line, no traceback --------------------------------------------------------------


# (--image, --question, more arguments, strings the error line must contain); "{...}" are filled in by the test
GENERATE_ERRORS = [
    pytest.param("/nonexistent/scene.png", "hi", [], ["'/nonexistent/scene.png' does not exist"], id="missing-image"),
    pytest.param("{text_file}", "hi", [], ["{text_file}", "not an image"], id="not-an-image"),
    pytest.param("{folder}", "hi", [], ["{folder}", "not a file"], id="directory"),
    pytest.param("{image}", "", [], ["question is empty"], id="empty-question"),
    pytest.param("{image}", "  \t ", [], ["question is empty"], id="blank-question"),
    pytest.param("{image}", "a" * 600, [], ["question is too long", "600 characters"], id="long-question"),
    pytest.param(
        "{image}",
        "hi",
        ["models.target.path=/nonexistent/dir"],
        ["models.target.path", "/nonexistent/dir"],
        id="no-target-ckpt",
    ),
    pytest.param(
        "{image}",
        "hi",
        ["--model", "draft", "models.draft.path=/nonexistent/dir"],
        ["models.draft.path", "/nonexistent/dir"],
        id="no-draft-ckpt",
    ),
    pytest.param("{image}", "hi", ["generation.top_p=1.5"], ["generation.top_p", "1.5"], id="bad-config-value"),
    pytest.param("{image}", "hi", ["--method", "nope"], ["--method", "'nope'"], id="unknown-method"),
    pytest.param("{image}", " ", ["--method", "covspec"], ["question is empty"], id="empty-question-covspec"),
]


def _assert_one_line_error(capsys, code: int, names: list[str]) -> None:
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "Traceback" not in captured.err
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("covspec: error: "), captured.err
    for name in names:
        assert name in captured.err, (name, captured.err)


@pytest.mark.parametrize(("image", "question", "more", "names"), GENERATE_ERRORS)
def test_generate_user_errors(capsys, image_dir, tmp_path, image: str, question: str, more: list, names: list):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image\n", encoding="utf-8")
    fill = {"image": str(image_dir / "test-0.png"), "text_file": str(text_file), "folder": str(image_dir)}
    code = main(["generate", "--image", image.format(**fill), "--question", question, *more, *FAST])
    _assert_one_line_error(capsys, code, [name.format(**fill) for name in names])


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["data.split=nope"], ["data.split", "'nope'"]),
        (["data.limit=0"], ["data.limit", "0"]),
        (["models.target.path=/nonexistent/dir"], ["models.target.path", "/nonexistent/dir"]),
    ],
)
def test_eval_user_errors(capsys, argv: list[str], names: list[str]):
    _assert_one_line_error(capsys, main(["eval", *argv, *FAST]), names)


def test_question_with_an_image_token_is_not_a_crash(capsys, image_dir):
    code = main(["generate", "--image", str(image_dir / "test-0.png"), "--question", "What is <image>?", *FAST])
    captured = capsys.readouterr()
    assert code in (0, 2)
    assert "Traceback" not in captured.err


def test_module_run_prints_no_traceback():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "covspec.cli", "generate", "--image", "/nonexistent.png", "--question", "hi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2  # non-zero: the user-error status
    assert "Traceback" not in proc.stderr
    assert proc.stderr == "covspec: error: image file '/nonexistent.png' does not exist\n"
    assert proc.stdout == ""


# -- 4. eval -----------------------------------------------------------------------------------------------------


def _table_rows(out: str) -> dict[str, list[str]]:
    """Body rows of a rich table: first cell -> the other cells."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0] not in ("", "kind"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_eval_prints_per_kind_rows_and_all(capsys, hf_target, pair_args, checkpoints):
    n = len(KINDS)
    assert main(["eval", f"data.limit={n}", *pair_args]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    title = "".join(captured.out.split("┏")[0].split())  # rich wraps the title to the console width
    assert f"target({checkpoints['target']})onshapes/test,{n}samples" in title
    rows = _table_rows(captured.out)
    assert list(rows) == [*sorted(KINDS), "all"]

    # the scores are those of the plain-transformers greedy answers
    samples = load_split("test", n)
    scores = {}
    for sample in samples:
        answer, _ = hf_greedy(hf_target, sample.image(), sample.question)
        scores[sample.kind] = (exact_match(answer, sample.answer), token_f1(answer, sample.answer))
    for kind, (em, f1) in scores.items():
        assert rows[kind] == ["1", f"{em:.1%}", f"{f1:.3f}"], kind
    mean_em = sum(em for em, _ in scores.values()) / n
    mean_f1 = sum(f1 for _, f1 in scores.values()) / n
    assert rows["all"] == [str(n), f"{mean_em:.1%}", f"{mean_f1:.3f}"]


@pytest.mark.slow
def test_eval_limit_2_has_a_row_per_kind_present(capsys, pair_args):
    assert main(["eval", "data.limit=2", *pair_args]) == 0
    rows = _table_rows(capsys.readouterr().out)
    kinds = sorted({s.kind for s in load_split("test", 2)})
    assert list(rows) == [*kinds, "all"]
    assert rows["all"][0] == "2"
    assert sum(int(rows[k][0]) for k in kinds) == 2


def test_eval_scores_mmbench_per_question_under_circular_eval(capsys, tmp_path, monkeypatch):
    """`covspec eval data.circular=true`: the score column counts a question only if every rotated copy is right. A
    model that always answers "A" is right on 2 of the 3 plain questions and on none under CircularEval."""
    import base64
    import csv
    import io
    from types import SimpleNamespace

    from PIL import Image

    import covspec.commands as commands

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    tsv = tmp_path / "MMBench_DEV_EN.tsv"
    with tsv.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "answer", "category", "image"])
        writer.writerow(["1", "Color?", "", "green", "red", "blue", "B", "color", image])
        writer.writerow(["2", "Square?", "", "yes", "no", "", "A", "shape", image])
        writer.writerow(["3", "Shown?", "", "a square", "a circle", "", "A", "shape", image])

    always_a = SimpleNamespace(prepare=lambda image, question: None, decode=lambda ids: "A")
    monkeypatch.setattr(commands, "load_role", lambda cfg, role: always_a)
    monkeypatch.setattr(commands, "generate", lambda *args: SimpleNamespace(token_ids=[]))
    base = ["eval", "data.benchmark=mmbench", f"data.path={tsv}", "data.split=val", *FAST]
    assert main(base) == 0
    plain = _table_rows(capsys.readouterr().out)
    assert plain["all"][:2] == ["3", "66.7%"] and plain["shape"][:2] == ["2", "100.0%"]
    assert main([*base, "data.circular=true"]) == 0
    circular = _table_rows(capsys.readouterr().out)
    assert circular["all"][:2] == ["7", "0.0%"] and circular["shape"][:2] == ["4", "0.0%"]
