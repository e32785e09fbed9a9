"""`Pipeline`: a build opened once (backend sessions, buffers, tokenizer, preprocessing), called many times.

    from runtime import Pipeline
    pipe = Pipeline.from_build("builds/tiny-llava-1.5-v-r0.5-fp32")          # backend="auto"
    result = pipe("photo.jpg", "Describe the image.", max_new_tokens=64)     # greedy
    result = pipe(image, "What is this?", temperature=0.7, top_p=0.9, seed=0, on_text=print)
    result.text, result.token_ids, result.tokens, result.timings

Nothing is ever written into the build directory.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import loop
from .backend import Backend, open_backend
from .manifest import Build, BuildError
from .preprocess import ImageInput, Pixels, PreprocessConfig, preprocess
from .prompt import ChatTokenizer, PromptError, PromptIds


@dataclass(frozen=True)
class TokenCounts:
    """Visual tokens at each stage (from the build's schedule) and the prompt's text tokens."""

    patches_per_crop: int  # before FiCoCo-V
    kept_per_crop: int  # after FiCoCo-V
    crops: int
    into_llm: int  # visual tokens in the prompt (NeXT: plus one newline per grid row)
    after_ficoco_l: int  # after the last FiCoCo-L step (= into_llm without one)
    text_before: int
    text_after: int
    prompt: int  # P = text_before + into_llm + text_after
    generated: int

    def __post_init__(self) -> None:
        if self.prompt != self.text_before + self.into_llm + self.text_after or min(asdict(self).values()) < 0:
            raise ValueError(f"inconsistent token counts {asdict(self)}")


@dataclass(frozen=True)
class Timings:
    """Milliseconds per stage; prefill_ms ends when the first token is chosen."""

    preprocess_ms: float  # image decode + resize/crop/normalise + prompt rendering and tokenization
    vision_ms: float
    prefill_ms: float
    decode_ms: float  # all decode steps (generated - 1 of them)
    decode_tokens_per_s: float | None  # (generated - 1) / decode time; None with a single token
    time_to_first_token_ms: float  # preprocess + vision + prefill
    total_ms: float
    peak_rss_mb: float  # resource.getrusage(RUSAGE_SELF).ru_maxrss: the process's peak so far

    def __post_init__(self) -> None:
        stages = (self.preprocess_ms, self.vision_ms, self.prefill_ms, self.decode_ms, self.total_ms)
        if min(stages) < 0:
            raise ValueError(f"negative timing in {stages}")


@dataclass(frozen=True)
class Result:
    text: str
    token_ids: tuple[int, ...]
    stop_reason: str  # "eos" | "length"
    tokens: TokenCounts
    cache_lengths: tuple[int, ...]  # per decoder layer, after the prefill
    timings: Timings
    backend: str

    def __post_init__(self) -> None:
        if self.stop_reason not in ("eos", "length"):
            raise ValueError(f"stop_reason must be 'eos' or 'length', got {self.stop_reason!r}")
        if len(self.token_ids) != self.tokens.generated:
            raise ValueError(f"{len(self.token_ids)} token ids but tokens.generated is {self.tokens.generated}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["token_ids"], out["cache_lengths"] = list(self.token_ids), list(self.cache_lengths)
        return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


class _Clock:
    """Marks on one perf_counter; `ms(a, b)` between two marks."""

    def __init__(self) -> None:
        self.marks = {"start": time.perf_counter()}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def ms(self, start: str, end: str) -> float:
        return (self.marks[end] - self.marks[start]) * 1e3


def warn_if_unverified(build: Build) -> None:
    """One line on stderr for a build published with --allow-parity-failure or --no-verify."""
    parity = build.parity
    if parity is None:
        print(f"warning: build {build.directory} was not verified against PyTorch (--no-verify)", file=sys.stderr)
    elif not parity.get("passed", False):
        print(f"warning: build {build.directory} FAILED its parity check (published with --allow-parity-failure); "
              "see its parity.json", file=sys.stderr)


class Pipeline:
    """Build + backend + tokenizer + preprocessing; `__call__` answers one (image, prompt)."""

    def __init__(self, build: Build, backend: Backend, tokenizer: ChatTokenizer, preprocess_config: PreprocessConfig):
        if tokenizer.image_token_id != build.image_token_id:
            raise BuildError(f"tokenizer's image token id {tokenizer.image_token_id} != manifest's {build.image_token_id}")
        self.build, self.backend, self.tokenizer, self.preprocess_config = build, backend, tokenizer, preprocess_config

    @classmethod
    def from_build(cls, directory: str | Path, backend: str = "auto", verify_files: bool = True) -> Pipeline:
        """Open a build; `verify_files` checks the sha256 of the tokenizer files and the backend's graphs/engines."""
        build = Build.from_directory(directory)
        warn_if_unverified(build)
        if verify_files:
            build.check("tokenizer")
        build.check_eos()
        tokenizer = ChatTokenizer.from_directory(build.directory, build.image_token)
        return cls(build, open_backend(backend, build, verify_files), tokenizer, build.preprocess)

    def prepare(self, image: ImageInput, prompt: str, max_new_tokens: int) -> tuple[Pixels, PromptIds]:
        """Check and preprocess the inputs; PromptError / ImageError / BuildError say what is wrong."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        ids = self.tokenizer.encode(prompt)
        plan = self.build.plan
        total = ids.length(plan) + max_new_tokens
        if total > plan.max_seq_len:
            raise PromptError(
                f"prompt too long: {ids.before.shape[1]} + {plan.visual_tokens} visual + {ids.after.shape[1]} tokens "
                f"+ max_new_tokens {max_new_tokens} = {total} > max_seq_len {plan.max_seq_len} of this build"
            )
        pixels = preprocess(image, self.preprocess_config, self.build.architecture)
        if pixels.pixel_values.shape[0] != plan.crops:
            raise BuildError(f"preprocessing gave {pixels.pixel_values.shape[0]} crops (grid {pixels.grid}); "
                             f"the build takes {plan.crops} (grid {plan.grid})")
        return pixels, ids

    def __call__(
        self, image: ImageInput, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int | None = None, on_text: Callable[[str], Any] | None = None,
    ) -> Result:
        """Answer `prompt` about `image` (path or PIL image); `on_text` receives the text as it is generated."""
        sampling = loop.Sampling(temperature, top_k, top_p, seed)
        clock = _Clock()
        pixels, ids = self.prepare(image, prompt, max_new_tokens)
        clock.mark("preprocessed")
        features = self.backend.vision(pixels.pixel_values)
        clock.mark("vision")
        prompt_length, lengths = ids.length(self.build.plan), []

        def prefill() -> tuple[Any, Any]:
            logits, cache = self.backend.prefill(ids.before, features, ids.after)
            lengths.extend(self.backend.cache_lengths(cache))
            return logits, cache

        stream, tokens = self.tokenizer.stream(), []
        for token in loop.decode_tokens(prefill, self.backend.decode, prompt_length, max_new_tokens,
                                        set(self.build.eos_token_ids), loop.sampler(sampling)):
            clock.mark("first" if not tokens else "last")
            tokens.append(token)
            if on_text is not None and (piece := stream.push(token)):
                on_text(piece)
        if on_text is not None and (rest := stream.flush()):
            on_text(rest)
        clock.mark("done")
        return self._result(ids, tokens, lengths, clock)

    def _result(self, ids: PromptIds, tokens: list[int], lengths: list[int], clock: _Clock) -> Result:
        b, p, last = self.build, self.build.plan, "last" if len(tokens) > 1 else "first"
        decode_ms = clock.ms("first", last)
        counts = TokenCounts(
            p.patches_per_crop, p.kept_per_crop, p.crops, p.visual_tokens, p.visual_after_language,
            ids.before.shape[1], ids.after.shape[1], ids.length(p), len(tokens),
        )
        timings = Timings(
            preprocess_ms=clock.ms("start", "preprocessed"), vision_ms=clock.ms("preprocessed", "vision"),
            prefill_ms=clock.ms("vision", "first"), decode_ms=decode_ms,
            decode_tokens_per_s=(len(tokens) - 1) / decode_ms * 1e3 if len(tokens) > 1 and decode_ms > 0 else None,
            time_to_first_token_ms=clock.ms("start", "first"), total_ms=clock.ms("start", "done"), peak_rss_mb=peak_rss_mb(),
        )
        stop = "eos" if tokens and tokens[-1] in b.eos_token_ids else "length"
        return Result(self.tokenizer.decode(tokens), tuple(tokens), stop, counts, tuple(lengths), timings, self.backend.name)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
