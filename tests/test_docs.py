"""README.md and docs/*.md against the code, where a cheap check can tell (no builds, no models).

* every `--flag` named exists in the argparse parser of its command, every `--flag VALUE` of an option
  with choices names a choice, and every default stated as "`--flag` (default X)" or "`--flag X`, the
  default" is the parser's default (or the one its help states, for options resolved later);
* every relative link `[text](path#anchor)` exists, with that heading when it is markdown, and so does
  every repository path in backticks (`export/gates.py`);
* README.md has at most 250 lines, links every docs/*.md, and holds .ci/run's command verbatim.

Which command a flag belongs to: the nearest command named before it in the same block (a paragraph,
a list item, a table row or a fenced code block): `python -m export.build`, `export.build`,
`scripts/flops.py`, `python gpu_check.py`. After `pip install`, `python -m venv`, `pytest`, `trtexec`
and the like the flags are another tool's and are skipped. A flag with no command before it in its
block must exist in some command; a stated default must then be the default of one of them.

The parsers are captured, not copied: each command's `parse_args` (or `main`) is called with
`argparse.ArgumentParser.parse_args` patched to hand back the parser it was called on.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = (README, *sorted((ROOT / "docs").glob("*.md")))
README_MAX_LINES = 250
MODULE_COMMANDS = ("export.build", "export.trace.verify", "runtime.generate", "ficoco.demo")

Commands = dict[str, dict[str, argparse.Action]]  # command -> "--flag" -> its argparse action

_MODULE = "|".join(re.escape(c) for c in MODULE_COMMANDS)
_FOREIGN = r"pip3? (?:install|wheel|download)|python3? -m (?:venv|pytest|pip)|pytest|trtexec|scp|apt(?:-get)? install"
TOKEN = re.compile(
    rf"(?P<foreign>\b(?:{_FOREIGN})\b)"
    rf"|(?P<module>(?<![\w./])(?:{_MODULE})(?![\w.]))"
    r"|(?:\bpython3? (?:scripts/)?|(?<![\w/.])scripts/)(?P<script>\w+)\.py\b"
    r"|(?P<flag>(?<![\w-])--[a-z](?:[a-z0-9-]*[a-z0-9])?)(?:[ =](?P<value>[a-z0-9][\w.-]*(?:\|[\w.-]+)*))?"
)
STATED_DEFAULT = re.compile(r"(?: [^`\n]*)?`\s*\(default:?\s+`?(?P<default>[^`\s),;]+)")  # `--flag [X]` (default D
VALUE_IS_DEFAULT = re.compile(r" (?P<default>[^`\s]+)`\s*(?:,\s*|\()the\s+default\b")  # `--flag D`, the default
HELP_DEFAULT = re.compile(r"\bdefault:?\s+([^\s,;)]+)")
LINK = re.compile(r"!?\[[^\]\n]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?:[\w.-]+/)+[\w.-]+\.(?:py|md|json|jsonl|png|toml|txt|log)")
BLOCK_START = re.compile(r"\s*(?:[-*+]|\d+\.)\s|\||#")  # a list item, a table row or a heading starts a block


# --------------------------------------------------------------------------- the parsers


class _Captured(BaseException):  # not an Exception: no `except Exception` in a main() swallows it
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def capture_parser(module_name: str) -> argparse.ArgumentParser:
    """The parser that `module_name`'s `parse_args([])` (else `main([])`) builds, before it parses."""
    module = importlib.import_module(module_name)
    entry = getattr(module, "parse_args", None) or module.main
    original = argparse.ArgumentParser.parse_args

    def hand_back(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = hand_back
    try:
        entry([])
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{module_name}.{entry.__name__}([]) returned without building an argparse parser")


def script_commands() -> dict[str, str]:
    """{"scripts/NAME.py": "scripts.NAME"} for every script with a command line."""
    return {f"scripts/{p.name}": f"scripts.{p.stem}" for p in sorted((ROOT / "scripts").glob("*.py"))
            if "import argparse" in p.read_text()}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: action for action in parser._actions for s in action.option_strings if s.startswith("--")}


@pytest.fixture(scope="module")
def commands() -> Commands:
    modules = {**{c: c for c in MODULE_COMMANDS}, **script_commands()}
    return {command: options(capture_parser(module)) for command, module in modules.items()}


# --------------------------------------------------------------------------- the checks


def blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each paragraph, list item, table row, heading and fenced block."""
    found, current, start, fenced = [], [], 1, False

    def flush():
        if current:
            found.append((start, "\n".join(current)))
            current.clear()

    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            flush()
            fenced = not fenced
            continue
        if not fenced and (not line.strip() or BLOCK_START.match(line)):
            flush()
        if line.strip() or fenced:
            start = number if not current else start
            current.append(line)
    flush()
    return found


def _same(stated: str, value) -> bool:
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    try:
        return float(stated) == float(value)
    except (TypeError, ValueError):
        return stated == str(value)


def code_defaults(action: argparse.Action) -> list:
    """The action's default, and the defaults its help states (for options resolved after parsing)."""
    return ([action.default] if action.default is not None else []) + HELP_DEFAULT.findall(action.help or "")


def default_matches(action: argparse.Action, stated: str) -> bool:
    return any(_same(stated.strip("'\"."), c) for c in code_defaults(action))


def choice_matches(action: argparse.Action, value: str) -> bool:
    return not action.choices or all(part in map(str, action.choices) for part in value.split("|"))


def stated_default(text: str, end: int) -> str | None:
    """The default that the words right after a flag mention (ending at `end`) state, if any."""
    rest = text[end:end + 120]
    found = STATED_DEFAULT.match(rest) or VALUE_IS_DEFAULT.match(rest)
    return found["default"] if found else None


def check_flag(flag: str, scope: str | None, value: str | None, default: str | None, commands: Commands) -> str | None:
    """What is wrong with one flag mention, in words; None if nothing."""
    if scope is not None and scope not in commands:
        return f"{flag}: {scope} has no command-line parser"
    owners = [scope] if scope else [c for c in commands if flag in commands[c]]
    where = scope or "any command"
    if not owners or flag not in commands[owners[0]]:
        return f"{flag} is not an option of {where}"
    actions = [commands[c][flag] for c in owners]
    if value is not None and not any(choice_matches(a, value) for a in actions):
        return f"{flag} {value}: not among the choices of {where} ({', '.join(map(str, actions[0].choices))})"
    if default is not None and not any(default_matches(a, default) for a in actions):
        return f"{flag}: the docs say default {default}, {where} says {code_defaults(actions[0]) or None}"
    return None


def check_flags(text: str, commands: Commands) -> list[str]:
    """Every flag mention of a markdown text against the parsers: 'line N: what is wrong' each."""
    problems = []
    for line, block in blocks(text):
        scope = None
        for token in TOKEN.finditer(block):
            if token["foreign"]:
                scope = "foreign"
            elif token["module"]:
                scope = token["module"]
            elif token["script"]:
                scope = f"scripts/{token['script']}.py"
            elif scope != "foreign":
                default = stated_default(block, token.end("flag"))
                problem = check_flag(token["flag"], scope, token["value"], default, commands)
                if problem:
                    problems.append(f"line {line + block.count(chr(10), 0, token.start())}: {problem}")
    return problems


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown text's headings ("## The gates" -> "the-gates")."""
    found, fenced = set(), False
    for line in text.splitlines():
        fenced ^= line.lstrip().startswith("```")
        if not fenced and line.startswith("#"):
            found.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return found


def dead_links(path: Path, text: str) -> list[str]:
    """Relative links `[text](target#anchor)` whose file does not exist beside `path`, or whose markdown
    file has no such heading."""
    problems = []
    for link in LINK.finditer(text):
        target = link["target"]
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        name, _, anchor = target.partition("#")
        file = path.parent / name if name else path
        if not file.exists():
            problems.append(f"{target}: no such file (linked from {path.name})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            problems.append(f"{target}: no heading #{anchor} in {name or path.name} (linked from {path.name})")
    return problems


def missing_paths(path: Path, text: str, root: Path = ROOT) -> list[str]:
    """Repository paths in backticks (`export/gates.py`, `tests/x.py::test`) that exist nowhere."""
    problems = []
    for span in CODE_SPAN.finditer(text):
        name = span[1].split("::")[0].strip()
        if not REPO_PATH.fullmatch(name) or name.startswith(("builds/", "..")):
            continue
        if not (root / name).exists() and not (path.parent / name).exists():
            problems.append(f"{name}: no such file (named in {path.name})")
    return problems


def ci_command(root: Path = ROOT) -> str:
    """The command line of .ci/run (its last line that is not a comment)."""
    lines = (root / ".ci" / "run").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")][-1].strip()


# --------------------------------------------------------------------------- the docs


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_flags_exist_with_their_choices_and_defaults(doc, commands):
    assert check_flags(doc.read_text(), commands) == []


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_links_and_paths_exist(doc):
    text = doc.read_text()
    assert dead_links(doc, text) + missing_paths(doc, text) == []


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md has {len(text.splitlines())} lines"
    linked = {link["target"].split("#")[0] for link in LINK.finditer(text)}
    assert [_name(d) for d in DOCS[1:] if _name(d) not in linked] == []
    assert ci_command() in text, "README.md must hold .ci/run's command verbatim"


def test_every_command_has_a_parser(commands):
    for command, flags in commands.items():
        assert "--help" in flags, command


# --------------------------------------------------------------------------- the checks can fail


@pytest.fixture
def fake() -> Commands:
    build = argparse.ArgumentParser()
    build.add_argument("--max-seq-len", type=int, default=2048)
    build.add_argument("--variant", default="v", choices=("v", "l", "vl", "none"))
    build.add_argument("--grid", default=None, help="anyres grid (default 2x2)")
    generate = argparse.ArgumentParser()
    generate.add_argument("--top-p", type=float, default=1.0)
    return {"export.build": options(build), "runtime.generate": options(generate)}


@pytest.mark.parametrize("doc, needle", [
    ("python -m export.build --max-seq-len 512 --nope", "--nope is not an option of export.build"),
    ("Run `python -m runtime.generate --max-seq-len 4`.", "--max-seq-len is not an option of runtime.generate"),
    ("Then `--made-up` does it.", "--made-up is not an option of any command"),
    ("`export.build --variant q|vl`", "--variant q|vl: not among the choices"),
    ("The cache holds `--max-seq-len` (default 4096) tokens.", "the docs say default 4096"),
    ("`--variant vl`, the default", "the docs say default vl"),
    ("`--grid` (default 3x3)", "the docs say default 3x3"),
    ("`--top-p` (default 0.9)", "the docs say default 0.9"),
    ("`python scripts/nothing.py --x`", "scripts/nothing.py has no command-line parser"),
])
def test_a_wrong_flag_is_reported(doc, needle, fake):
    problems = check_flags(f"# title\n\n{doc}\n", fake)
    assert len(problems) == 1 and needle in problems[0] and problems[0].startswith("line 3:"), problems


@pytest.mark.parametrize("doc", [
    "python -m export.build --max-seq-len 512 --variant vl|none",
    "`--max-seq-len` (default 2048), `--variant v` (the default), `--grid RxC` (default 2x2), `--top-p` (default 1.0)",
    "pip install --no-deps x && python -m venv --system-site-packages y && python -m pytest -x -q",
    "python -m export.build --variant l\n    --grid 2x2\npython -m runtime.generate --top-p 0.5",
    "| table | --- |\n|---|---|",
])
def test_a_right_flag_passes(doc, fake):
    assert check_flags(doc, fake) == []


def test_a_flag_belongs_to_its_own_block(fake):
    assert check_flags("Run `runtime.generate`.\n\nThen `--max-seq-len`.", fake) == []
    assert check_flags("- Run `runtime.generate`.\n- Then `--max-seq-len`.", fake) == []
    assert len(check_flags("Run `runtime.generate`, then `--max-seq-len`.", fake)) == 1


def test_a_dead_link_or_path_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "real.py").write_text("")
    doc = tmp_path / "README.md"
    doc.write_text("# Readme\n")
    (tmp_path / "docs" / "there.md").write_text("# There: `x.py`\n```\n# Not a heading\n```\n## The end\n")
    text = ("[ok](docs/there.md#there-xpy) [ok](docs/there.md#the-end) [web](https://x.org) [gone](docs/gone.md) "
            "![img](docs/gone.png) [no](docs/there.md#not-a-heading) [no](#nowhere)")
    assert dead_links(doc, text) == ["docs/gone.md: no such file (linked from README.md)",
                                     "docs/gone.png: no such file (linked from README.md)",
                                     "docs/there.md#not-a-heading: no heading #not-a-heading in docs/there.md "
                                     "(linked from README.md)",
                                     "#nowhere: no heading #nowhere in README.md (linked from README.md)"]
    text = "`src/real.py` `src/real.py::test_x` `src/gone.py::test_y` `builds/NAME/manifest.json` `../outside.md`"
    assert missing_paths(doc, text, tmp_path) == ["src/gone.py: no such file (named in README.md)"]


def test_the_ci_command_is_the_last_line_of_the_script(tmp_path):
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text("#!/usr/bin/env bash\n# comment\nset -e\npython -m pytest -q\n")
    assert ci_command(tmp_path) == "python -m pytest -q"
