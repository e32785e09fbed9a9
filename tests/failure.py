"""Helpers of the failure-path tests: file-tree snapshots, CLI runs in-process, generated damage."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
from pathlib import Path


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under each root (hidden ones included): {path: (kind, mode, size, sha256 or None)}.
    Two equal snapshots mean nothing was created, removed, changed or re-permissioned."""
    state = {}
    for root in roots:
        state[str(root)] = ("dir", root.stat().st_mode) if root.is_dir() else ("missing",)
        for directory, dirs, files in os.walk(root):
            for name in dirs:
                path = Path(directory, name)
                state[str(path)] = ("dir", path.lstat().st_mode)
            for name in files:
                path = Path(directory, name)
                info = path.lstat()
                state[str(path)] = ("file", info.st_mode, info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def run_main(main, argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of a CLI `main` run in this process; stdout is discarded."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def assert_one_line(code: int, err: str, codes=(2,), what: str = "") -> None:
    """Exit code in `codes`; for a non-zero code, exactly one line on stderr, starting 'error: '."""
    assert code in codes, f"{what}: exit {code}, stderr {err!r}"
    if code != 0:
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, f"{what}: {err!r}"


def flip_bit(path: Path, rng: random.Random) -> int:
    """Flip one random bit of the file in place; returns the byte offset."""
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return offset


def truncate(path: Path, rng: random.Random) -> int:
    """Cut the file at a random length shorter than it by at least 2 bytes (0 included); returns the length."""
    data = path.read_bytes()
    length = rng.randrange(max(1, len(data) - 1))
    path.write_bytes(data[:length])
    return length


def random_bytes(path: Path, rng: random.Random) -> int:
    """Replace the file by as many random bytes; returns the size."""
    size = path.stat().st_size
    path.write_bytes(bytes(rng.randrange(256) for _ in range(size)) if size < 1 << 16 else rng.randbytes(size))
    return size
