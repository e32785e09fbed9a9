"""Parity of a build's ONNX graphs against the FiCoCo-patched PyTorch model, with Polygraphy.

    python -m export.trace.verify BUILD_DIR        # re-runs the checks of an existing build

Polygraphy's Comparator runs a PyTorch runner and an ONNX Runtime runner on the
same feeds (two prompts of different lengths): vision.onnx against its torch
module; the LLM's segments and reductions, chained as the runtime chains them
(`runtime.chain` on the runtime's own ONNX Runtime backend: embeddings from the stored
table, cache buffers with masked stale rows), against the patched Hugging Face decoder itself (prefill and one
decode step). Every output is judged by `export.gates` (limits relative to the
output's magnitude, derived from the precision and the reduction lengths; kept
sets as overlaps, FiCoCo-L's from the reduce graphs' `kept` outputs; token rows
compared where both sides kept the token). End to end: greedy decoding through
the chain (fp32: identical to the patched model's `generate`), and
teacher-forced next-token agreement over several prompts.
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
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator

from ficoco.patch.observe import LanguageEvent, observing
from runtime import loop, names
from runtime.errors import BackendError
from runtime.manifest import Build, BuildError

from .. import gates
from .runners import HostRunner

NEW_TOKENS = 32
NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}  # bf16: ONNX Runtime CPU has no kernels, never verified
COMPARE_PROMPTS = ("Describe the image.", "What is the colour of the sky in this picture, and why?")
TEACHER_FORCED_PROMPTS = (*COMPARE_PROMPTS, "List three things you can see in this picture.")


class TorchRunner(HostRunner):
    """Polygraphy runner for a torch callable on CPU (polygraphy's PytRunner moves inputs to CUDA)."""

    def __init__(self, fn, input_metadata: TensorMetadata, output_names: list[str], name: str = "torch"):
        super().__init__(name, "torch-runner", input_metadata)
        self.fn, self.output_names = fn, output_names

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self.fn({name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feed_dict.items()})
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, np.ascontiguousarray(out.numpy())) for name, out in zip(self.output_names, outputs))


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


def make_sample(processor, image_token_id: int, instruction: str, dtype=np.float32, image=None) -> Sample:
    """One prompt about `image` (default: export.trace.verify's gradient picture)."""
    from PIL import Image

    image = image if image is not None else Image.linear_gradient("L").resize((500, 400)).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    pixels = inputs["pixel_values"]
    pixels = pixels[0] if pixels.dim() == 5 else pixels  # NeXT: [1, crops, 3, S, S]
    before, after = split_prompt(inputs["input_ids"], image_token_id)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.from_numpy(np.zeros(0, dtype)).dtype)
    return Sample(pixels.numpy().astype(dtype), before, after, dict(inputs))


def model_limits(model, precision: str, prompt_length: int) -> dict[str, gates.Limits]:
    """The gate of the vision graph and of the LLM graphs: depth and longest reduction from the config."""
    vision, text = model.config.vision_config, model.config.text_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return {
        "vision": gates.limits(precision, vision.num_hidden_layers + 2,  # + the projector's two linears
                               max(vision.hidden_size, vision.intermediate_size, tokens, text.hidden_size)),
        "text": gates.limits(precision, text.num_hidden_layers + 1,  # + the LM head
                             max(text.hidden_size, text.intermediate_size, prompt_length)),
    }


# --------------------------------------------------------------------------- FiCoCo-L's kept set


def language_kept(events: list) -> list[torch.Tensor]:
    """Each observed FiCoCo-L step's kept indices within its visual span ([1, k] int64), in running order."""
    return [event.kept for event in events if isinstance(event, LanguageEvent)]


def span_positions(kept_per_step: list[np.ndarray]) -> list[np.ndarray]:
    """Per step, the kept tokens' positions in the original visual span (steps index into the previous one's kept)."""
    positions, out = None, []
    for kept in kept_per_step:
        kept = np.asarray(kept).reshape(-1)
        positions = kept if positions is None else positions[kept]
        out.append(positions)
    return out


# --------------------------------------------------------------------------- graph comparison


PREFILL, DECODE = "prefill", "decode"  # the LLM's two phases, each a chain of graphs


def graph_feeds(graphs, samples: list[Sample]) -> dict[str, list[dict]]:
    """Inputs of vision and of both LLM phases for every sample, computed with the torch modules."""
    feeds = {names.VISION: [], PREFILL: [], DECODE: []}
    with torch.no_grad():
        for sample in samples:
            features = graphs.vision(torch.from_numpy(sample.pixel_values))[0]
            feeds[names.VISION].append({names.PIXEL_VALUES: sample.pixel_values})
            prefill = {names.INPUT_IDS_BEFORE: sample.before, names.IMAGE_FEATURES: features.numpy(), names.INPUT_IDS_AFTER: sample.after}
            feeds[PREFILL].append(prefill)
            out = graphs.prefill(*(torch.from_numpy(v) for v in prefill.values()))
            length = graphs.plan.prompt_length(sample.before.shape[1], sample.after.shape[1])
            decode = {names.INPUT_IDS: np.array([[int(out[0].argmax())]]), names.POSITION_IDS: np.array([[length]])}
            decode.update({name: t.numpy() for name, t in zip(names.cache_names(names.past, len(out) // 2), out[1:])})
            feeds[DECODE].append(decode)
    return feeds


def graph_functions(graphs) -> dict:
    """feed dict of torch tensors -> outputs of the torch reference (prefill: + FiCoCo-L kept sets;
    decode: the new token's K/V, as the segments return them)."""
    layers = graphs.layers

    def prefill(f):
        with observing() as events:  # the reference's FiCoCo-L steps report what they kept
            out = graphs.prefill(f[names.INPUT_IDS_BEFORE], f[names.IMAGE_FEATURES], f[names.INPUT_IDS_AFTER])
        return (*out, *language_kept(events))

    def decode(f):
        out = graphs.decode(f[names.INPUT_IDS], f[names.POSITION_IDS], [f[n] for n in names.cache_names(names.past, layers)])
        return (out[0], *(t[:, :, -1:] for t in out[1:]))

    return {names.VISION: lambda f: graphs.vision(f[names.PIXEL_VALUES]), PREFILL: prefill, DECODE: decode}


def onnx_runner(onnx_path: Path, outputs: list[str]) -> tuple[OnnxrtRunner, None]:
    """ONNX Runtime (CPU) over one graph, through Polygraphy's loader."""
    return OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"])), None


def feed_metadata(feeds: list[dict]) -> TensorMetadata:
    metadata = TensorMetadata()
    for name, value in feeds[0].items():  # dims that differ between feeds are dynamic (-1)
        shape = [d if all(f[name].shape[i] == d for f in feeds) else -1 for i, d in enumerate(value.shape)]
        metadata.add(name, value.dtype, shape)
    return metadata


def run_pair(fn, onnx_path: Path | None, feeds: list[dict], outputs: list[str], runner=None) -> list[tuple[dict, dict]]:
    """Polygraphy Comparator.run of torch `fn` and ONNX Runtime (the graph at `onnx_path`, or `runner`)
    -> [(reference, actual) outputs per feed]."""
    metadata = feed_metadata(feeds)
    ort_runner, temporary = (runner, None) if runner is not None else onnx_runner(onnx_path, outputs)
    try:
        results = Comparator.run([TorchRunner(fn, metadata, outputs), ort_runner], data_loader=feeds)
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    return [({n: np.asarray(a[n]) for n in outputs}, {n: np.asarray(b[n]) for n in outputs})
            for a, b in zip(results[0][1], results[1][1])]


def worst(per_feed: list[dict]) -> dict:
    """One output's figures over all feeds: the failing or worst one."""
    failing = [f for f in per_feed if not f["passed"]]
    return max(failing or per_feed, key=gates.severity)


def crop_rows(features: np.ndarray, plan) -> np.ndarray:
    """image_features [n, D] in the prompt's layout -> [crops, k, D] (LLaVA-NeXT's newline rows left out)."""
    k = plan.kept_per_crop
    if plan.grid is None:
        return features.reshape(plan.crops, k, -1)
    rows, cols = plan.grid
    grid = features[k:].reshape(rows, cols * k + 1, -1)[:, :-1]  # [rows, cols*k, D]: each row ends with a newline
    return np.concatenate([features[None, :k], grid.reshape(rows * cols, k, -1)])


def judge_vision(pairs, limits: gates.Limits, plan) -> dict:
    """image_features on the rows both sides kept (per crop); kept_positions as an overlap."""
    features, overlaps = [], []
    for ref, act in pairs:
        ref_kept, act_kept = ref[names.KEPT_POSITIONS], act[names.KEPT_POSITIONS]
        overlaps.append(gates.kept_overlap(ref_kept, act_kept))
        ref_f, act_f = crop_rows(ref[names.IMAGE_FEATURES], plan), crop_rows(act[names.IMAGE_FEATURES], plan)
        if ref_f.shape != act_f.shape or ref_kept.shape != act_kept.shape:
            features.append(gates.judge(ref_f, act_f, limits))
            continue
        aligned = [common_rows_of(r, a) for r, a in zip(ref_kept, act_kept)]
        ref_rows = np.concatenate([f[i] for f, (i, _) in zip(ref_f, aligned)])
        act_rows = np.concatenate([f[j] for f, (_, j) in zip(act_f, aligned)])
        flips = ref_kept.size - len(ref_rows)
        features.append(gates.judge(ref_rows, act_rows, limits, limits.allowed_rows(flips, len(ref_rows)), row_axis=0))
    overlap = min(overlaps)
    return {names.IMAGE_FEATURES: worst(features),
            names.KEPT_POSITIONS: {"overlap": overlap, "passed": overlap >= limits.kept}}


def common_rows_of(reference: np.ndarray, actual: np.ndarray):
    return gates.common_rows(np.asarray(reference).reshape(-1), np.asarray(actual).reshape(-1))


def prefill_rows(positions_ref, positions_act, before: int, after: int):
    """Cache rows of a layer after FiCoCo-L on each side: text before, visual tokens both kept, text after."""
    ref_idx, act_idx = gates.common_rows(positions_ref, positions_act)

    def rows(index, kept):
        return np.concatenate([np.arange(before), before + index, before + len(kept) + np.arange(after)])

    return rows(ref_idx, positions_ref), rows(act_idx, positions_act), len(positions_ref) - len(ref_idx)


def judge_prefill(pairs, feeds, limits: gates.Limits, steps, kept_names: list[str], layers: int) -> dict:
    """logits; each layer's KV (after a FiCoCo-L step: on the rows both sides kept); each step's kept set."""
    figures: dict[str, list] = {}
    for (ref, act), feed in zip(pairs, feeds):
        before, after = feed[names.INPUT_IDS_BEFORE].shape[1], feed[names.INPUT_IDS_AFTER].shape[1]
        ref_pos = span_positions([ref[n] for n in kept_names])
        act_pos = span_positions([act[n] for n in kept_names])
        flips_total = 0
        for step, r_pos, a_pos in zip(steps, ref_pos, act_pos):
            overlap = gates.kept_overlap(r_pos[None], a_pos[None])
            figures.setdefault(f"language_kept.{step.layer}", []).append({"overlap": overlap, "passed": overlap >= limits.kept})
            flips_total += len(r_pos) - len(gates.common_rows(r_pos, a_pos)[0])
        allowed_logits = 1 if flips_total else 0  # after a flip the logits are judged by token agreement
        figures.setdefault(names.LOGITS, []).append(gates.judge(ref[names.LOGITS], act[names.LOGITS], limits, allowed_logits))
        for layer in range(layers):
            done = [i for i, step in enumerate(steps) if step.layer < layer]
            for kind in ("key", "value"):
                name = names.present(layer, kind)
                r, a = ref[name], act[name]
                if not done or r.shape != a.shape:
                    figures.setdefault(name, []).append(gates.judge(r, a, limits, 0, row_axis=2))
                    continue
                ref_rows, act_rows, flips = prefill_rows(ref_pos[done[-1]], act_pos[done[-1]], before, after)
                allowed = limits.allowed_rows(flips, len(ref_rows) - before - after)
                figures.setdefault(name, []).append(gates.judge(r[:, :, ref_rows], a[:, :, act_rows], limits, allowed, row_axis=2))
    return {name: worst(per_feed) if name.startswith(("logits", "present")) else min(per_feed, key=lambda f: f["overlap"])
            for name, per_feed in figures.items()}


def judge_decode(pairs, limits: gates.Limits) -> dict:
    """Same past on both sides: every output within the limit, every row."""
    figures: dict[str, list] = {}
    for ref, act in pairs:
        for name in ref:
            figures.setdefault(name, []).append(gates.judge(ref[name], act[name], limits, 0, None if name == names.LOGITS else 2))
    return {name: worst(per_feed) for name, per_feed in figures.items()}


def compare_graphs(build: Build, graphs, samples: list[Sample], limits: dict) -> dict:
    """vision.onnx and the LLM chain (both phases, the runtime's ONNX Runtime backend) against torch;
    {part: {"outputs": {name: figures}, "passed"}}."""
    from runtime.backend_ort import OrtBackend

    from .runners import BackendRunner

    feeds, functions = graph_feeds(graphs, samples), graph_functions(graphs)
    steps, layers = graphs.plan.language, graphs.layers
    kept_names = [f"language_kept.{step.layer}" for step in steps]
    backend = OrtBackend(build)
    caches = names.cache_names(names.present, layers)
    record = {}
    judged = judge_vision(run_pair(functions[names.VISION], build.path("graphs", names.VISION), feeds[names.VISION],
                                   names.io_names(names.VISION, graphs.plan)[1]), limits["vision"], graphs.plan)
    record[names.VISION] = {"outputs": judged, "passed": all(f["passed"] for f in judged.values())}
    for phase, outputs, judge in ((PREFILL, [names.LOGITS, *caches, *kept_names],
                                   lambda pairs: judge_prefill(pairs, feeds[PREFILL], limits["text"], steps, kept_names, layers)),
                                  (DECODE, [names.LOGITS, *caches], lambda pairs: judge_decode(pairs, limits["text"]))):
        try:
            judged = judge(run_pair(functions[phase], None, feeds[phase], outputs,
                                    BackendRunner(backend, phase, feed_metadata(feeds[phase]))))
        except BackendError as error:  # the chain itself refused the graphs (shapes the plan does not give)
            judged = {"chain": {"passed": False, "reason": str(error)}}
        record[phase] = {"outputs": judged, "passed": all(f["passed"] for f in judged.values())}
    return record


# --------------------------------------------------------------------------- end to end


class OnnxModel:
    """The build on the runtime's ONNX Runtime backend (CPU), as step functions for `runtime.loop`."""

    def __init__(self, build: Build, weights: str | None = None):
        from runtime.backend_ort import OrtBackend

        self.backend, self.plan = OrtBackend(build, weights=weights), build.plan

    def steps(self, sample: Sample):
        """(prefill, decode, prompt length) for one sample."""
        features = self.backend.vision(sample.pixel_values).copy()

        def prefill():
            return self.backend.prefill(sample.before, features, sample.after)

        return prefill, self.backend.decode, self.plan.prompt_length(sample.before.shape[1], sample.after.shape[1])

    def greedy(self, sample: Sample, eos: set[int]) -> list[int]:
        prefill, decode, length = self.steps(sample)
        return loop.generate(prefill, decode, length, NEW_TOKENS, eos)

    def teacher_forced(self, sample: Sample, reference: list[int], keep_logits: list | None = None) -> list[int]:
        """The graphs' argmax after the prompt and after each reference token (fed back, not their own);
        each position's logits are appended to `keep_logits` when given."""
        prefill, decode, length = self.steps(sample)
        logits, cache = prefill()
        predicted = [loop.greedy(logits)]
        for offset, token in enumerate(reference[:-1]):
            if keep_logits is not None:
                keep_logits.append(np.array(logits, np.float32))
            logits, cache = decode(token, length + offset, cache)
            predicted.append(loop.greedy(logits))
        if keep_logits is not None:
            keep_logits.append(np.array(logits, np.float32))
        return predicted


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def torch_tokens(model, sample: Sample) -> list[int]:
    """Greedy tokens of the FiCoCo-patched Hugging Face model's own `generate`."""
    with torch.no_grad():
        out = model.generate(**sample.hf_inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, sample.hf_inputs["input_ids"].shape[1] :].tolist()


def end_to_end(build: Build, model, samples: list[Sample], limits: gates.Limits) -> dict:
    """Greedy tokens on the first prompt; teacher-forced next-token agreement over every prompt."""
    onnx_model = OnnxModel(build)
    references = [torch_tokens(model, sample) for sample in samples]
    try:
        ours = onnx_model.greedy(samples[0], eos_ids(model))
        forced = [onnx_model.teacher_forced(s, ref) for s, ref in zip(samples, references)]
    except BackendError as error:  # the chain refused the graphs: nothing to compare
        return {"onnx_tokens": [], "torch_tokens": references[0], "identical": False, "error": str(error), "passed": False}
    agreement = gates.token_agreement([t for ref in references for t in ref], [t for f in forced for t in f])
    greedy_ok = ours == references[0] or not limits.greedy_exact
    return {"onnx_tokens": ours, "torch_tokens": references[0], "identical": ours == references[0],
            "teacher_forced": {"prompts": len(samples), "positions": sum(map(len, references)), "agreement": agreement},
            "passed": greedy_ok and agreement >= limits.tokens}


def verify(build: Build, model, processor, graphs) -> dict:
    """All checks of a build (its manifest, written or about to be); returns the parity record (also what
    parity.json holds)."""
    image_token, precision = model.config.image_token_id, build.precision
    dtype = NUMPY_DTYPES[precision]
    samples = [make_sample(processor, image_token, text, dtype) for text in TEACHER_FORCED_PROMPTS]
    longest = max(graphs.plan.prompt_length(s.before.shape[1], s.after.shape[1]) for s in samples) + NEW_TOKENS
    limits = model_limits(model, precision, longest)
    record = {"limits": {k: v.to_dict() for k, v in limits.items()}, "graphs": compare_graphs(build, graphs, samples[:2], limits)}
    record["end_to_end"] = end_to_end(build, model, samples, limits["text"])
    record["passed"] = record["end_to_end"]["passed"] and all(g["passed"] for g in record["graphs"].values())
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.trace.verify", description="Re-run the parity checks of a build.")
    parser.add_argument("build", type=Path)
    parser.add_argument("--model", help="the checkpoint directory the build was made from (not needed for presets)")
    args = parser.parse_args(argv)
    from ..reload import reload_for_verify

    try:
        build = Build.from_directory(args.build)
        model, processor, graphs = reload_for_verify(build, args.model)
    except (BuildError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    record = verify(build, model, processor, graphs)
    print("\n".join(gates.report_lines(record)))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
