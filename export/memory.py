"""The memory plan of a finished build (`ficoco.analysis.memory`, with what the build measured put in).

Weights per graph are the initializer bytes of the build's ONNX files (external data included),
engines per graph their file bytes, the KV cache the runtime's buffers at max_seq_len (the layers
after a FiCoCo-L step shorter), and the activations TensorRT's reported device memory per engine
when the engines could be loaded here (a GPU), else `ficoco.analysis.memory.activation_estimate`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from ficoco.analysis import memory
from ficoco.config import FiCoCoConfig
from ficoco.plan import BuildPlan


def initializer_bytes(path: Path) -> int:
    """Bytes of one ONNX graph's initializers (external data by its recorded length)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in tensor.external_data}["length"])
        else:
            total += numpy_helper.to_array(tensor).nbytes
    return total


def measured_weights(directory: Path, body: dict) -> dict[str, int]:
    """{graph: initializer bytes} of the build's ONNX files; where onnx is not installed (a device's runtime
    install running --from-onnx) the figures the build measured, which engines do not change."""
    stored = (body.get("memory") or {}).get("weights")
    if importlib.util.find_spec("onnx") is None and isinstance(stored, dict) and set(stored) == set(body["graphs"]):
        return stored
    return {graph: initializer_bytes(directory / entry["file"]) for graph, entry in body["graphs"].items()}


def memory_section(directory: Path, body: dict, config: dict) -> dict:
    """The manifest's `memory`: the plan (with measured weights), engine bytes and device memory, devices."""
    engines = body.get("engines") or {}
    reported = {g: e.get("device_memory") for g, e in engines.items()}
    known = [v for v in reported.values() if isinstance(v, int)]
    engine_memory = max(known) if known and len(known) == len(reported) else None  # engines run one at a time
    quantization = body.get("quantization") or {}
    weights = quantization.get("weights") or body["precision"]
    vision = weights if quantization.get("vision") else body["precision"]
    kv_dtype = "fp32" if body["precision"] == "fp32" else "fp16"  # the runtime's buffers: the graphs' float type
    setting = memory.describe(None if body["variant"] == "none" else FiCoCoConfig.from_dict(body["ficoco"]))
    plan = memory.memory_of(config, BuildPlan.from_dict(body["schedule"]), weights, setting=setting, vision_weights=vision,
                            kv_dtype=kv_dtype, engine_memory=engine_memory)
    measured = measured_weights(directory, body)
    plan = dataclasses.replace(plan, model=body["source"]["model"], weights=measured)
    lines = memory.format_plan(plan)
    if engines:
        sizes = ", ".join(f"{graph} {entry['bytes'] / 2**20:.1f}" for graph, entry in engines.items())
        total = sum(entry["bytes"] for entry in engines.values())
        lines.append(f"engine files MiB: {sizes} (total {total / 2**20:.1f}, {total / max(plan.weight_bytes, 1):.2f}x the weights)")
        lines.append("engine device memory: " + (", ".join(f"{g} {v / 2**20:.1f} MiB" for g, v in reported.items()) if known
                     else "not reported (the engines cannot be loaded on this machine: no GPU); activations estimated"))
    return {
        **memory.plan_dict(plan),
        "engine_bytes": {graph: entry["bytes"] for graph, entry in engines.items()},
        "engine_device_memory": reported or None,
        "lines": lines,
    }
