"""`python -m runtime.generate`: answer a question about an image with a build, on ONNX Runtime or TensorRT.

    python -m runtime.generate --engine-dir builds/NAME --image photo.jpg --prompt "What is shown?"
    python -m runtime.generate --engine-dir builds/NAME --image photo.jpg --prompt "..." --stream
    python -m runtime.generate --engine-dir builds/NAME --image photo.jpg --prompt "..." --json

Prints the answer (token by token with --stream). --json prints one JSON object instead: the text,
the generated ids, the visual tokens at each stage, the per-layer cache lengths and the timings
(with --stream as well, the text streams to stderr and stdout stays one JSON object). Bad input
(image, prompt, build, backend) is reported in one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .backend import CHOICES, BackendError, BackendNotInstalledError
from .loop import SamplingError
from .manifest import BuildError
from .preprocess import ImageError
from .prompt import PromptError

USER_ERRORS = (BuildError, ImageError, PromptError, BackendNotInstalledError, SamplingError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.generate", description=__doc__.split("\n")[0])
    p.add_argument("--engine-dir", required=True, type=Path, help="build directory written by python -m export.build")
    p.add_argument("--image", required=True, help="image file (JPEG, PNG, ...)")
    p.add_argument("--prompt", required=True, help="the question or instruction about the image")
    p.add_argument("--backend", default="auto", choices=CHOICES,
                   help="auto: TensorRT when it, a CUDA device and engines are present, else ONNX Runtime")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 (default): off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 (default): off")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (numpy Generator)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, ids, token counts, timings")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the build's files")
    return p.parse_args(argv)


def utf8_text(value: str, flag: str) -> str:
    """A command-line string that was valid UTF-8; Python keeps undecodable argv bytes as lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = value[error.start:error.end]
        try:
            shown = repr(bad.encode("utf-8", "surrogateescape"))  # the bytes as they were given
        except UnicodeEncodeError:
            shown = ascii(bad)
        raise PromptError(f"{flag} is not UTF-8 text: {shown} at character {error.start}") from None
    return value


def run(args: argparse.Namespace) -> dict:
    """Open the build, answer once; returns the JSON record."""
    from .pipeline import Pipeline

    utf8_text(args.prompt, "--prompt")

    sink = sys.stderr if args.json else sys.stdout

    def show(piece: str) -> None:
        sink.write(piece)
        sink.flush()

    with Pipeline.from_build(args.engine_dir, backend=args.backend, verify_files=not args.no_verify) as pipe:
        result = pipe(
            args.image, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_text=show if args.stream else None,
        )
    if args.stream:
        show("\n")
    return {"build": str(args.engine_dir), "prompt": args.prompt, **result.to_dict()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        record = run(args)
    except USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except BackendError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(record))
    elif not args.stream:
        print(record["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
