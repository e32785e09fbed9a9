"""`python -m ficoco.demo`: answer a question about an image with and without FiCoCo, and show what it saved.

    python -m ficoco.demo --variant vl --ratio 0.25
    python -m ficoco.demo --model /path/to/llava-1.5-7b-hf --image photo.jpg --prompt "What is shown?"

With no --model it uses the offline `tiny-llava-1.5` preset (random weights: the
answers are gibberish, the token accounting and timings are real).
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ficoco.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llava-1.5", help="preset name or local Hugging Face checkpoint dir")
    parser.add_argument("--variant", choices=["v", "l", "vl"], default="vl")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, help="fraction of visual tokens kept (default 0.25)")
    amount.add_argument("--tokens", type=int, help="visual tokens kept per image")
    parser.add_argument("--image", help="image file (default: a generated test picture)")
    parser.add_argument("--prompt", default="Describe the image.")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.ratio is None and args.tokens is None:
        args.ratio = 0.25
    return args


def load_image(path: str | None):
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path is None:
        return Image.linear_gradient("L").resize((500, 400)).convert("RGB")
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")  # as HF's load_image does for files
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {path!r}: {error}") from None


def answer(model, processor, inputs, max_new_tokens: int) -> tuple[str, float, object]:
    """Greedy answer, seconds taken, and the prefill output (for token accounting)."""
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        prefill = model(**inputs, use_cache=True)
    text = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return text, seconds, prefill


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from . import FiCoCoConfig, apply
        from .models.presets import load

        config = FiCoCoConfig(args.variant, ratio=args.ratio, tokens=args.tokens)
        image = load_image(args.image)
        print(f"[1/3] loading {args.model}", flush=True)
        model, processor = load(args.model)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        print("[2/3] generating without FiCoCo", flush=True)
        rows = [("vanilla", *answer(model, processor, inputs, args.max_new_tokens))]
        apply(model, config)
        print(f"[3/3] generating with FiCoCo-{args.variant.upper()}", flush=True)
        rows.append((f"FiCoCo-{args.variant.upper()}", *answer(model, processor, inputs, args.max_new_tokens)))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\nschedule: vision {[(s.layer, s.tokens_out) for s in model.ficoco_plan.vision]} per crop")
    for name, text, seconds, prefill in rows:
        kv = [layer.keys.shape[-2] for layer in prefill.past_key_values.layers]
        print(f"{name:>10}: {prefill.image_hidden_states.shape[0]:5d} visual tokens into the LLM, "
              f"KV per layer {kv}, generate {seconds:.2f}s\n{'':>12}{text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
