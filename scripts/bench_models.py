"""What `scripts/bench.py` times: the models and graphs, built and exported with the project's own
code, and the two systems of the chat comparison (Hugging Face `generate`, `runtime.Pipeline`).

Widths: CLIP ViT-L/14-336 (LLaVA-1.5's vision tower) and Vicuna-7B's decoder (LLaVA-1.5-7B's LLM),
with seeded random weights (matrices N(0, 0.02), biases 0, norm scales 1): the time of a
static-shape graph does not depend on the values. Graphs go through `export.trace.graphs.graph_set` and
`export.trace.pipeline.export_graph` exactly as `export.build` makes them (the build layout of
`runtime.names`: vision.onnx, and the LLM as decoder segments and weightless FiCoCo-L reductions,
with the same dynamic dims), and ONNX Runtime sessions are opened with the runtime's options plus
an explicit thread count. The prefill is the runtime's own (`runtime.backend_ort.OrtBackend` through
`runtime.chain.Chain`, `prefill_step`).
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import platform
import resource
import shutil
import statistics
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ficoco.plan import DEFAULT_MAX_SEQ_LEN

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000)
SMALL_TEXT = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1000)  # behind the vision benchmark: only the projector is timed
TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4,
                 image_size=336, patch_size=14, projection_dim=64)  # behind the prefill benchmark: not timed
QUICK_TEXT = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                  num_hidden_layers=6)  # --quick's prefill decoder (a quarter of Vicuna-7B's width)
SMOKE_TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
                  num_hidden_layers=5)
SEED = 0


def random_llava(vision: dict, text: dict, seed: int = SEED):
    """LlavaForConditionalGeneration (LLaVA-1.5 layout: CLIP features at hidden_states[-2], CLS dropped)
    with the given CLIP / Llama widths and seeded random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision_config = CLIPVisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5, **vision)
    text_config = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, **text)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=text["vocab_size"] - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=False)
    return empty_model(config, seed)


def empty_model(config, seed: int = SEED):
    """LlavaForConditionalGeneration of `config` without transformers' (slow) initialisation, then
    `randomize`d; buffers (CLIP position ids, RoPE frequencies) are computed as usual."""
    from transformers import LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = LlavaForConditionalGeneration(config)
    randomize(model.eval(), seed)
    return model


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)


def describe_model(model) -> dict:
    """The widths that set the timed cost, for the report."""
    v, t = model.config.vision_config, model.config.text_config
    return {
        "vision": {k: getattr(v, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                               "image_size", "patch_size")},
        "text": {k: getattr(t, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                             "num_key_value_heads", "vocab_size")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": "seeded random (matrices N(0, 0.02), biases 0, norm scales 1), fp32",
    }


MAX_SEQ_LEN = DEFAULT_MAX_SEQ_LEN  # the exported graphs' bound on the sequence (export.build's default)


def patched(model, variant: str, ratio: float):
    """ficoco.apply with the export's settings (static crop layout) -> (patch plan, ficoco.BuildPlan);
    ratio 1.0 is the unreduced model."""
    from ficoco import FiCoCoConfig, apply, plan

    config = FiCoCoConfig(variant, ratio=ratio, crop_layout="crops")
    apply(model, config)
    return model.ficoco_plan, plan(model.config.to_dict(), config, None)


def graph_set(model, variant: str, ratio: float):
    """The build's torch modules (`export.trace.graphs.GraphSet`) of `model` under FiCoCo-`variant` at `ratio`."""
    from export.trace.graphs import graph_set as make

    return make(model, *patched(model, variant, ratio))


def export_vision(model, ratio: float, path: Path) -> dict:
    """vision.onnx of `model` under FiCoCo-V at `ratio` (path: DIR/vision.onnx); returns the schedule."""
    from export.trace.pipeline import export_graph, is_large
    from runtime import names

    graphs = graph_set(model, "v", ratio)
    side = model.config.vision_config.image_size
    export_graph(graphs, names.VISION, (torch.zeros(1, 3, side, side),), path.parent, MAX_SEQ_LEN, is_large(model))
    plan = graphs.plan
    return {"vision": [[s.layer, s.tokens_in, s.tokens_out] for s in plan.vision], "kept_per_crop": plan.kept_per_crop}


def prefill_inputs(model, visual: int, before: int, after: int, seed: int = SEED) -> tuple[torch.Tensor, ...]:
    """(ids before [1, before], image features [visual, D], ids after [1, after]), seeded."""
    generator = torch.Generator().manual_seed(seed)
    text = model.config.text_config
    ids = torch.randint(0, text.vocab_size - 1, (1, before + after), generator=generator)  # never the image id
    features = torch.randn(visual, text.hidden_size, generator=generator)
    return ids[:, :before], features, ids[:, before:]


BENCH_PREPROCESS = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "backend": "pil",
                    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def export_prefill(model, variant: str, ratio: float, directory: Path, before: int, after: int):
    """A build of `model` under FiCoCo-`variant` at `ratio` in `directory` that the runtime opens
    (`runtime.manifest.Build`): every graph of the build layout traced and exported as `export.build`
    does (`example_args`, `export_graph`, `embedding_entry`), with a manifest (no tokenizer, not verified)."""
    from types import SimpleNamespace

    from export.trace import pipeline
    from runtime import manifest

    graphs = graph_set(model, "v" if variant == "none" else variant, ratio)
    side, vocab = model.config.vision_config.image_size, model.config.text_config.vocab_size
    ids_before, _, ids_after = prefill_inputs(model, graphs.plan.visual_tokens, before, after)
    sample = SimpleNamespace(pixel_values=np.zeros((1, 3, side, side), np.float32),
                             before=ids_before.numpy(), after=ids_after.numpy())
    args, large = pipeline.example_args(graphs, sample), pipeline.is_large(model)
    entries = {graph: pipeline.export_graph(graphs, graph, args[graph], directory, MAX_SEQ_LEN, large) for graph in graphs.exported}
    manifest.write(directory, {
        "source": {"model": "bench", "architecture": type(model).__name__,
                   "text": {"image_token_id": model.config.image_token_id, "eos_token_ids": [vocab - 2]}},
        "variant": graphs.plan.variant, "schedule": graphs.plan.to_dict(), "precision": "fp32",
        "preprocess": BENCH_PREPROCESS, "graphs": entries, "embedding": pipeline.embedding_entry(graphs, directory, entries)})
    return manifest.Build.from_directory(directory)


def prefill_step(build, inputs: dict, threads: int):
    """The runtime's prefill (`runtime.backend_ort.OrtBackend` through `runtime.chain.Chain`) on a build, as a
    function to time: `inputs` holds ids before [1, Tb], image features [n, D] and ids after [1, Ta]."""
    from runtime.backend_ort import OrtBackend

    backend = OrtBackend(build, threads=threads)

    def prefill() -> np.ndarray:
        return backend.prefill(inputs["before"], inputs["features"], inputs["after"])[0]

    prefill.backend = backend
    return prefill


def ort_options(threads: int):
    """The runtime's session options (runtime/backend_ort.py) with intra_op_num_threads = `threads`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return options


class OrtGraph:
    """One ONNX graph on the CPU provider, run through IO binding (outputs left to ONNX Runtime, as the runtime does)."""

    def __init__(self, path: Path, threads: int, feeds: dict):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), ort_options(threads), providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.feeds = {name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in feeds.items()}
        for name, value in self.feeds.items():  # bound by address: self.feeds keeps the arrays alive
            self.binding.bind_cpu_input(name, value)
        for output in self.session.get_outputs():
            self.binding.bind_output(output.name, "cpu")

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)


# --------------------------------------------------------------------------- timing


def measure(fns: dict, repeats: int, warmup: int) -> dict:
    """{key: {"ms": median, "samples_ms": [...]}}: `warmup` untimed calls each, then `repeats` rounds
    calling every function once per round (interleaved, so a change of load hits all alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[key].append((time.perf_counter() - start) * 1e3)
    return {key: {"ms": statistics.median(s), "samples_ms": [round(x, 3) for x in s]} for key, s in samples.items()}


def time_graphs(specs: dict, repeats: int, warmup: int) -> tuple[dict, bool]:
    """Time ONNX graphs {key: (directory, open)}: `open()` loads the directory's graphs and returns the
    function to time. All open and interleaved when their weights fit comfortably in memory, else one
    at a time (each directory removed once timed). Returns (times, interleaved)."""
    weights = sum(sum(f.stat().st_size for f in Path(directory).glob("*")) for directory, _ in specs.values())
    together = weights < 0.25 * available_bytes()  # ONNX Runtime holds about twice the weights (prepacked copies)
    if together:
        graphs = {key: open_() for key, (_, open_) in specs.items()}
        times = measure(graphs, repeats, warmup)
        graphs.clear()
        return times, True
    times = {}
    for key, (directory, open_) in specs.items():
        graph = open_()
        times.update(measure({key: graph}, repeats, warmup))
        del graph
        gc.collect()
        shutil.rmtree(directory, ignore_errors=True)  # large graphs: free the disk as we go
    return times, False


def available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        info = dict(line.split(":", 1) for line in handle)
    return int(info["MemAvailable"].split()[0]) * 1024


@contextlib.contextmanager
def quiet(log: io.StringIO):
    """The exporters' chatter (prints, warnings) goes to `log` (bench.log); torch's own logging is silenced
    (its handlers write to the terminal: the exporter logs the guards of a retried trace as errors)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def repeat_runs(run, repeats: int, warmup: int) -> dict:
    """Medians over `repeats` calls of `run` (a dict of figures) after `warmup` calls; the first call's token ids."""
    for _ in range(warmup):
        run()
    runs = [run() for _ in range(repeats)]
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "token_ids" and runs[0][key] is not None}
    return {**out, "samples": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs], "token_ids": runs[0]["token_ids"]}


# --------------------------------------------------------------------------- the chat model (HF vs runtime)


def chat_model_dir(kind: str, out: Path) -> Path:
    """A local LLaVA-1.5 checkpoint for the HF-vs-runtime comparison, written to `out`.

    "tiny": the tiny-llava-1.5 preset. "wide": CLIP ViT-L/14-336 and a 2048-wide, 8-layer Llama
    (TinyLlama-1.1B's widths, vocabulary 32000) with the preset's tokenizer and processor.
    Either way the LM head rows of EOS and of ids the tokenizer lacks are zeroed, so greedy
    decoding of the random weights never stops early and always runs max_new_tokens steps.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from ficoco.models.presets import resolve_model_dir

    tiny = resolve_model_dir("tiny-llava-1.5")
    if kind == "tiny":
        model = LlavaForConditionalGeneration.from_pretrained(tiny)
    elif kind == "wide":
        config = LlavaConfig.from_pretrained(tiny)
        tokenizer_size = config.text_config.vocab_size
        config.vision_config.update(CLIP_L_336)
        config.text_config.update(dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
                                       num_key_value_heads=4, head_dim=64, vocab_size=32000))
        model = empty_model(config)
        with torch.no_grad():
            model.lm_head.weight[tokenizer_size:] = 0.0
    else:
        raise ValueError(f"chat model must be 'tiny' or 'wide', got {kind!r}")
    with torch.no_grad():
        model.lm_head.weight[model.config.text_config.eos_token_id] = 0.0
    model.save_pretrained(out)
    for name in tiny.iterdir():  # tokenizer, processor, chat template
        if name.is_file() and name.name not in ("config.json", "model.safetensors"):
            shutil.copy2(name, out / name.name)
    return out


def test_image():
    """A deterministic 500x400 RGB picture (gradients plus seeded noise), the same for both systems."""
    from PIL import Image

    y, x = np.mgrid[0:400, 0:500]
    rgb = np.stack([x * 255 / 500, y * 255 / 400, (x + y) % 256], axis=-1) + np.random.default_rng(0).normal(0, 20, (400, 500, 3))
    return Image.fromarray(rgb.clip(0, 255).astype("uint8"))


class Stamps:
    """A `generate` streamer that notes the time of every put (the prompt first, then each new token)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_run(model, processor, image, instruction: str, new_tokens: int) -> dict:
    """One Hugging Face answer, timed as runtime.Pipeline's Timings are: the clock starts before the
    chat template and the processor, the first token ends the time to first token."""
    start, streamer = time.perf_counter(), Stamps()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=streamer)
    first, last, tokens = streamer.times[1], streamer.times[-1], out[0, inputs["input_ids"].shape[1]:].tolist()
    return {"ttft_ms": (first - start) * 1e3, "token_ids": tokens,
            "decode_tokens_per_s": (len(tokens) - 1) / (last - first) if len(tokens) > 1 else None}


def runtime_run(pipe, image, instruction: str, new_tokens: int) -> dict:
    result = pipe(image, instruction, max_new_tokens=new_tokens)
    t = result.timings
    return {"ttft_ms": t.time_to_first_token_ms, "decode_tokens_per_s": t.decode_tokens_per_s,
            "vision_ms": t.vision_ms, "prefill_ms": t.prefill_ms, "token_ids": list(result.token_ids)}


def open_pipeline(build: Path, threads: int):
    """runtime.Pipeline on ONNX Runtime with intra_op_num_threads = threads (from_build leaves ORT's default)."""
    from runtime.backend_ort import OrtBackend
    from runtime.manifest import Build
    from runtime.pipeline import Pipeline
    from runtime.preprocess import PreprocessConfig
    from runtime.prompt import ChatTokenizer

    b = Build.from_directory(build)
    tokenizer = ChatTokenizer.from_directory(b.directory, (b.manifest.get("tokenizer") or {}).get("image_token") or "<image>")
    return Pipeline(b, OrtBackend(b, threads=threads), tokenizer, PreprocessConfig.from_dict(b.manifest["preprocess"]))


def cache_bytes(backend) -> int:
    """Bytes of a runtime backend's KV cache: every layer's key and value buffer (`backend.cache`, host
    arrays on ONNX Runtime), allocated once at the layer's capacity: the one copy the runtime holds."""
    cache = backend.cache
    return sum(int(buffer.nbytes) for buffer in [*cache.keys, *cache.values])


def hf_decode_step_ms(model, lengths, repeats: int, warmup: int) -> dict[int, float]:
    """{L: median ms of one HF forward of one token over a zero-filled DynamicCache of length L}."""
    from transformers.cache_utils import DynamicCache

    text, out, token = model.config.text_config, {}, torch.tensor([[1]])
    heads, head_dim = text.num_key_value_heads, getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    for length in lengths:
        cache = DynamicCache(config=text)
        for layer in range(text.num_hidden_layers):
            cache.update(torch.zeros(1, heads, length, head_dim), torch.zeros(1, heads, length, head_dim), layer)
        times = []
        for _ in range(warmup + repeats):
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=token, past_key_values=cache, use_cache=True)
            times.append((time.perf_counter() - start) * 1e3)
            cache.crop(-1)  # back to L for the next step (untimed)
        out[int(length)] = statistics.median(times[warmup:])
    return out


# --------------------------------------------------------------------------- the machine


def machine(threads: int) -> dict:
    import onnxruntime
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "threads": threads,
            "ram_gb": round(ram, 1), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average_start": [round(x, 2) for x in os.getloadavg()]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def chat_builds(mode, args, work: Path, log, baseline: bool = True) -> tuple[dict[str, Path], Path | None]:
    """({"ficoco": build, "none": unreduced build (when made)}, the chat model's directory): --build (whose
    model is then found from its manifest), or export.build of the chat model (the unreduced build only
    when the mode asks for it and `baseline`)."""
    if args.build:
        return {"ficoco": args.build, **({"none": args.baseline_build} if args.baseline_build and baseline else {})}, None
    from export.build import main as build_main

    with quiet(log):
        source = chat_model_dir(mode.chat, work / "chat-model")
    wanted = {"ficoco": ["--variant", "v", "--ratio", str(mode.chat_ratio)]}
    if mode.baseline_build and baseline:
        wanted["none"] = ["--variant", "none"]
    builds = {}
    for key, variant in wanted.items():
        out = work / f"build-{key}"
        argv = ["--model", str(source), *variant, "--backend", "none", "--max-seq-len", str(2 * max(mode.lengths)),
                "--allow-parity-failure", "--out", str(out)]  # parity is still checked and recorded; a miss does not end the run
        with quiet(log):
            code = build_main(argv)
        if code != 0:
            raise RuntimeError(f"python -m export.build {' '.join(argv)} failed (exit {code}); see bench.log")
        builds[key] = out
    return builds, source
