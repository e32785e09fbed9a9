"""Memory plan of a FiCoCo LLaVA build (weights per graph, KV cache, activations) and the devices it fits.

    python scripts/memory.py --model llava-1.5-7b --variant v --ratio 0.25 --weights fp16 --max-seq-len 2048
    python scripts/memory.py --model llava-1.5-7b --variant l --ratio 0.5 --weights int4
    python scripts/memory.py --model llava-1.5-7b --variant none --weights int8 --json
    python scripts/memory.py --model llava-v1.6-vicuna-7b --variant vl --ratio 0.25 --max-seq-len 4096 --prompt-len 1024

`--model` takes what scripts/flops.py takes: a shipped shape-only config (scripts/configs/NAME.json),
a checkpoint directory or config.json, or a preset name. No weights are read. The counting and the
device table are `ficoco.analysis.memory`'s; bad input prints one `error: ...` line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/memory.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ficoco.config import FiCoCoConfig
from ficoco.analysis.memory import KV_DTYPES, WEIGHTS, format_plan, plan_dict, plan_memory
from ficoco.plan import DEFAULT_MAX_SEQ_LEN
from scripts.flops import load_model_config, shipped_models


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are ValueErrors, so main() prints them as one line."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def _grid(text: str) -> tuple[int, int]:
    """'2x2' -> (2, 2)."""
    rows, _, cols = text.lower().partition("x")
    return int(rows), int(cols)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python scripts/memory.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llava-1.5-7b",
                   help=f"shipped config ({', '.join(shipped_models())}), checkpoint dir or preset (default llava-1.5-7b)")
    p.add_argument("--variant", default="v", choices=("none", "v", "l", "vl"), help="FiCoCo variant (default v)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, help="fraction of visual tokens kept (FiCoCoConfig ratio)")
    amount.add_argument("--tokens", type=int, help="or visual tokens kept per crop")
    p.add_argument("--weights", default="fp16", choices=WEIGHTS, help="decoder weights (default fp16)")
    p.add_argument("--vision-weights", choices=WEIGHTS, help="vision graph weights (default: --weights)")
    p.add_argument("--kv-dtype", choices=tuple(KV_DTYPES), help="KV cache element type (default fp16; fp32 with fp32 weights)")
    p.add_argument("--block-size", type=int, default=32, help="int4 quantization block (input elements, default 32)")
    p.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                   help=f"prompt + answer tokens the KV cache holds (default {DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--prompt-len", type=int,
                   help="longest prompt (visual tokens included) the prefill activations are sized for (default: --max-seq-len)")
    p.add_argument("--grid", type=_grid, help="LLaVA-NeXT anyres grid RxC (default: the one with most crops)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    return p.parse_args(argv)


def ficoco_of(args: argparse.Namespace) -> FiCoCoConfig | None:
    """The FiCoCoConfig that --variant / --ratio / --tokens ask for (None for --variant none)."""
    if args.variant == "none":
        if args.ratio is not None or args.tokens is not None:
            raise ValueError("--ratio / --tokens need a FiCoCo variant (v, l or vl), not --variant none")
        return None
    if args.ratio is None and args.tokens is None:
        raise ValueError(f"--variant {args.variant} needs --ratio or --tokens")
    return FiCoCoConfig(args.variant, ratio=args.ratio, tokens=args.tokens)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        config = load_model_config(args.model)
        plan = plan_memory(config, ficoco_of(args), args.max_seq_len, args.weights, args.grid,
                           vision_weights=args.vision_weights, kv_dtype=args.kv_dtype, block_size=args.block_size,
                           prompt_len=args.prompt_len)
    except (ValueError, KeyError) as error:  # KeyError: a config.json without a shape field
        message = f"missing config field {error}" if isinstance(error, KeyError) else str(error)
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(plan_dict(plan), indent=2) if args.json else "\n".join(format_plan(plan)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
