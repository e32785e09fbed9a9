"""Chat prompt -> token ids around the image, and generated ids -> text, from a build's own files.

numpy, `tokenizers` and jinja2 only. The chat template is rendered the way transformers 5.23's
`render_jinja_template` renders it: a sandboxed jinja2 environment with `trim_blocks` and
`lstrip_blocks`, the `{% generation %}` block tag (a no-op here), loop controls, a `tojson` that does
not escape HTML, `raise_exception` and `strftime_now`, and the tokenizer's special tokens
(`bos_token`, `eos_token`, ...) as template variables, as `processor.apply_chat_template` passes them.

The rendered text is encoded once, whole, with the tokenizer's post-processor (the presets' and
LLaVA's `TemplateProcessing` adds `<s>`), exactly what `processor(text=...)` does, except that the
processor first repeats `<image>` once per visual token. `<image>` is a special added token, so
the text around it is tokenized the same either way; the ids are then split around the single
image token into `before` [1, Tb] and `after` [1, Ta] (export/trace/verify.py's `split_prompt`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ficoco.plan import BuildPlan

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


class PromptError(ValueError):
    """A prompt the build cannot take: empty, with its own image token, or too long; names the values."""


@dataclass(frozen=True, eq=False)
class PromptIds:
    """The prompt's ids around the image: before [1, Tb] (BOS, "USER: "), after [1, Ta] (text, "ASSISTANT:")."""

    text: str  # the rendered chat prompt, with one image token
    before: np.ndarray  # [1, Tb] int64
    after: np.ndarray  # [1, Ta] int64

    def __post_init__(self) -> None:
        for name, ids in (("before", self.before), ("after", self.after)):
            if ids.dtype != np.int64 or ids.ndim != 2 or ids.shape[0] != 1:
                raise PromptError(f"{name} ids must be int64 [1, T], got {ids.dtype} {list(ids.shape)}")
            if ids.shape[1] < 1:  # the prefill graph's text dims are >= 1
                raise PromptError(f"the rendered prompt {self.text!r} has no text {name} the image; the graphs need some")

    def length(self, plan: BuildPlan) -> int:
        """P = Tb + visual tokens + Ta: the prompt length in the original numbering (`BuildPlan.prompt_length`)."""
        return plan.prompt_length(self.before.shape[1], self.after.shape[1])


def _generation_extension() -> type:
    """The `{% generation %}...{% endgeneration %}` tag of HF chat templates, rendering its body as is."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    return Generation


def compile_template(source: str) -> Any:
    """A jinja2 Template configured like transformers' `_compile_jinja_template`."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_generation_extension(), "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_template(directory: Path) -> str:
    """The chat template a build carries: chat_template.jinja, chat_template.json, or tokenizer_config.json's."""
    from .manifest import BuildError

    for name in TEMPLATE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        if name.endswith(".jinja"):
            return text
        template = json.loads(text).get("chat_template")
        if isinstance(template, str):
            return template
    raise BuildError(f"{str(directory)!r} has no chat template (looked for {', '.join(TEMPLATE_FILES)})")


class TextStream:
    """Generated ids -> text pieces as they become printable (incomplete UTF-8 is held back).

    Decodes a window starting a few tokens back, as TGI and vLLM do, so that tokenizers which drop
    a leading space when decoding from a sequence start (SentencePiece / Metaspace) stay correct;
    the pieces concatenate to `decode(all ids)`.
    """

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]

    def flush(self) -> str:
        """What is still held back (a final incomplete character, shown as U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(done) :] if len(text) > len(done) else ""


class ChatTokenizer:
    """The build's tokenizer.json + chat template: prompt -> PromptIds, ids -> text."""

    def __init__(self, tokenizer: Any, template: str, image_token: str, specials: dict[str, str]):
        self.tokenizer, self.template_source = tokenizer, template
        self.template, self.image_token, self.specials = compile_template(template), image_token, specials
        image_id = tokenizer.token_to_id(image_token)
        if image_id is None:
            raise PromptError(f"image token {image_token!r} is not in the tokenizer's vocabulary")
        self.image_token_id: int = image_id

    @classmethod
    def from_directory(cls, directory: str | Path, image_token: str = "<image>") -> ChatTokenizer:
        """tokenizer.json, the chat template and tokenizer_config.json's special tokens of a build."""
        from tokenizers import Tokenizer

        from .manifest import BuildError

        directory = Path(directory)
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as error:  # tokenizers raises plain Exception
            raise BuildError(f"cannot load {str(directory / 'tokenizer.json')!r}: {error}") from None
        import jinja2

        config_path = directory / "tokenizer_config.json"
        try:  # the build's files as they enter (with --no-verify no sha256 has vouched for them)
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            if not isinstance(config, dict):
                raise ValueError(f"{config_path.name} holds {type(config).__name__}, not a JSON object")
            specials = {k: t for k, v in config.items() if k.endswith("_token") and (t := _token_text(v)) is not None}
            return cls(tokenizer, read_template(directory), image_token, specials)
        except PromptError:
            raise
        except (OSError, ValueError, AttributeError, jinja2.TemplateError) as error:  # JSON and UTF-8 errors are ValueErrors
            raise BuildError(f"{str(directory)!r}: unusable tokenizer config or chat template: {' '.join(str(error).split())[:200]}") from None

    def render(self, prompt: str) -> str:
        """The chat text for one user turn: an image, then `prompt`, then the assistant's cue."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"the prompt is empty ({prompt!r}); ask something about the image")
        if self.image_token in prompt:
            raise PromptError(f"the prompt must not contain the image token {self.image_token!r}; the image comes first")
        import jinja2

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        try:
            return self.template.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=True, **self.specials
            )
        except jinja2.TemplateError as error:  # raise_exception() in the template, or a template that cannot render
            raise PromptError(f"the build's chat template refused the prompt: {' '.join(str(error).split())[:200]}") from None

    def encode(self, prompt: str) -> PromptIds:
        """Render, encode whole (with the post-processor's BOS), split around the one image token."""
        text = self.render(prompt)
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=True).ids, dtype=np.int64)  # [L]
        where = np.flatnonzero(ids == self.image_token_id)
        if where.size != 1:
            raise PromptError(f"the rendered prompt has {where.size} image tokens {self.image_token!r}, expected 1: {text!r}")
        start = int(where[0])
        return PromptIds(text, ids[None, :start], ids[None, start + 1 :])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens (EOS) skipped."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream(self) -> TextStream:
        return TextStream(self)
