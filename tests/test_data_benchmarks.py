"""VQAv2 / MMBench / MMMU from fixture files written here in their official formats, their metrics, and the registry."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from covspec.config import SHAPES_KINDS, load_config
from covspec.data import load_benchmark
from covspec.data.choices import extract_choice, open_answer_match
from covspec.data.metrics import benchmark_score
from covspec.data.mmbench import load_mmbench
from covspec.data.mmmu import load_mmmu
from covspec.data.shapes import KINDS, load_split
from covspec.data.vqa_eval import normalize_answer, vqa_accuracy
from covspec.data.vqav2 import load_vqav2
from covspec.errors import ConfigError, InputError


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy and the official normalization.

TEN = ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"]


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("\tYes\n", "yes"),
        ("the dog", "dog"),
        ("A dog", "dog"),
        ("an apple", "apple"),
        ("Two", "2"),
        ("two dogs.", "2 dogs"),
        ("none", "0"),
        ("ten", "10"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("it isnt", "it isn't"),
        ("2.5", "2.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit-comma-digit: every listed mark is deleted, not spaced
        ("hot-dog", "hot dog"),  # a mark touching no space becomes a space
        ("no, it is not", "no it is not"),  # "," followed by a space is deleted
        ("red/white", "red white"),
        ("red / white", "red white"),  # "/" touches a space: deleted; words are re-joined by single spaces
        ("(yes)", "yes"),
        ("o'clock", "o'clock"),  # apostrophes are not punctuation here
    ],
)
def test_normalize_answer_follows_the_official_rules(text: str, normalized: str):
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("3", TEN, 1.0),  # 7 humans: every leave-one-out subset has >= 6 matches
        ("three", TEN, 1.0),
        ("2", TEN, 0.9),  # 3 humans: 3 subsets keep 2 (2/3), 7 keep 3 (1): (3 * 2/3 + 7) / 10
        ("Two", TEN, 0.9),
        ("two.", TEN, 0.9),
        ("4", TEN, 0.0),
        ("yes", ["yes"] + ["no"] * 9, 0.3),  # 1 human: 9 subsets of 1/3, one of 0
        ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),  # 2 humans: (8 * 2/3 + 2 * 1/3) / 10
        ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),
        ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),
        ("yes.", ["yes"] * 10, 1.0),
        ("the dog", ["dog"] * 10, 1.0),
        ("dont", ["don't"] * 10, 1.0),
        ("dog", ["the dog"] * 10, 0.0),  # human answers are not article-normalized (the annotations already are)
        ("yes", ["yes."] * 10, 0.0),  # unanimous humans are compared as given ...
        ("yes", ["yes."] * 5 + ["yes"] * 5, 1.0),  # ... disagreeing ones get punctuation processing first
    ],
)
def test_vqa_accuracy_matches_hand_computed_values(prediction: str, answers: list[str], expected: float):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_accuracy_refuses_no_answers():
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("yes", [])


# ---------------------------------------------------------------------------------------------------------------
# Choice extraction and the open-answer matcher.

ABCD = {"A": "a green apple", "B": "a red apple", "C": "a banana", "D": "a pear"}


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("b.", "B"),
        (" C ", "C"),
        ("The answer is B.", "B"),
        ("Answer: (C)", "C"),
        ("The correct option is D because pears are green", "D"),
        ("The answer is not A, the answer is B", "B"),  # the last explicit statement wins
        ("B. a red apple", "B"),
        ("(D) a pear", "D"),
        ("I think (C) fits best", "C"),
        ("It must be C", "C"),
        ("A red apple.", "B"),  # "A" is an article here; the option text decides
        ("It is a banana", "C"),
        ("E", None),  # not an offered letter
        ("A or B", None),  # two letters
        ("A is correct", "A"),
        ("I would say D", "D"),  # "I" is a pronoun here
        ("an orange", None),
        ("", None),
    ],
)
def test_extract_choice(prediction: str, expected: str | None):
    assert extract_choice(prediction, ABCD) == expected


def test_extract_choice_prefers_the_longest_nested_option_text():
    options = {"A": "red", "B": "dark red", "C": "blue"}
    assert extract_choice("It is dark red.", options) == "B"
    assert extract_choice("red or blue", options) is None


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("14", "14", True),
        ("The answer is 14 apples.", "14", True),
        ("2.50", "2.5", True),  # numbers compare after rounding to 2 decimals
        ("1000", "1,000", True),
        ("x = 3", "3", True),
        ("3.14159", "3.14", True),
        ("15", "14", False),
        ("The answer is 140", "14", False),  # numbers compare as numbers, not substrings
        ("The capital is Paris.", "paris", True),
        ("berlin", "paris", False),
        ("c", "c", True),
        ("cat", "c", False),  # a one-character reference must stand alone
        ("The value is 3.429", ["24/7", "3.429"], True),
        ("24/7", ["24/7", "3.429"], True),
        ("The value is 5\nso the answer is 10", "5", True),  # one key phrase per line
    ],
)
def test_open_answer_match(prediction: str, reference, expected: bool):
    assert open_answer_match(prediction, reference) is expected


# ---------------------------------------------------------------------------------------------------------------
# VQAv2.

VQA_QUESTIONS = [
    {"image_id": 42, "question": "How many dogs are there?", "question_id": 420},
    {"image_id": 42, "question": "Is it sunny?", "question_id": 421},
    {"image_id": 7, "question": "What color is the car?", "question_id": 70},
]


def vqa_annotation(qid: int, image_id: int, answers: list[str], answer_type: str) -> dict:
    return {
        "question_id": qid,
        "image_id": image_id,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(answers, 1)],
        "multiple_choice_answer": max(answers, key=answers.count),
        "answer_type": answer_type,
        "question_type": "how many",
    }


@pytest.fixture
def vqa_dir(tmp_path: Path) -> Path:
    root = tmp_path / "vqav2"
    (root / "val2014").mkdir(parents=True)
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": VQA_QUESTIONS}))
    annotations = [
        vqa_annotation(420, 42, TEN, "number"),
        vqa_annotation(421, 42, ["yes"] * 9 + ["no"], "yes/no"),
        vqa_annotation(70, 7, ["red"] * 10, "other"),
    ]
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    (root / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(png((255, 0, 0)))
    (root / "val2014" / "000000000007.jpg").write_bytes(png((0, 0, 255)))  # the plain name is accepted too
    return root


def test_vqav2_loads_questions_answers_and_images(vqa_dir: Path):
    samples = load_vqav2(vqa_dir, "val", limit=10)
    assert [s.sample_id for s in samples] == ["420", "421", "70"]
    first = samples[0]
    assert first.question == "How many dogs are there?\nAnswer the question using a single word or phrase."
    assert first.references == tuple(TEN) and first.answer == "3" and first.kind == "number"
    assert first.image().getpixel((0, 0)) == (255, 0, 0)
    assert samples[2].image().getpixel((0, 0)) == (0, 0, 255)
    assert first.score("Three.") == 1.0 and first.score("two") == pytest.approx(0.9)
    assert samples[1].score("no") == pytest.approx(0.3)


def test_vqav2_limit_and_offset(vqa_dir: Path):
    assert [s.sample_id for s in load_vqav2(vqa_dir, "val", limit=1, offset=1)] == ["421"]
    assert [s.sample_id for s in load_vqav2(vqa_dir, "val", limit=5, offset=2)] == ["70"]
    with pytest.raises(InputError, match=r"has 3 samples; data.offset=3 selects none"):
        load_vqav2(vqa_dir, "val", limit=1, offset=3)


def test_vqav2_split_selects_the_coco_files(vqa_dir: Path):
    with pytest.raises(InputError, match=r"VQAv2 questions file not found: .*v2_OpenEnded_mscoco_train2014_questions"):
        load_vqav2(vqa_dir, "train", limit=1)
    with pytest.raises(ConfigError, match=r"data.split must be 'train' or 'val' for data.benchmark=vqav2"):
        load_vqav2(vqa_dir, "test", limit=1)


def test_vqav2_missing_directory_and_annotations(vqa_dir: Path, tmp_path: Path):
    with pytest.raises(InputError, match=r"vqav2 data\.path directory not found"):
        load_vqav2(tmp_path / "nope", "val", limit=1)
    (vqa_dir / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(InputError, match=r"VQAv2 annotations file not found: .*v2_mscoco_val2014_annotations\.json"):
        load_vqav2(vqa_dir, "val", limit=1)


def test_vqav2_question_without_annotation_is_named(vqa_dir: Path):
    path = vqa_dir / "v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"^vqav2 v2_mscoco_val2014_annotations\.json: question_id 420 has no"):
        load_vqav2(vqa_dir, "val", limit=1)


def test_vqav2_malformed_files_and_entries_are_named(vqa_dir: Path):
    qpath = vqa_dir / "v2_OpenEnded_mscoco_val2014_questions.json"
    qpath.write_text('{"questions": [\n{"image_id": 42,}]}')
    with pytest.raises(InputError, match=r"v2_OpenEnded_mscoco_val2014_questions\.json: invalid JSON at line 2"):
        load_vqav2(vqa_dir, "val", limit=1)
    qpath.write_text(json.dumps({"items": []}))
    with pytest.raises(InputError, match=r"expected an object with a 'questions' list"):
        load_vqav2(vqa_dir, "val", limit=1)
    qpath.write_text(json.dumps({"questions": [VQA_QUESTIONS[0], {"image_id": 42, "question_id": 421}]}))
    with pytest.raises(InputError, match=r"questions\.json question 2: missing key 'question'"):
        load_vqav2(vqa_dir, "val", limit=2)
    qpath.write_text(json.dumps({"questions": [{**VQA_QUESTIONS[0], "question_id": "420"}]}))
    with pytest.raises(InputError, match=r"question 1: 'question_id' must be a int, got '420'"):
        load_vqav2(vqa_dir, "val", limit=1)


def test_vqav2_malformed_annotation_is_named(vqa_dir: Path):
    path = vqa_dir / "v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["answers"] = []
    data["annotations"][2]["image_id"] = 8
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"annotation 2 \(question_id 421\): 'answers' must be a non-empty list"):
        load_vqav2(vqa_dir, "val", limit=2)
    with pytest.raises(InputError, match=r"annotation 3 \(question_id 70\): image_id 8 differs from the question's 7"):
        load_vqav2(vqa_dir, "val", limit=1, offset=2)


def test_vqav2_missing_image_names_the_path(vqa_dir: Path):
    (vqa_dir / "val2014" / "000000000007.jpg").unlink()
    expected = re.escape(str(vqa_dir / "val2014" / "COCO_val2014_000000000007.jpg"))
    with pytest.raises(InputError, match=rf"image of question_id 70 not found: {expected}"):
        load_vqav2(vqa_dir, "val", limit=3)
    assert len(load_vqav2(vqa_dir, "val", limit=2)) == 2  # images outside the selection are not needed


# ---------------------------------------------------------------------------------------------------------------
# MMBench.

MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category"]


def mmb_rows() -> list[list[str]]:
    red, blue = base64.b64encode(png((255, 0, 0))).decode(), base64.b64encode(png((0, 0, 255))).decode()
    return [
        ["10", "What color is it?", "Look closely.\nIt is bright.", "green", "red", "blue", "black", "B",
         "color_recognition", red, "perception"],
        ["11", "Is it a square?", "nan", "yes", "no", "", "", "A", "shape", blue, "perception"],
        ["12", "What is shown?", "", "a square", "a circle", "a line", "", "A", "shape", "10", "perception"],
    ]  # fmt: skip


def write_tsv(path: Path, rows: list[list[str]], header: list[str] = MMB_HEADER) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def mmb_tsv(tmp_path: Path) -> Path:
    return write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmb_rows())


def test_mmbench_loads_prompts_options_and_images(mmb_tsv: Path):
    samples = load_mmbench(mmb_tsv, "val", limit=10)
    assert [s.sample_id for s in samples] == ["10", "11", "12"]
    first, second, third = samples
    assert first.question == (
        "Look closely.\nIt is bright.\nWhat color is it?\nA. green\nB. red\nC. blue\nD. black\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert first.kind == "color_recognition" and first.answer == "B"
    assert second.options == (("A", "yes"), ("B", "no"))  # empty / NaN cells: fewer options, no hint
    assert second.question.startswith("Is it a square?\nA. yes\nB. no\n")
    assert third.image().getpixel((0, 0)) == first.image().getpixel((0, 0)) == (255, 0, 0)  # image by index
    assert second.image().getpixel((0, 0)) == (0, 0, 255)
    assert [first.score(p) for p in ("B", "The answer is (B).", "red", "A", "C. blue")] == [1, 1, 1, 0, 0]


def test_mmbench_circular_eval_rotates_the_options_and_groups_the_copies(mmb_tsv: Path):
    samples = load_mmbench(mmb_tsv, "val", limit=2, circular=True)  # limit counts questions: 4 + 2 copies
    assert [s.sample_id for s in samples] == ["10", "10@1", "10@2", "10@3", "11", "11@1"]
    assert [s.group for s in samples] == ["10"] * 4 + ["11"] * 2
    assert [dict(s.options)["A"] for s in samples[:4]] == ["green", "red", "blue", "black"]
    assert [s.answer for s in samples[:4]] == ["B", "A", "D", "C"]  # the letter of "red" in each rotation
    assert all(dict(s.options)[s.answer] == "red" for s in samples[:4])
    assert samples[1].question.split("\n")[3:7] == ["A. red", "B. blue", "C. black", "D. green"]
    assert [(s.options, s.answer) for s in samples[4:]] == [((("A", "yes"), ("B", "no")), "A"),
                                                            ((("A", "no"), ("B", "yes")), "B")]  # fmt: skip
    assert samples[2].image_bytes == samples[0].image_bytes and "rotation 2" in samples[2].source
    plain = load_mmbench(mmb_tsv, "val", limit=2)
    assert [s.group for s in plain] == ["", ""] and plain[0] == dataclasses.replace(samples[0], group="")
    # always answering "A": right once per question under rotation, never on all copies
    always_a = [(s.group, s.score("A")) for s in samples]
    assert benchmark_score(always_a) == 0.0
    assert benchmark_score([(s.group, s.score("A")) for s in plain]) == 0.5
    assert benchmark_score([(s.group, s.score("red" if s.group == "10" else s.answer)) for s in samples]) == 1.0


def test_benchmark_score_counts_each_question_once():
    rows = [("10", 1.0), ("10", 0.0), ("11", 1.0), ("11", 1.0), ("", 1.0), ("", 0.0)]
    assert benchmark_score(rows) == 0.5  # 10 fails a copy; 11 right; two single questions, one right
    assert benchmark_score([("", 0.25), ("", 0.75)]) == 0.5  # no groups: the plain mean (VQA accuracy)
    assert benchmark_score([]) is None


def test_mmbench_limit_offset_and_directory_lookup(mmb_tsv: Path, tmp_path: Path):
    assert [s.sample_id for s in load_mmbench(mmb_tsv, "val", limit=1, offset=2)] == ["12"]
    assert [s.sample_id for s in load_mmbench(tmp_path, "val", limit=2)] == ["10", "11"]  # the one *_DEV* TSV
    with pytest.raises(InputError, match=r"no MMBench TSV for data.split=test in .*MMBench_TEST_EN\.tsv"):
        load_mmbench(tmp_path, "test", limit=1)
    write_tsv(tmp_path / "MMBench_DEV_CN.tsv", mmb_rows())
    with pytest.raises(InputError, match=r"several MMBench DEV TSVs .*MMBench_DEV_CN\.tsv, MMBench_DEV_EN\.tsv"):
        load_mmbench(tmp_path, "val", limit=1)
    with pytest.raises(ConfigError, match=r"data.split must be 'val' \(dev\) or 'test' for data.benchmark=mmbench"):
        load_mmbench(mmb_tsv, "train", limit=1)
    with pytest.raises(InputError, match=r"mmbench TSV file not found: .*missing\.tsv"):
        load_mmbench(tmp_path / "missing.tsv", "val", limit=1)


@pytest.mark.parametrize(
    ("row", "column", "value", "message"),
    [
        (1, "answer", "", r"MMBench_DEV_EN\.tsv row 2: column 'answer' is empty"),
        (1, "answer", "C", r"row 2 \(index 11\): answer 'C' is not one of the options A, B"),
        (0, "question", "nan", r"row 1: column 'question' is empty"),
        (1, "B", "", r"row 2 \(index 11\): needs at least 2 options, got 1"),
        (0, "image", "not base64!" * 10, r"row 1 \(index 10\): column 'image' is not valid base64"),
        (2, "image", "99", r"row 3 \(index 12\): column 'image' is neither base64 image data nor the index of a row"),
    ],
)
def test_mmbench_malformed_rows_are_named(tmp_path: Path, row: int, column: str, value: str, message: str):
    rows = mmb_rows()
    rows[row][MMB_HEADER.index(column)] = value
    tsv = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)
    with pytest.raises(InputError, match=message):
        load_mmbench(tsv, "val", limit=10)


def test_mmbench_missing_column_and_short_row(tmp_path: Path):
    header = [h for h in MMB_HEADER if h != "answer"]
    rows = [[c for i, c in enumerate(r) if MMB_HEADER[i] != "answer"] for r in mmb_rows()]
    tsv = write_tsv(tmp_path / "MMBench_TEST_EN.tsv", rows, header)
    with pytest.raises(InputError, match=r"MMBench_TEST_EN\.tsv: missing column 'answer' \(test TSVs carry no answers"):
        load_mmbench(tsv, "test", limit=1)
    rows = mmb_rows()
    rows[1] = rows[1][:5]
    tsv = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)
    with pytest.raises(InputError, match=r"row 2: expected 11 tab-separated fields, got 5"):
        load_mmbench(tsv, "val", limit=10)


def test_mmbench_undecodable_image_names_the_row(tmp_path: Path):
    rows = mmb_rows()
    rows[0][MMB_HEADER.index("image")] = base64.b64encode(b"not an image at all" * 5).decode()
    samples = load_mmbench(write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows), "val", limit=1)
    with pytest.raises(InputError, match=r"MMBench_DEV_EN\.tsv row 1 \(index 10\): the image cannot be decoded"):
        samples[0].image()


# ---------------------------------------------------------------------------------------------------------------
# MMMU.

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def mmmu_row(subject: str, n: int, qtype: str = "multiple-choice", options: str = "['$6', '$7', '$8']",
             answer: str = "B", image: bytes | None = None) -> dict:  # fmt: skip
    row = {
        "id": f"validation_{subject}_{n}",
        "question": f"<image 1> Question {n} of {subject}?",
        "options": options if qtype == "multiple-choice" else "[]",
        "explanation": "",
        "answer": answer,
        "question_type": qtype,
        "img_type": "['Tables']",
        "topic_difficulty": "Easy",
        "subfield": "Finance",
    }
    for i in range(1, 8):
        row[f"image_{i}"] = None
    row["image_2" if n % 2 else "image_1"] = {"bytes": image or png((0, 255, 0)), "path": "x.png"}
    return row


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [(k, pa.string()) for k in ("id", "question", "options", "explanation")]
        + [(f"image_{i}", IMAGE_TYPE) for i in range(1, 8)]
        + [(k, pa.string()) for k in ("img_type", "answer", "topic_difficulty", "question_type", "subfield")]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def mmmu_dir(tmp_path: Path) -> Path:
    root = tmp_path / "MMMU"
    write_parquet(
        root / "Accounting" / "validation-00000-of-00001.parquet",
        [mmmu_row("Accounting", 1), mmmu_row("Accounting", 2, "open", answer="['24/7', '3.429']")],
    )
    write_parquet(root / "Art" / "validation-00000-of-00001.parquet", [mmmu_row("Art", 1, "open", answer="14")])
    write_parquet(root / "Art" / "dev-00000-of-00001.parquet", [mmmu_row("Art", 9)])
    return root


def test_mmmu_loads_multiple_choice_and_open_questions(mmmu_dir: Path):
    samples = load_mmmu(mmmu_dir, "val", limit=10)
    assert [s.sample_id for s in samples] == ["validation_Accounting_1", "validation_Accounting_2", "validation_Art_1"]
    mc, open_list, open_num = samples
    assert mc.options == (("A", "$6"), ("B", "$7"), ("C", "$8")) and mc.metric == "choice"
    assert mc.question == (
        "<image 1> Question 1 of Accounting?\n\n(A) $6\n(B) $7\n(C) $8\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert mc.kind == "Accounting" and mc.image().getpixel((0, 0)) == (0, 255, 0)  # image_2 when image_1 is empty
    assert [mc.score(p) for p in ("B", "(B) $7", "$7", "A")] == [1, 1, 1, 0]
    assert open_list.references == ("24/7", "3.429") and open_list.metric == "open"
    assert open_list.question.endswith("\n\nAnswer the question using a single word or phrase.")
    assert open_list.score("The ratio is 3.429") == 1.0 and open_list.score("3.5") == 0.0
    assert open_num.score("The answer is 14.") == 1.0 and open_num.kind == "Art"


def test_mmmu_split_subjects_limit_and_offset(mmmu_dir: Path):
    assert [s.sample_id for s in load_mmmu(mmmu_dir, "train", limit=5)] == ["validation_Art_9"]  # dev files
    assert [s.sample_id for s in load_mmmu(mmmu_dir, "val", limit=5, subjects=["Art"])] == ["validation_Art_1"]
    assert [s.sample_id for s in load_mmmu(mmmu_dir, "val", limit=1, offset=1)] == ["validation_Accounting_2"]
    assert [s.sample_id for s in load_mmmu(mmmu_dir, "val", limit=1, offset=2)] == ["validation_Art_1"]
    with pytest.raises(InputError, match=r"mmmu .* has 3 samples for data.split=val; data.offset=3 selects none"):
        load_mmmu(mmmu_dir, "val", limit=1, offset=3)
    one = mmmu_dir / "Art" / "validation-00000-of-00001.parquet"
    assert [s.sample_id for s in load_mmmu(one, "val", limit=5)] == ["validation_Art_1"]


def test_mmmu_multi_image_first_or_side_by_side(tmp_path: Path):
    def rgb(color, w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), color).save(buf, format="PNG")
        return buf.getvalue()

    row = mmmu_row("Art", 2, image=rgb((255, 0, 0), 4, 2))  # image_1: red 4x2
    row["image_3"] = {"bytes": rgb((0, 0, 255), 2, 3), "path": "b.png"}  # image_3: blue 2x3 (image_2 empty)
    path = write_parquet(tmp_path / "Art" / "validation-00000-of-00001.parquet", [row])
    (first,) = load_mmmu(path, "val", limit=1)
    assert first.image().size == (4, 2) and not first.extra_images
    (both,) = load_mmmu(path, "val", limit=1, multi_image="concat")
    image = both.image()
    assert image.size == (6, 3)  # side by side, left to right in column order, top-aligned
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((4, 0)) == (0, 0, 255)
    assert image.getpixel((0, 2)) == (255, 255, 255) and image.getpixel((5, 2)) == (0, 0, 255)
    assert both.question == first.question and both.sample_id == first.sample_id
    broken = dataclasses.replace(both, extra_images=(b"not an image",))
    with pytest.raises(InputError, match=r"row 1 \(id validation_Art_2\): image 2 of 2 cannot be decoded"):
        broken.image()
    with pytest.raises(InputError, match="multi_image must be one of first, concat"):
        load_mmmu(path, "val", limit=1, multi_image="grid")


def test_mmmu_missing_folders_and_files(mmmu_dir: Path, tmp_path: Path):
    with pytest.raises(InputError, match=r"mmmu subject 'Biology' \(data.subjects\) not found: no folder .*Biology"):
        load_mmmu(mmmu_dir, "val", limit=1, subjects=["Biology"])
    with pytest.raises(InputError, match=r"mmmu: no dev parquet file in .*Accounting"):
        load_mmmu(mmmu_dir, "train", limit=1, subjects=["Accounting"])
    with pytest.raises(InputError, match=r"no MMMU subject folder in .* has a test-\*\.parquet file"):
        load_mmmu(mmmu_dir, "test", limit=1)
    with pytest.raises(InputError, match=r"mmmu data\.path directory not found"):
        load_mmmu(tmp_path / "nope", "val", limit=1)
    with pytest.raises(InputError, match="mmmu parquet file not found"):
        load_mmmu(tmp_path / "nope.parquet", "val", limit=1)
    bad = tmp_path / "bad" / "validation-0.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"validation-0\.parquet: not a readable parquet file"):
        load_mmmu(bad, "val", limit=1)


def test_mmmu_missing_column_is_named(tmp_path: Path):
    path = tmp_path / "Art" / "validation-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": ["a"], "question": ["q"]}), path)
    with pytest.raises(InputError, match=r"Art/validation-00000-of-00001\.parquet: missing column 'options'"):
        load_mmmu(tmp_path, "val", limit=1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"options": "['$6', '$7'"}, r"row 2 \(id validation_Art_2\): column 'options' is not a Python list literal"),
        ({"options": "__import__('os').getcwd()"}, r"column 'options' is not a Python list literal"),  # never eval
        ({"options": "{'a': 1}"}, r"column 'options' must be a list of strings"),
        ({"options": "['only one']"}, r"a multiple-choice question needs 2\.\.26 options, got 1"),
        ({"answer": "D"}, r"answer 'D' is not one of the options A, B, C"),
        ({"answer": ""}, r"Art/validation-00000-of-00001\.parquet row 2: column 'answer' is empty"),
        ({"question_type": "essay"}, r"question_type must be 'multiple-choice' or 'open', got 'essay'"),
        ({"image_1": None, "image_2": None}, r"row 2 \(id validation_Art_2\): no image \(image_1, .*image_7 are"),
    ],
)
def test_mmmu_malformed_rows_are_named(tmp_path: Path, changes: dict, message: str):
    bad = {**mmmu_row("Art", 2), **changes}
    write_parquet(tmp_path / "Art" / "validation-00000-of-00001.parquet", [mmmu_row("Art", 1), bad])
    with pytest.raises(InputError, match=message):
        load_mmmu(tmp_path, "val", limit=5)
    assert len(load_mmmu(tmp_path, "val", limit=1)) == 1  # rows outside the selection are not read


# ---------------------------------------------------------------------------------------------------------------
# The registry and the config keys.


def test_load_benchmark_shapes_is_load_split():
    cfg = load_config(None, ["data.limit=3", "data.offset=2", "data.split=val", "seed=5"])
    assert load_benchmark(cfg.data, seed=cfg.seed) == load_split("val", 3, seed=5, offset=2)
    cfg = load_config(None, ["data.limit=2", "data.kinds=[describe]"])
    assert [s.sample_id for s in load_benchmark(cfg.data)] == ["test-000004", "test-000009"]
    assert cfg.data.label() == "shapes/test [describe]"  # how tables name the samples
    assert load_config(None, ["data.split=val"]).data.label() == "shapes/val"
    assert SHAPES_KINDS == KINDS  # the config's copy, checked without importing the data package
    sample = load_benchmark(cfg.data, seed=cfg.seed)[0]
    assert sample.score(sample.answer) == 1.0 and sample.score("no") == 0.0


def test_load_benchmark_dispatches_on_the_config(vqa_dir: Path, mmb_tsv: Path, mmmu_dir: Path):
    def load(*overrides: str) -> list:
        return load_benchmark(load_config(None, ["data.split=val", *overrides]).data)

    assert [s.sample_id for s in load("data.benchmark=vqav2", f"data.path={vqa_dir}", "data.limit=2")] == ["420", "421"]
    assert [s.benchmark for s in load("data.benchmark=mmbench", f"data.path={mmb_tsv}")] == ["mmbench"] * 3
    circular = load("data.benchmark=mmbench", f"data.path={mmb_tsv}", "data.circular=true")
    assert [s.group for s in circular] == ["10"] * 4 + ["11"] * 2 + ["12"] * 3
    got = load("data.benchmark=mmmu", f"data.path={mmmu_dir}", "data.subjects=[Art]")
    assert [s.sample_id for s in got] == ["validation_Art_1"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.benchmark=vqav2"], "data.path must be set for data.benchmark=vqav2"),
        (["data.benchmark=mmmu", "data.path=x", "data.subjects=[Art, Art]"], "data.subjects lists 'Art' twice"),
        (["data.benchmark=mmmu", "data.path=x", "data.subjects=['']"], "data.subjects[0] must be a non-empty string"),
        (
            ["data.benchmark=mmbench", "data.path=x", "data.subjects=[Art]"],
            "data.subjects applies to data.benchmark=mmmu",
        ),
        (["data.subjects=Art"], "data.subjects must be a list"),
        (["data.circular=true"], "data.circular applies to data.benchmark=mmbench only"),
        (["data.kinds=[colour]"], "data.kinds[0] must be one of 'color', 'shape', 'count', 'position', 'describe'"),
        (["data.kinds=[count, count]"], "data.kinds lists 'count' twice"),
        (["data.kinds=count"], "data.kinds must be a list of strings, got 'count'"),
        (["data.benchmark=vqav2", "data.path=x", "data.kinds=[count]"], "data.kinds applies to data.benchmark=shapes"),
    ],
)
def test_data_config_keys_are_validated(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)
