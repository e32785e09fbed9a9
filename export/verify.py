"""Parity of a build's ONNX graphs against the FiCoCo-patched PyTorch model, with Polygraphy.

    python -m export.verify BUILD_DIR        # re-runs the checks of an existing build

Per graph: Polygraphy's Comparator runs a PyTorch runner (the graph's torch
module, eager) and its OnnxrtRunner on the same feeds (two prompts of different
lengths) and compares every output; the figures are the max absolute error and
the cosine similarity per output. End to end: greedy decoding through the three
ONNX graphs must give exactly the tokens of the patched model's `generate`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, SimpleCompareFunc

from runtime import loop

from runtime import names

# fp32 thresholds of the issue; other precisions are reported against looser ones.
TOLERANCES = {  # kept: fraction of kept patch positions both sides agree on
    "fp32": {"atol": 1e-4, "cosine": 0.99999, "kept": 1.0},
    "fp16": {"atol": 5e-2, "cosine": 0.99, "kept": 0.95},
}
NEW_TOKENS = 32
NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class TorchRunner(BaseRunner):
    """Polygraphy runner for a torch callable on CPU (polygraphy's PytRunner moves inputs to CUDA)."""

    def __init__(self, fn, input_metadata: TensorMetadata, output_names: list[str], name: str = "torch"):
        super().__init__(name=name, prefix="torch-runner")
        self.fn, self.input_metadata, self.output_names = fn, input_metadata, output_names

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return self.input_metadata

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self.fn({name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feed_dict.items()})
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, np.ascontiguousarray(out.numpy())) for name, out in zip(self.output_names, outputs))

    def deactivate_impl(self):
        pass


@dataclass
class Sample:
    """One verification prompt: the split prompt and pixels for the graphs, the HF inputs for `generate`."""

    pixel_values: np.ndarray  # [crops, 3, 336, 336]
    before: np.ndarray  # [1, Tb] int64
    after: np.ndarray  # [1, Ta] int64
    hf_inputs: dict


def split_prompt(input_ids: torch.Tensor, image_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[1, L] ids with one run of image tokens -> (ids before, ids after)."""
    where = (input_ids[0] == image_token_id).nonzero().flatten()
    start, end = int(where[0]), int(where[-1]) + 1
    return input_ids[:, :start].numpy(), input_ids[:, end:].numpy()


def make_sample(processor, image_token_id: int, instruction: str, dtype=np.float32) -> Sample:
    from PIL import Image

    image = Image.linear_gradient("L").resize((500, 400)).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    pixels = inputs["pixel_values"]
    pixels = pixels[0] if pixels.dim() == 5 else pixels  # NeXT: [1, crops, 3, S, S]
    before, after = split_prompt(inputs["input_ids"], image_token_id)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.from_numpy(np.zeros(0, dtype)).dtype)
    return Sample(pixels.numpy().astype(dtype), before, after, dict(inputs))


def kept_overlap(reference: np.ndarray, actual: np.ndarray) -> float:
    """[crops, k] positions -> mean fraction of each crop's kept set found on both sides."""
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / a.size for a, b in zip(reference, actual)]))


def metrics(reference: np.ndarray, actual: np.ndarray) -> dict:
    ref, act = reference.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
    denom = np.linalg.norm(ref) * np.linalg.norm(act)
    cosine = float(ref @ act / denom) if denom > 0 else float(np.array_equal(ref, act))
    return {"max_abs": float(np.abs(ref - act).max()) if ref.size else 0.0, "cosine": cosine}


def compare(fn, onnx_path: Path, feeds: list[dict], output_names: list[str], tolerance: dict) -> dict:
    """Polygraphy comparison of torch `fn` and ONNX Runtime on `feeds`; returns figures per output."""
    metadata = TensorMetadata()
    for name, value in feeds[0].items():  # dims that differ between feeds are dynamic (-1)
        shape = [d if all(f[name].shape[i] == d for f in feeds) else -1 for i, d in enumerate(value.shape)]
        metadata.add(name, value.dtype, shape)
    runners = [TorchRunner(fn, metadata, output_names), OnnxrtRunner(SessionFromOnnx(str(onnx_path)))]
    results = Comparator.run(runners, data_loader=feeds)
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=tolerance["atol"], rtol=0.0))
    figures = {}
    for name in output_names:
        per_feed = [metrics(np.asarray(a[name]), np.asarray(b[name])) for a, b in zip(results[0][1], results[1][1])]
        figures[name] = {"max_abs": max(f["max_abs"] for f in per_feed), "cosine": min(f["cosine"] for f in per_feed)}
        if name == names.IMAGE_FEATURES:
            figures[name]["passed"] = figures[name]["cosine"] >= tolerance["cosine"]
        elif name == names.KEPT_POSITIONS:
            overlap = min(kept_overlap(np.asarray(a[name]), np.asarray(b[name])) for a, b in zip(results[0][1], results[1][1]))
            figures[name]["overlap"] = overlap
            figures[name]["passed"] = overlap >= tolerance["kept"]
        else:
            figures[name]["passed"] = figures[name]["max_abs"] <= tolerance["atol"]
    return {"outputs": figures, "polygraphy_passed": bool(accuracy), "passed": all(f["passed"] for f in figures.values())}


def graph_feeds(graphs, samples: list[Sample]) -> dict[str, list[dict]]:
    """Inputs of every graph for every sample, computed with the torch modules."""
    feeds = {names.VISION: [], names.PREFILL: [], names.DECODE: []}
    with torch.no_grad():
        for sample in samples:
            features = graphs.vision(torch.from_numpy(sample.pixel_values))[0]
            feeds[names.VISION].append({names.PIXEL_VALUES: sample.pixel_values})
            prefill = {names.INPUT_IDS_BEFORE: sample.before, names.IMAGE_FEATURES: features.numpy(), names.INPUT_IDS_AFTER: sample.after}
            feeds[names.PREFILL].append(prefill)
            out = graphs.prefill(*(torch.from_numpy(v) for v in prefill.values()))
            length = sample.before.shape[1] + graphs.layout.visual_tokens + sample.after.shape[1]
            decode = {names.INPUT_IDS: np.array([[int(out[0].argmax())]]), names.POSITION_IDS: np.array([[length]])}
            decode.update({name: t.numpy() for name, t in zip(names.cache_names(names.past, len(out) // 2), out[1:])})
            feeds[names.DECODE].append(decode)
    return feeds


def graph_functions(graphs) -> dict:
    """feed dict of torch tensors -> outputs, for each graph's torch module."""
    layers = graphs.layers
    return {
        names.VISION: lambda f: graphs.vision(f[names.PIXEL_VALUES]),
        names.PREFILL: lambda f: graphs.prefill(f[names.INPUT_IDS_BEFORE], f[names.IMAGE_FEATURES], f[names.INPUT_IDS_AFTER]),
        names.DECODE: lambda f: graphs.decode(
            f[names.INPUT_IDS], f[names.POSITION_IDS], [f[n] for n in names.cache_names(names.past, layers)]
        ),
    }


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def onnx_tokens(directory: Path, graphs, sample: Sample, eos: set[int]) -> list[int]:
    """Greedy tokens through the three ONNX graphs (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    sessions = {g: ort.InferenceSession(str(directory / f"{g}.onnx"), providers=["CPUExecutionProvider"]) for g in names.GRAPHS}
    features = sessions[names.VISION].run([names.IMAGE_FEATURES], {names.PIXEL_VALUES: sample.pixel_values})[0]
    past_names = names.cache_names(names.past, graphs.layers)

    def prefill():
        feed = {names.INPUT_IDS_BEFORE: sample.before, names.IMAGE_FEATURES: features, names.INPUT_IDS_AFTER: sample.after}
        out = sessions[names.PREFILL].run(None, feed)
        return out[0][0], out[1:]

    def decode(token: int, position: int, cache):
        feed = {names.INPUT_IDS: np.array([[token]]), names.POSITION_IDS: np.array([[position]]), **dict(zip(past_names, cache))}
        out = sessions[names.DECODE].run(None, feed)
        return out[0][0], out[1:]

    length = sample.before.shape[1] + graphs.layout.visual_tokens + sample.after.shape[1]
    return loop.generate(prefill, decode, length, NEW_TOKENS, eos)


def torch_tokens(model, sample: Sample) -> list[int]:
    """Greedy tokens of the FiCoCo-patched Hugging Face model's own `generate`."""
    with torch.no_grad():
        out = model.generate(**sample.hf_inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, sample.hf_inputs["input_ids"].shape[1] :].tolist()


def verify(directory: Path, model, processor, graphs, precision: str) -> dict:
    """All checks of a build; returns the parity record (also what parity.json holds)."""
    image_token = model.config.image_token_id
    dtype = NUMPY_DTYPES[precision]
    samples = [make_sample(processor, image_token, text, dtype) for text in ("Describe the image.", "What is the colour of the sky in this picture, and why?")]
    feeds, functions = graph_feeds(graphs, samples), graph_functions(graphs)
    tolerance = TOLERANCES[precision]
    record = {"tolerance": tolerance, "graphs": {}}
    for graph in names.GRAPHS:
        _, outputs = names.io_names(graph, graphs.layers)
        record["graphs"][graph] = compare(functions[graph], directory / f"{graph}.onnx", feeds[graph], outputs, tolerance)
    ours, reference = onnx_tokens(directory, graphs, samples[0], eos_ids(model)), torch_tokens(model, samples[0])
    record["end_to_end"] = {"onnx_tokens": ours, "torch_tokens": reference, "passed": ours == reference}
    record["passed"] = record["end_to_end"]["passed"] and all(g["passed"] for g in record["graphs"].values())
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.verify", description="Re-run the parity checks of a build.")
    parser.add_argument("build", type=Path)
    args = parser.parse_args(argv)
    from .build import reload_for_verify
    from runtime.manifest import BuildError, read

    try:
        manifest = read(args.build)
        model, processor, graphs = reload_for_verify(manifest)
    except (BuildError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    record = verify(args.build, model, processor, graphs, manifest["precision"])
    for graph, result in record["graphs"].items():
        for output, figures in result["outputs"].items():
            print(f"{graph:8} {output:20} max_abs {figures['max_abs']:.2e}  cosine {figures['cosine']:.7f}  {'ok' if figures['passed'] else 'FAIL'}")
    print(f"end to end: {'ok' if record['end_to_end']['passed'] else 'FAIL'} ({len(record['end_to_end']['onnx_tokens'])} tokens)")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
