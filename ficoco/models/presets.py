"""Offline tiny LLaVA presets with the real token geometry.

Two presets, ``tiny-llava-1.5`` and ``tiny-llava-next``, are built without network
access: a deterministic byte-level BPE tokenizer learned from a small corpus
embedded below, a CLIP-ViT-L/14-336 shaped vision tower (24 layers, 577 tokens)
with tiny widths, and a tiny GQA Llama decoder, all with seeded random weights.
They are written with ``save_pretrained`` and read back through :func:`load`,
which is the same code path a real local checkpoint directory (for example a
``llava-hf/llava-1.5-7b-hf`` snapshot) goes through. The real-weights preset ``smol-llava-1.5``
(``ficoco/models/real_presets.py``) is resolved, built and cached by the same functions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import ModelSourceError, check_checkpoint

PRESET_VERSION = "v1"
"""Bumped whenever the bytes a preset build produces change; part of the cache dir name."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
IMAGE_TOKEN = "<image>"

# The llava-hf LLaVA-1.5 chat template: "USER: <image>\n<text> ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = """
USER: <image>
Describe the image. ASSISTANT: The image shows a cat sitting on a wooden table next to a cup of coffee.
USER: What is the color of the cat? ASSISTANT: The cat is orange and white, with green eyes.
USER: What is in this photo? ASSISTANT: An astronaut is riding a horse on the moon, and a rocket
stands in the background under a dark sky full of stars.
USER: Describe this picture in detail. ASSISTANT: There is a red rocket on a launch pad. Smoke and
fire come out of the engines while people watch from far away. The sky is blue and clear.
USER: Is there a dog in the image? ASSISTANT: No, there is no dog. There are two cats and a bird.
USER: What color is the car? ASSISTANT: The car is black. It is parked near a small coffee shop
on a busy street in the city. A man is walking with a yellow umbrella because it is raining.
USER: How many people are in the photo? ASSISTANT: There are three people: a woman, a child and
an old man. They are smiling and looking at the camera.
USER: What is the astronaut holding? ASSISTANT: The astronaut is holding a flag and a camera.
USER: Where was this photo taken? ASSISTANT: It looks like a kitchen with a window, a green plant,
a white fridge and a coffee machine. Morning light comes through the window.
USER: Can you read the text on the sign? ASSISTANT: The sign says "open", written in large letters.
USER: What is the weather like? ASSISTANT: It is sunny and warm; a few white clouds are in the sky.
USER: Describe the colors of the image. ASSISTANT: The main colors are blue, green, red, yellow,
orange, purple, brown, gray, pink, black and white.
USER: What animal is this? ASSISTANT: This is a brown dog with long ears playing in the grass.
USER: What is on the plate? ASSISTANT: A pizza with cheese and tomato, some bread, and an apple.
USER: Give a short caption. ASSISTANT: A cute cat sleeping on a soft blue chair at night.
The numbers are 0 1 2 3 4 5 6 7 8 9 10 12 24 42 100 336 576 2024.
What, where, when, why, who, which, how? Yes, no, maybe. I think that this is a good answer.
"""


@dataclass(frozen=True)
class PresetSpec:
    """Geometry and seed of one tiny preset; validated on construction."""

    name: str
    architecture: str  # "llava" (LLaVA-1.5) or "llava_next" (LLaVA-NeXT / 1.6)
    image_size: int = 336
    patch_size: int = 14
    vision_layers: int = 24
    vision_hidden: int = 64
    vision_heads: int = 4
    vision_intermediate: int = 128
    projection_dim: int = 64
    text_hidden: int = 128
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    text_layers: int = 8
    max_position_embeddings: int = 4096
    initializer_range: float = 0.1  # text model, projector (and image_newline)
    vision_initializer_range: float = 0.2  # CLIP tower; 0.1 leaves its attention near-uniform
    seed: int = 0
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in ("llava", "llava_next"):
            raise ValueError(f"preset {self.name!r}: unknown architecture {self.architecture!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"preset {self.name!r}: image_size {self.image_size} not a multiple of patch_size")
        if self.vision_hidden % self.vision_heads or self.text_hidden % self.text_heads:
            raise ValueError(f"preset {self.name!r}: hidden size not divisible by the number of heads")
        if self.text_heads % self.text_kv_heads:
            raise ValueError(f"preset {self.name!r}: text_heads {self.text_heads} not a multiple of kv heads")
        stds = (self.initializer_range, self.vision_initializer_range)
        if self.vision_layers < 2 or self.text_layers < 1 or min(stds) <= 0:
            raise ValueError(f"preset {self.name!r}: needs >= 2 vision layers, >= 1 text layer, std > 0")
        if (self.architecture == "llava_next") != bool(self.image_grid_pinpoints):
            raise ValueError(f"preset {self.name!r}: image_grid_pinpoints is required exactly for llava_next")
        for h, w in self.image_grid_pinpoints:
            if h % self.image_size or w % self.image_size:
                raise ValueError(f"preset {self.name!r}: pinpoint {(h, w)} not a multiple of {self.image_size}")

    @property
    def num_patches(self) -> int:
        """Patch tokens per 336x336 crop (576 for 336/14)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_vision_tokens(self) -> int:
        """Vision-tower sequence length: patches + CLS (577)."""
        return self.num_patches + 1


PRESETS: dict[str, PresetSpec] = {
    "tiny-llava-1.5": PresetSpec(name="tiny-llava-1.5", architecture="llava", seed=1234),
    "tiny-llava-next": PresetSpec(
        name="tiny-llava-next",
        architecture="llava_next",
        seed=5678,
        image_grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    ),
}


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE learning; ties are broken lexicographically, so the result is deterministic."""
    counts = Counter(words)
    seqs = {word: tuple(word) for word in counts}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in counts.items():
            seq = seqs[word]
            for pair in zip(seq, seq[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[word] = tuple(out)
    return merges


def build_tokenizer(num_merges: int = 500) -> Any:
    """Deterministic byte-level BPE tokenizer wrapped as a transformers fast tokenizer.

    Ids 0-4 are ``<unk> <s> </s> <pad> <image>``; the 256 byte symbols follow, then merges.
    Encoding prepends ``<s>`` like LLaVA's Llama tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = [piece for line in _CORPUS.splitlines() for piece, _ in pre.pre_tokenize_str(line)]
    merges = _learn_merges(words, num_merges)
    vocab_list = list(SPECIAL_TOKENS) + sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab_list += [a + b for a, b in merges if a + b not in vocab_list]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )


def _model_config(spec: PresetSpec, tokenizer: Any) -> Any:
    """LlavaConfig / LlavaNextConfig with a CLIP-ViT-L/14-336 geometry at tiny widths."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.projection_dim,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, initializer_range=spec.vision_initializer_range,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5, initializer_range=spec.initializer_range, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common = dict(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=spec.num_patches,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False, initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.architecture == "llava":
        return LlavaConfig(**common)
    return LlavaNextConfig(image_grid_pinpoints=[list(p) for p in spec.image_grid_pinpoints], **common)


def _processor(spec: PresetSpec, tokenizer: Any, chat_template: str = CHAT_TEMPLATE) -> Any:
    """LlavaProcessor / LlavaNextProcessor configured like the llava-hf checkpoints."""
    # The PIL backends need no torchvision and still save image_processor_type "CLIPImageProcessor" /
    # "LlavaNextImageProcessor", so AutoProcessor picks the best installed backend on load.
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor

    image_kwargs: dict[str, Any] = dict(
        do_resize=True, size={"shortest_edge": spec.image_size}, resample=3,
        do_center_crop=True, crop_size={"height": spec.image_size, "width": spec.image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )
    proc_kwargs: dict[str, Any] = dict(
        tokenizer=tokenizer, patch_size=spec.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN, chat_template=chat_template,
    )
    if spec.architecture == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(**image_kwargs), **proc_kwargs)
    image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=[list(p) for p in spec.image_grid_pinpoints], do_pad=True, **image_kwargs
    )
    return LlavaNextProcessor(image_processor=image_processor, **proc_kwargs)


@torch.no_grad()
def _init_weights(model: torch.nn.Module, spec: PresetSpec, only: tuple[str, ...] = ()) -> None:
    """Seeded re-initialisation, independent of how transformers initialised the model, so the
    bytes depend only on the spec: N(0, std) for every matrix/conv/embedding and the extra vector
    parameters (std is ``vision_initializer_range`` inside the vision tower, ``initializer_range``
    elsewhere); biases N(0, 0.02) and norm weights 1 + N(0, 0.05), deliberately not 0 and 1, so a
    re-implemented forward that drops a bias or a norm scale does not match by accident.
    ``only``: if given, just the parameters whose names start with one of these prefixes."""
    gen = torch.Generator().manual_seed(spec.seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if only and not name.startswith(only):
            continue
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if leaf == "bias":
            param.copy_(noise * 0.02)
        elif param.ndim >= 2 or leaf in ("class_embedding", "image_newline"):
            std = spec.vision_initializer_range if "vision_tower." in name else spec.initializer_range
            param.copy_(noise * std)
        else:  # LayerNorm / RMSNorm weights
            param.copy_(1.0 + noise * 0.05)


def build_preset(name: str, out_dir: str | Path) -> Path:
    """Build preset ``name`` into ``out_dir`` (model weights in float32 safetensors, tokenizer,
    image processor, processor config and chat template, all via ``save_pretrained``).
    Real-weights presets (``ficoco.models.real_presets.REAL_PRESETS``) are built by their own module."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from .real_presets import REAL_PRESETS, build_real_preset

    if name in REAL_PRESETS:
        return build_real_preset(name, out_dir)
    spec = _spec(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = _model_config(spec, tokenizer)
    cls = LlavaForConditionalGeneration if spec.architecture == "llava" else LlavaNextForConditionalGeneration
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left untouched
        torch.manual_seed(spec.seed)
        model = cls(config).to(torch.float32).eval()
    _init_weights(model, spec)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    _processor(spec, tokenizer).save_pretrained(out)
    return out


def preset_names() -> tuple[str, ...]:
    """Every preset name: the tiny ones (``PRESETS``), then the real-weights ones (``REAL_PRESETS``)."""
    from .real_presets import REAL_PRESETS

    return (*PRESETS, *REAL_PRESETS)


def _spec(name: str) -> PresetSpec:
    """The preset ``name`` or a ModelSourceError naming it."""
    if name not in PRESETS:
        raise ModelSourceError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return PRESETS[name]


def default_cache_dir() -> Path:
    """``$FICOCO_CACHE`` if set, else ``~/.cache/ficoco``."""
    env = os.environ.get("FICOCO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ficoco"


def _has_config(directory: Path) -> bool:
    """True if ``directory/config.json`` exists and parses as a JSON object."""
    try:
        with open(directory / "config.json", encoding="utf-8") as fh:
            return isinstance(json.load(fh), dict)
    except (OSError, ValueError):
        return False


def _build_cached(name: str, cache_root: Path) -> Path:
    """Build a preset once into ``cache_root``, atomically: a temporary sibling directory is
    filled and then ``os.replace``d into place, so the final path is never half-written."""
    final = cache_root / f"{name}-{PRESET_VERSION}"
    if _has_config(final):
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_root))
    try:
        build_preset(name, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _has_config(final):  # not a concurrent builder winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model_dir(name_or_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Map a checkpoint directory or a preset name to a local directory with ``config.json``.

    A directory containing config.json is returned as is once ``ficoco.models.checkpoint`` found its weights,
    tokenizer and processor files complete and readable; a preset name is built once into
    ``cache_dir`` (else ``$FICOCO_CACHE``, else ``~/.cache/ficoco``); anything else raises
    :class:`ModelSourceError`.
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir() and _has_config(path):
        check_checkpoint(path)
        return path
    if str(name_or_dir) in preset_names():
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return _build_cached(str(name_or_dir), root)
    if path.is_dir():
        raise ModelSourceError(f"model directory '{path}' has no readable config.json")
    raise ModelSourceError(
        f"model '{name_or_dir}' is neither a preset ({', '.join(preset_names())}) nor a directory with config.json"
    )


def load(
    name_or_dir: str | Path, dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None
) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a preset name or a local checkpoint directory.

    Presets and real checkpoints share this code path; nothing touches the network
    (``local_files_only=True``). The model is returned in eval mode.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    directory = resolve_model_dir(name_or_dir, cache_dir)
    processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(directory, local_files_only=True, dtype=dtype)
    model.eval()
    return model, processor
