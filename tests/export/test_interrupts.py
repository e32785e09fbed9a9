"""The build's temporary directory (export.workspace): signals, kills, stale directories, publishing, evidence.

Kills run a real `python -m export.build` (tiny preset, --backend none) in a subprocess and stop it at a
stage; each asserts the exit code, one line on stderr, and that --out's parent and the temporary area
(its nearest existing ancestor) are exactly as before. The rest drives `run_build` in-process with the
heavy stage replaced, which is enough to exercise publishing and the evidence of a failed verification.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import export.build as build_module
from export import workspace
from export.build import VerificationError, main
from runtime import manifest as manifest_io
from tests.failure import assert_one_line, run_main, snapshot

REPO = Path(__file__).resolve().parents[2]


def start_build(out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "export.build", "--ratio", "0.5", "--backend", "none", "--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored, even in a background job


# the stages of start_build's build: load, patch, export vision / embed / decoder.0, verify (no engines)
STAGES = 6


def stop_at(process: subprocess.Popen, stage: str, signum: int) -> tuple[int, str]:
    """Send `signum` once the build prints the line starting stage `stage`; (exit code, stderr). Every stage
    line up to there counts from 1 against the same total, STAGES, known from the first."""
    seen = []
    for line in process.stdout:
        if line.startswith("["):
            seen.append(line.split("]")[0] + "]")
            assert seen == [f"[{i}/{STAGES}]" for i in range(1, len(seen) + 1)], seen
        if line.startswith(f"[{stage}/"):
            process.send_signal(signum)
            break
    else:
        pytest.fail(f"the build ended before stage {stage}: {process.communicate()[1][-2000:]}")
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def temp_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if ".tmp-" in p.name)


# ------------------------------------------------------------------ real builds, stopped


@pytest.mark.parametrize("stage, signum", [("1", signal.SIGINT), ("3", signal.SIGTERM)], ids=["SIGINT-load", "SIGTERM-export"])
def test_a_signal_is_one_line_and_leaves_nothing(tmp_path, stage, signum):
    out = tmp_path / "not" / "yet" / "b"  # parents that only a published build may create
    before = snapshot(tmp_path)
    code, err = stop_at(start_build(out), stage, signum)
    assert_one_line(code, err, (128 + signum,), f"{signal.Signals(signum).name} at stage {stage}")
    assert signal.Signals(signum).name in err
    assert snapshot(tmp_path) == before


def test_a_killed_build_leaves_debris_that_the_next_build_removes(tmp_path):
    out = tmp_path / "b"
    code, _ = stop_at(start_build(out), "2", signal.SIGKILL)
    assert code == -signal.SIGKILL
    [debris] = temp_dirs(tmp_path)
    owner = json.loads((debris / workspace.OWNER).read_text())
    assert owner["schema"] == workspace.SCHEMA and not workspace.owner_alive(owner)
    alive = tmp_path / ".other.tmp-alive"  # a live build beside it (this test's own process) is never touched
    alive.mkdir()
    (alive / workspace.OWNER).write_text(json.dumps(workspace.owner_record()))
    code, err = stop_at(start_build(out), "1", signal.SIGTERM)
    assert_one_line(code, err, (143,), "SIGTERM after the sweep")
    assert temp_dirs(tmp_path) == [alive] and not out.exists()


# ------------------------------------------------------------------ owners


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("owner, stale", [
    ({}, False),  # this process: alive
    ({"pid": "dead"}, True),
    ({"start_time": "1"}, True),  # this PID, started at another time: a reused PID
    ({"host": "another-host", "pid": "dead"}, False),  # never judged from here
    ({"boot_id": "another-boot"}, True),
    ({"schema": "someone-else"}, False),
])
def test_sweep_removes_only_directories_of_dead_builds(tmp_path, owner, stale):
    record = {**workspace.owner_record(), **owner}
    if record["pid"] == "dead":
        record["pid"] = dead_pid()
    directory = tmp_path / ".b.tmp-x"
    (directory / "build").mkdir(parents=True)
    (directory / workspace.OWNER).write_text(json.dumps(record))
    assert workspace.sweep(tmp_path) == ([directory] if stale else [])
    assert directory.exists() != stale


def test_sweep_removes_an_ownerless_directory_only_when_empty_and_old(tmp_path):
    empty_old, empty_new, not_ours = tmp_path / ".a.tmp-1", tmp_path / ".b.tmp-2", tmp_path / ".c.tmp-3"
    for directory in (empty_old, empty_new, not_ours):
        directory.mkdir()
    (not_ours / "data").write_text("someone's")
    old = os.stat(empty_old).st_mtime - 2 * workspace.ORPHAN_GRACE_S
    for directory in (empty_old, not_ours):
        os.utime(directory, (old, old))
    assert workspace.sweep(tmp_path) == [empty_old]
    assert temp_dirs(tmp_path) == [empty_new, not_ours]


# ------------------------------------------------------------------ publishing and failed verification


FAILED_PARITY = {"graphs": {"prefill": {"outputs": {"logits": {"passed": False}}, "passed": False}},
                 "end_to_end": {"passed": True}, "passed": False}


def fake_export(outcome: str):
    """export_and_verify without torch: writes a graph and parity.json; fails verification or returns a body."""
    def export_and_verify(checked, directory: Path, progress) -> dict:
        (directory / "vision.onnx").write_bytes(b"graph")
        (directory / "parity.json").write_text(json.dumps({**FAILED_PARITY, "attempt": outcome}))
        if outcome != "passed":
            raise VerificationError(FAILED_PARITY)
        return {"graphs": {}, "parity": {"passed": True}}
    return export_and_verify


def build_with(monkeypatch, out: Path, outcome: str) -> tuple[int, str]:
    monkeypatch.setattr(build_module, "export_and_verify", fake_export(outcome))
    monkeypatch.setattr(build_module, "summary", lambda body, progress, out: f"build: {out}")
    monkeypatch.setattr(build_module, "memory_plan", lambda directory, body: None)  # reads a real model's config
    return run_main(main, ["--ratio", "0.5", "--backend", "none", "--out", str(out)])


def test_failed_verification_keeps_its_evidence_until_a_build_passes(tmp_path, monkeypatch):
    out = tmp_path / "new" / "b"
    failed = out.with_name("b.failed")
    for attempt in ("first", "second"):
        code, err = build_with(monkeypatch, out, attempt)
        assert_one_line(code, err, (1,), f"{attempt} failed verification")
        assert str(failed) in err and not out.exists() and temp_dirs(out.parent) == []
        assert sorted(p.name for p in failed.iterdir()) == ["build.log", "parity.json"]
        assert json.loads((failed / "parity.json").read_text())["attempt"] == attempt  # replaced, not kept from before
    code, err = build_with(monkeypatch, out, "passed")
    assert code == 0 and err == "" and not failed.exists() and temp_dirs(out.parent) == []
    assert manifest_io.is_build(out) and (out / "vision.onnx").read_bytes() == b"graph"


def test_a_build_is_published_with_the_umask_and_replaces_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "made" / "by" / "the" / "build" / "b"
    previous = os.umask(0o027)
    try:
        code, err = build_with(monkeypatch, out, "passed")
        (out / "marker").write_text("first build")
        code_again, _ = build_with(monkeypatch, out, "passed")
    finally:
        os.umask(previous)
    assert code == code_again == 0 and err == ""
    assert out.stat().st_mode & 0o777 == 0o750 and (out.parent.stat().st_mode & 0o777) == 0o750
    assert not (out / "marker").exists() and sorted(p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name) == []


def test_the_shared_builds_are_published_readable(build_dir):
    directory = build_dir("1.5-v")
    umask = os.umask(0)
    os.umask(umask)
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask
    assert temp_dirs(directory.parent) == []
