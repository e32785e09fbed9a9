"""`python scripts/eval.py`: accuracy with and without FiCoCo on POPE / GQA / TextVQA-style question sets.

    python scripts/eval.py --data pope.jsonl gqa.jsonl --model /models/llava-1.5-7b-hf --variant v --tokens 64
    python scripts/eval.py --data textvqa.jsonl --model /models/llava-1.5-7b-hf --build builds/llava-v-t64-fp16

Each JSONL line is `{"image": PATH, "question": TEXT, "answers": ANSWER or [ANSWERS]}`
(PATH relative to the JSONL file; optional `"set"`, default the file's stem,
and `"metric"`: `pope`, `exact` or `vqa`). Without `metric`: a list of 3 or
more answers is scored with VQA accuracy, `min(#answers equal to the
prediction / 3, 1)` (TextVQA / VQAv2); a single yes/no answer as POPE (the
prediction's first sentence is "no" if it holds "no" or "not", else "yes", as
LLaVA's POPE script does); anything else by exact match (GQA). Predictions and
answers are normalised first (`normalize`: lower case, punctuation, articles,
number words).

The PyTorch model answers greedily with LLaVA's short-answer prompt suffix,
once unpatched (`ficoco.remove`) and once with FiCoCo (`ficoco.apply`);
`--build DIR` adds a run through the runtime (`runtime.Pipeline`, ONNX
Runtime / TensorRT). Each set's accuracy and its retention (run accuracy /
vanilla accuracy) are printed and, with --out, written as JSON with every
prediction.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/eval.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBERS = {w: str(i) for i, w in enumerate(WORDS)} | {"none": "0"}
ARTICLES = {"a", "an", "the"}
Answerer = Callable[[object, str], str]  # (PIL image, question) -> answer text


# --------------------------------------------------------------------------- scoring


def normalize(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation (decimal points and digit commas handled), number
    words as digits, no articles, single spaces."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # keep 3.5, drop sentence periods
    text = text.replace("'", "")
    text = text.translate(str.maketrans({c: " " for c in string.punctuation if c != "."}))
    words = [NUMBERS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def yes_no(prediction: str) -> str:
    """POPE's reading of a free answer (LLaVA's eval_pope): the first sentence says "no" or "not" -> no, else yes."""
    first = prediction.split(".")[0].replace(",", "")
    words = normalize(first).split()
    return "no" if "no" in words or "not" in words else "yes"


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer."""
    return float(normalize(prediction) in {normalize(a) for a in answers})


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(#human answers equal to the prediction / 3, 1), after normalisation."""
    guess = normalize(prediction)
    return min(sum(normalize(a) == guess for a in answers) / 3.0, 1.0)


def metric_of(record: dict) -> str:
    """The record's metric: explicit, else vqa for >= 3 answers, pope for one yes/no answer, else exact."""
    if record.get("metric"):
        return record["metric"]
    answers = record["answers"]
    if len(answers) >= 3:
        return "vqa"
    return "pope" if len(answers) == 1 and normalize(answers[0]) in ("yes", "no") else "exact"


def score(prediction: str, record: dict) -> float:
    """The record's score in [0, 1] for `prediction`."""
    metric = metric_of(record)
    if metric == "vqa":
        return vqa_accuracy(prediction, record["answers"])
    if metric == "pope":
        return float(yes_no(prediction) == normalize(record["answers"][0]))
    if metric == "exact":
        return exact_match(prediction, record["answers"])
    raise ValueError(f"unknown metric {metric!r} (pope, exact or vqa)")


# --------------------------------------------------------------------------- data and runs


def load_records(paths: list[Path], limit: int | None = None) -> list[dict]:
    """Records of the JSONL files, image paths made absolute, `answers` a list, `set` filled in."""
    records = []
    for path in paths:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        for number, line in enumerate(lines[:limit], 1):
            record = json.loads(line)
            missing = {"image", "question", "answers"} - set(record)
            if missing:
                raise ValueError(f"{path}:{number}: missing {sorted(missing)}")
            answers = record["answers"]
            record["answers"] = [answers] if isinstance(answers, str) else [str(a) for a in answers]
            record["image"] = str((Path(path).parent / record["image"]).resolve())
            record.setdefault("set", Path(path).stem)
            metric_of(record)
            records.append(record)
    return records


def torch_answerer(model, processor, max_new_tokens: int, suffix: str = SHORT_ANSWER) -> Answerer:
    """Greedy answers from a (patched or not) Hugging Face LLaVA model."""
    import torch

    device = next(model.parameters()).device

    def answer(image, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + suffix}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    return answer


def build_predictions(records: list[dict], directory: Path, max_new_tokens: int, suffix: str = SHORT_ANSWER) -> list[str]:
    """Greedy answers through the runtime (ONNX Runtime / TensorRT, no torch) from an `export.build` directory."""
    from runtime.pipeline import Pipeline

    with Pipeline.from_build(directory) as pipe:
        return answer_all(records, lambda image, question: pipe(image, question + suffix, max_new_tokens=max_new_tokens).text.strip())


def answer_all(records: list[dict], answer: Answerer) -> list[str]:
    """One prediction per record; an image shared by consecutive records (POPE) is opened once."""
    from PIL import Image

    @lru_cache(maxsize=4)
    def open_image(path: str):
        with Image.open(path) as image:
            return image.convert("RGB")

    return [answer(open_image(record["image"]), record["question"]) for record in records]


@dataclass(frozen=True)
class Report:
    """Accuracy per set (and "all") per run, and retention against the first run (vanilla)."""

    runs: tuple[str, ...]
    sets: dict  # {set: {"n": int, "accuracy": {run: float}, "retention": {run: float | None}}}
    predictions: dict  # {run: [(prediction, score), ...]} in record order

    def to_dict(self) -> dict:
        return {"runs": list(self.runs), "sets": self.sets,
                "predictions": {run: [{"prediction": p, "score": s} for p, s in rows] for run, rows in self.predictions.items()}}


def summarize(records: list[dict], predictions: dict[str, list[str]]) -> Report:
    """Score every run's predictions and aggregate per set; the first run is the reference for retention."""
    runs = tuple(predictions)
    scored = {run: [(p, score(p, r)) for p, r in zip(preds, records, strict=True)] for run, preds in predictions.items()}
    sets = {}
    for name in [*dict.fromkeys(r["set"] for r in records), "all"]:
        index = [i for i, r in enumerate(records) if name in ("all", r["set"])]
        accuracy = {run: sum(scored[run][i][1] for i in index) / len(index) for run in runs}
        base = accuracy[runs[0]]
        sets[name] = {"n": len(index), "accuracy": accuracy,
                      "retention": {run: (accuracy[run] / base if base else None) for run in runs}}
    return Report(runs, sets, scored)


def evaluate(records: list[dict], model, processor, config, max_new_tokens: int = 10,
             build: Path | None = None) -> Report:
    """Vanilla and FiCoCo (`config`, None to skip) runs of the PyTorch model, plus an optional build run."""
    from ficoco import apply, remove

    answer = torch_answerer(model, processor, max_new_tokens)
    remove(model)  # vanilla: Hugging Face's own forward
    predictions = {"vanilla": answer_all(records, answer)}
    if config is not None:
        amount = f"ratio {config.ratio}" if config.ratio is not None else f"{config.tokens} tokens"
        apply(model, config)
        try:
            predictions[f"FiCoCo-{config.variant.upper()} {amount}"] = answer_all(records, answer)
        finally:
            remove(model)
    if build is not None:
        predictions[f"build {Path(build).name}"] = build_predictions(records, Path(build), max_new_tokens)
    return summarize(records, predictions)


def format_report(report: Report) -> str:
    """A table: set, n, accuracy per run, retention per FiCoCo run."""
    head = f"{'set':<16}{'n':>5}" + "".join(f"{run[:24]:>26}" for run in report.runs)
    lines = [head]
    for name, row in report.sets.items():
        cells = []
        for run in report.runs:
            retention = row["retention"][run]
            extra = "" if run == report.runs[0] else (f" ({retention:.1%})" if retention is not None else " (n/a)")
            cells.append(f"{row['accuracy'][run]:.3f}{extra}")
        lines.append(f"{name:<16}{row['n']:>5}" + "".join(f"{c:>26}" for c in cells))
    lines.append("accuracy per run; (retention = accuracy / vanilla accuracy)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/eval.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, nargs="+", required=True, help="JSONL files of {image, question, answers}")
    p.add_argument("--model", default="tiny-llava-1.5", help="preset name or local Hugging Face LLaVA directory")
    p.add_argument("--variant", default="v", choices=["v", "l", "vl", "none"], help="none: vanilla (and --build) only")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, help="fraction of visual tokens kept (default 0.25)")
    amount.add_argument("--tokens", type=int, help="visual tokens kept per image (crop)")
    p.add_argument("--build", type=Path, help="also answer through the runtime from this export.build directory")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--limit", type=int, help="first N records of each file")
    p.add_argument("--out", type=Path, help="write the report and every prediction as JSON")
    args = p.parse_args(argv)
    if args.ratio is None and args.tokens is None:
        args.ratio = 0.25
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch

        from ficoco import FiCoCoConfig
        from ficoco.models.presets import load

        records = load_records(args.data, args.limit)
        config = None if args.variant == "none" else FiCoCoConfig(args.variant, ratio=args.ratio, tokens=args.tokens)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        model, processor = load(args.model, dtype=dtype)
        model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        report = evaluate(records, model, processor, config, args.max_new_tokens, args.build)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.out:
        args.out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
