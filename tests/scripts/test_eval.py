"""scripts/eval.py: scoring on hand-made cases, and the harness end to end on the tiny preset."""

from __future__ import annotations

import json

import pytest

from scripts import eval as harness

# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("raw, expected", [
    ("The Dog.", "dog"),
    ("  Two  cats, a bird!", "2 cats bird"),
    ("1,000", "1000"),
    ("3.5 meters.", "3.5 meters"),
    ("Don't", "dont"),
    ("an apple\n", "apple"),
    ("None", "0"),
])
def test_normalize(raw, expected):
    assert harness.normalize(raw) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("Yes, there is a cat.", "yes"),
    ("No, there is not.", "no"),
    ("There is not a dog in the image.", "no"),
    ("yes", "yes"),
    ("gibberish words", "yes"),  # LLaVA's POPE rule: anything without no/not counts as yes
])
def test_yes_no(prediction, expected):
    assert harness.yes_no(prediction) == expected


def test_vqa_accuracy_is_min_count_over_three():
    answers = ["two"] * 2 + ["3"] * 7 + ["three cats"]
    assert harness.vqa_accuracy("2", answers) == pytest.approx(2 / 3)
    assert harness.vqa_accuracy("Three.", answers) == 1.0
    assert harness.vqa_accuracy("three cats", answers) == pytest.approx(1 / 3)
    assert harness.vqa_accuracy("four", answers) == 0.0


def test_metric_choice_and_score():
    pope = {"answers": ["no"]}
    gqa = {"answers": ["left"]}
    textvqa = {"answers": ["stop"] * 4 + ["stop sign"] * 6}
    assert [harness.metric_of(r) for r in (pope, gqa, textvqa)] == ["pope", "exact", "vqa"]
    assert harness.score("No.", pope) == 1.0 and harness.score("Yes", pope) == 0.0
    assert harness.score("The left", gqa) == 1.0 and harness.score("right", gqa) == 0.0
    assert harness.score("stop", textvqa) == 1.0 and harness.score("go", textvqa) == 0.0
    assert harness.exact_match("Dog", ["cat", "dog"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        harness.score("x", {"answers": ["x"], "metric": "bleu"})


def test_summary_retention():
    records = [{"set": "a", "answers": ["yes"]}, {"set": "a", "answers": ["no"]}, {"set": "b", "answers": ["cat"]}]
    report = harness.summarize(records, {"vanilla": ["yes", "no", "dog"], "ficoco": ["yes", "yes", "cat"]})
    assert report.sets["a"]["accuracy"] == {"vanilla": 1.0, "ficoco": 0.5}
    assert report.sets["a"]["retention"]["ficoco"] == 0.5
    assert report.sets["b"]["retention"]["ficoco"] is None  # vanilla scored 0
    assert report.sets["all"]["n"] == 3 and report.sets["all"]["accuracy"]["ficoco"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def question_sets(tmp_path):
    """Three small sets (POPE-, GQA- and TextVQA-style) over skimage.data photos saved as JPEGs."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) provides the photographs")
    from PIL import Image

    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(tmp_path / f"{name}.jpg")
    sets = {
        "pope": [("astronaut.jpg", "Is there a person in the image?", "yes"),
                 ("coffee.jpg", "Is there a dog in the image?", "no"),
                 ("chelsea.jpg", "Is there a cat in the image?", "yes")],
        "gqa": [("coffee.jpg", "What is in the cup?", "coffee"), ("chelsea.jpg", "What animal is this?", "cat")],
        "textvqa": [("astronaut.jpg", "What is written on the patch?", ["nasa"] * 3 + ["usa"] * 7)],
    }
    paths = []
    for name, rows in sets.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"image": i, "question": q, "answers": a}) + "\n" for i, q, a in rows))
        paths.append(path)
    return paths


def test_harness_runs_vanilla_ficoco_and_a_build(question_sets, preset_dirs, small_build, tmp_path, capsys):
    pytest.importorskip("runtime.pipeline", reason="the runtime is not available")
    out = tmp_path / "report.json"
    args = ["--data", *map(str, question_sets), "--model", str(preset_dirs["tiny-llava-1.5"]), "--variant", "v",
            "--ratio", "0.5", "--max-new-tokens", "3", "--build", str(small_build), "--out", str(out)]
    assert harness.main(args) == 0
    assert "retention" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["runs"] == ["vanilla", "FiCoCo-V ratio 0.5", f"build {small_build.name}"]
    assert list(report["sets"]) == ["pope", "gqa", "textvqa", "all"]
    for row in report["sets"].values():
        for run in report["runs"]:
            assert 0.0 <= row["accuracy"][run] <= 1.0
            retention = row["retention"][run]
            assert retention is None if row["accuracy"]["vanilla"] == 0 else retention >= 0
    assert report["sets"]["pope"]["accuracy"]["vanilla"] > 0  # a yes-reading answer scores on the "yes" questions
    for run in report["runs"]:
        assert len(report["predictions"][run]) == 6
    # the build is the same FiCoCo-V ratio-0.5 model: greedy answers match PyTorch's
    assert report["predictions"]["FiCoCo-V ratio 0.5"] == report["predictions"][f"build {small_build.name}"]


def test_bad_records_are_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"image": "x.jpg", "question": "?"}) + "\n")
    with pytest.raises(ValueError, match="missing \\['answers'\\]"):
        harness.load_records([path])
