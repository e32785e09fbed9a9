"""Quantized builds against the unquantized fp32 PyTorch model: how much the weights' rounding changes.

The float graphs are verified first with the exact gates (`export.trace.verify`): that proves the export.
Quantization then changes the answers by design, so its effect is measured end to end, on several
prompts and pictures, with the build run by the runtime's own ONNX Runtime backend (`runtime.chain`):

    agreement      teacher-forced next-token top-1 agreement with the fp32 model's greedy path
    cosine         mean cosine of the logits at those positions (fp32 model's `generate` scores)
    greedy         the build's own greedy tokens against the fp32 model's: identical prefix, matches
    kept overlap   FiCoCo-V's kept sets, when the vision tower is quantized

Gates (`GATES`, per weight format). A defect (a transposed or mis-scaled weight, a wrong block axis)
drives the agreement towards chance and the cosine below 0.5; honest rounding does not. int8 keeps
about 8 bits per weight: on the real-weights preset it measured agreement 0.956 and cosine 0.9990, and
its gate (0.90, 0.995) leaves that a margin. int4 loses more, and the gate (0.75, 0.95) is the floor
below which the answers are a different model's: symmetric int4 RTN on SmolLM2-135M lands under it
(0.574, 0.940) and the build says so; HQQ's asymmetric int4 passes (0.985). The README has the table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import gates
from . import verify

# minimum teacher-forced agreement and mean logits cosine per weight format (README: measured on smol-llava-1.5)
GATES = {"int8": {"agreement": 0.90, "cosine": 0.995}, "int4": {"agreement": 0.75, "cosine": 0.95}}
NEW_TOKENS = verify.NEW_TOKENS


def pictures() -> list:
    """The verification's gradient, and a picture with edges and colours (drawn: no dataset needed)."""
    from PIL import Image, ImageDraw

    gradient = Image.linear_gradient("L").resize((500, 400)).convert("RGB")
    scene = Image.new("RGB", (480, 360), (135, 190, 235))
    draw = ImageDraw.Draw(scene)
    draw.rectangle((0, 250, 480, 360), fill=(70, 140, 60))
    draw.ellipse((360, 30, 440, 110), fill=(250, 220, 60))
    draw.polygon([(80, 250), (160, 140), (240, 250)], fill=(150, 80, 40))
    return [gradient, scene]


def reference_path(model, sample) -> tuple[list[int], list[np.ndarray]]:
    """The fp32 model's greedy tokens and the logits it chose each from."""
    with torch.no_grad():
        out = model.generate(**sample.hf_inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[0, sample.hf_inputs["input_ids"].shape[1]:].tolist()
    return tokens, [step[0].float().numpy() for step in out.logits]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def measure(build, model, processor, graphs, weights: str, vision_quantized: bool) -> dict:
    """The record of a quantized build (`runtime.manifest.Build`; also what the manifest's
    `quantization.quality` holds)."""
    image_token = model.config.image_token_id
    samples = [verify.make_sample(processor, image_token, text, image=picture)
               for picture in pictures() for text in verify.TEACHER_FORCED_PROMPTS]
    onnx_model = verify.OnnxModel(build, weights=weights)
    eos = verify.eos_ids(model)
    agree, total, cosines, prefixes, matches, first = 0, 0, [], [], [], None
    for sample in samples:
        tokens, logits = reference_path(model, sample)
        ours: list = []
        predicted = onnx_model.teacher_forced(sample, tokens, ours)
        agree += sum(p == t for p, t in zip(predicted, tokens))
        total += len(tokens)
        cosines += [cosine(a, b) for a, b in zip(ours, logits)]
        greedy = onnx_model.greedy(sample, eos)
        first = greedy if first is None else first
        prefix = next((i for i, (a, b) in enumerate(zip(greedy, tokens)) if a != b), min(len(greedy), len(tokens)))
        prefixes.append(prefix)
        matches.append(sum(a == b for a, b in zip(greedy, tokens)) / max(len(tokens), 1))
    record = {"weights": weights, "prompts": len(samples), "positions": total, "agreement": agree / total,
              "cosine": float(np.mean(cosines)), "cosine_min": float(np.min(cosines)),
              "greedy_identical_prefix": prefixes, "greedy_match": float(np.mean(matches)),
              "greedy_tokens": first,  # the build's own, on the first prompt and picture (export.trace.verify's)
              "gate": GATES[weights]}
    if vision_quantized:
        record["kept_overlap"] = kept_overlap(build.path("graphs", "vision"), graphs, samples, weights)
    record["passed"] = record["agreement"] >= GATES[weights]["agreement"] and record["cosine"] >= GATES[weights]["cosine"]
    return record


def kept_overlap(vision: Path, graphs, samples, weights: str) -> float:
    """FiCoCo-V's kept sets of the quantized vision.onnx against the fp32 torch tower (the worst sample)."""
    import onnxruntime as ort

    from runtime.backend_ort import session_options

    session = ort.InferenceSession(str(vision), session_options(ort, weights=weights),
                                   providers=["CPUExecutionProvider"])
    overlaps = []
    with torch.no_grad():
        for sample in samples:
            ours = session.run(["kept_positions"], {"pixel_values": sample.pixel_values})[0]
            reference = graphs.vision(torch.from_numpy(sample.pixel_values))[1].numpy()
            overlaps.append(gates.kept_overlap(reference, ours))
    return float(min(overlaps))
