"""The temporary directory of one `export.build`: where it lives, who owns it, how it ends.

    PARENT/.NAME.tmp-XXXXXXXX/      mkdtemp (0700); PARENT is the nearest existing ancestor of --out
        owner.json                  {"schema", "host", "boot_id", "pid", "start_time"} of the building process
        build/                      the build being written (made with the user's umask); becomes --out
        failed/                     a failed verification's parity.json and build.log; becomes NAME.failed

* Nothing outside the temporary directory changes until the end. `publish` creates the missing parents
  of --out, then swaps `build/` and --out in one `renameat2(RENAME_EXCHANGE)` where the filesystem has
  it (else two renames); the earlier build, now inside the temporary directory, goes with it. A
  `NAME.failed/` of an earlier attempt is removed by a published build and replaced by `keep_failed`.
* The temporary directory is removed on every exit Python sees, with SIGINT and SIGTERM held off
  during the removal. `signals()` turns SIGTERM into the same exception as Ctrl-C (`Interrupted`, a
  KeyboardInterrupt), so both unwind through that cleanup; the caller exits 128 + signal.
* A SIGKILL (an OOM kill, a container stop) leaves the directory behind. The next build with the same
  PARENT removes every such directory whose owner is gone: same host and boot, and its PID either not
  running or running with another start time (a reused PID). A directory owned by a live process, or
  by another host (a shared filesystem), is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from runtime import manifest as manifest_io

SCHEMA = "ficoco-build-workspace"
OWNER = "owner.json"
FAILED_SUFFIX = ".failed"
EVIDENCE = ("parity.json", "quality.json", "build.log")  # what a failed verification keeps
ORPHAN_GRACE_S = 60  # an owner-less temporary directory (killed while being created) is debris after this
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class OutputError(ValueError):
    """--out (or the place beside it) cannot be used; the message names the path and why."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a build; `exit_code` is 128 + the signal number (130, 143)."""

    def __init__(self, signum: int):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


# ------------------------------------------------------------------ checks before any work


def failed_dir(out: Path) -> Path:
    """Where a failed verification keeps its evidence: NAME.failed beside --out."""
    return out.with_name(out.name + FAILED_SUFFIX)


def temp_root(out: Path) -> Path:
    """The nearest existing ancestor of --out: the temporary directory goes there, so that the
    parents of --out are created only by a build that is published."""
    parent = out.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    return parent


def _is_evidence(directory: Path) -> bool:
    """A NAME.failed directory this module wrote: a directory holding only the evidence files."""
    try:
        return directory.is_dir() and not directory.is_symlink() and {p.name for p in directory.iterdir()} <= set(EVIDENCE)
    except OSError:
        return False


def check_out(out: Path) -> Path:
    """Refuse an --out that cannot be written or replaced, before any work; returns temp_root(out)."""
    try:
        return _check_out(str(out), Path(os.path.abspath(out)))
    except OSError as error:  # e.g. a name too long for the filesystem, a path through an unreadable directory
        raise OutputError(f"--out {str(out)!r} cannot be used: {error.strerror or error}") from None


def _check_out(shown: str, out: Path) -> Path:
    if not out.name:
        raise OutputError(f"--out {shown!r} names no directory")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"--out {shown!r} exists and is not a directory; refusing to replace it")
    if out.exists() and not manifest_io.is_build(out):
        raise OutputError(f"--out {shown!r} exists and is not an export.build directory; refusing to overwrite it")
    failed = failed_dir(out)
    if (failed.exists() or failed.is_symlink()) and not _is_evidence(failed):
        raise OutputError(f"{str(failed)!r} exists and is not the evidence of a failed build; refusing to replace it")
    root = temp_root(out)
    if not root.is_dir():
        raise OutputError(f"--out {shown!r} cannot be created: {str(root)!r} is not a directory")
    if not os.access(root, os.W_OK | os.X_OK):
        raise OutputError(f"--out {shown!r} cannot be created: {str(root)!r} is not writable")
    name_max = 255
    with contextlib.suppress(OSError, ValueError, AttributeError):
        name_max = os.pathconf(root, "PC_NAME_MAX")
    if len(os.fsencode(f".{out.name}.tmp-XXXXXXXX")) > name_max:  # the temporary directory's name (mkdtemp: 8 characters)
        raise OutputError(f"--out {shown!r}: the name is too long for the temporary directory beside it")
    if out.exists() and not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--out {shown!r} cannot be replaced: it is not writable")
    return root


# ------------------------------------------------------------------ owners


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except (OSError, ValueError):
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if unknown."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def owner_record(pid: int | None = None) -> dict:
    """Who owns a temporary directory: this process (or `pid`) on this host and boot."""
    pid = os.getpid() if pid is None else pid
    return {"schema": SCHEMA, "host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pid": pid, "start_time": _start_time(pid)}


def owner_alive(record: dict) -> bool:
    """False only when the owner is certainly gone; another host's owner always counts as alive."""
    if record.get("host") != socket.gethostname():
        return True
    boot = _read("/proc/sys/kernel/random/boot_id")
    if record.get("boot_id") and boot and record["boot_id"] != boot:
        return False
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 1:
        return True  # not a record this module wrote: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # running, as another user
    started = _start_time(pid)
    return not (record.get("start_time") and started and record["start_time"] != started)


def _is_stale(directory: Path) -> bool:
    """A temporary directory of a build that is no longer running."""
    try:
        record = json.loads((directory / OWNER).read_text(encoding="utf-8"))
    except FileNotFoundError:  # killed between mkdtemp and writing owner.json: empty or a partial record
        leftovers = {p.name for p in directory.iterdir()} <= {OWNER + ".tmp"}
        return leftovers and time.time() - directory.stat().st_mtime > ORPHAN_GRACE_S
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("schema") == SCHEMA and not owner_alive(record)


def sweep(root: Path) -> list[Path]:
    """Remove the temporary directories of dead builds in `root`; returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        candidates = [p for p in root.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
        for directory in candidates:
            with contextlib.suppress(OSError):
                if directory.is_dir() and not directory.is_symlink() and _is_stale(directory):
                    shutil.rmtree(directory)
                    removed.append(directory)
    return removed


# ------------------------------------------------------------------ signals and renames


@contextlib.contextmanager
def signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted (once; later ones are ignored until the block ends). A signal
    this process was started ignoring (nohup, a background job) stays ignored."""
    if not _main_thread():
        yield
        return

    def handler(signum, frame):
        for number in _SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        raise Interrupted(signum)

    defaults = (signal.default_int_handler, signal.SIG_DFL)
    previous = {n: signal.signal(n, handler) for n in _SIGNALS if signal.getsignal(n) in defaults}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during a cleanup; they are delivered when it is done."""
    held = hasattr(signal, "pthread_sigmask") and _main_thread()
    if held:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


# ------------------------------------------------------------------ the workspace


class Workspace:
    """`with Workspace(out) as ws:` write into `ws.build`, then `ws.publish()` or `ws.keep_failed()`."""

    def __init__(self, out: Path):
        self.out, self.root = Path(os.path.abspath(out)), check_out(out)
        self.path: Path | None = None

    @property
    def build(self) -> Path:
        return self.path / "build"

    def __enter__(self) -> Workspace:
        sweep(self.root)
        try:
            with _signals_held():  # a signal is taken after the directory has its owner, and then removes it
                self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.root))
                staging = self.path / (OWNER + ".tmp")
                staging.write_text(json.dumps(owner_record()) + "\n", encoding="utf-8")
                os.replace(staging, self.path / OWNER)
                self.build.mkdir()  # mode from the umask, unlike mkdtemp's 0700
        except OSError as error:
            self.__exit__(None, None, None)
            raise OutputError(f"--out {str(self.out)!r}: cannot write beside it in {str(self.root)!r}: "
                              f"{error.strerror or error}") from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            with _signals_held():
                shutil.rmtree(self.path, ignore_errors=True)
            self.path = None

    def _install(self, staged: Path, target: Path) -> None:
        """Put `staged` at `target`; an earlier `target` ends up inside the workspace (removed with it)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target.exists() or target.is_symlink()):
            os.replace(staged, target)
        elif not _exchange(staged, target):
            os.replace(target, self.path / f"previous-{staged.name}")
            os.replace(staged, target)

    def _discard(self, target: Path) -> None:
        if target.exists() and _is_evidence(target):
            os.replace(target, self.path / "discarded")

    def publish(self) -> None:
        """The finished build becomes --out (replacing an earlier build); an earlier NAME.failed goes."""
        with _signals_held():
            self._install(self.build, self.out)
            self._discard(failed_dir(self.out))

    def keep_failed(self) -> Path:
        """A failed verification: its parity.json and build.log become NAME.failed; --out is left as it was."""
        failed = self.path / "failed"
        failed.mkdir()
        for name in EVIDENCE:
            if (self.build / name).is_file():
                os.replace(self.build / name, failed / name)
        target = failed_dir(self.out)
        with _signals_held():
            self._install(failed, target)
        return target
