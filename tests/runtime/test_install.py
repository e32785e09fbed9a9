"""The runtime-only install: `pip install "ficoco-edge[runtime]"` into a fresh virtual environment, then generate.

The project's wheel is built once from a copy of its sources (nothing is written into the checkout);
pip then installs it with the `runtime` extra into a new venv with no access to this one's packages,
fetching numpy, pillow, tokenizers, jinja2 and onnxruntime from the package index (pip's cache makes
later runs fast). That venv must hold no torch, transformers, onnx or polygraphy, answer like the
runtime here, and reach `--from-onnx`'s own one-line TensorRT hint rather than an ImportError.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from runtime.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[2]
TOOLCHAIN = ("torch", "transformers", "onnx", "polygraphy", "onnxscript")


def _run(command: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
                          check=False)


def _wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in ("ficoco", "export", "runtime"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source],
                 cwd=tmp_path)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ficoco_edge-*.whl")
    return wheel


def test_runtime_extra_installs_without_the_toolchain_and_generates(build_dir, photo_files, tmp_path: Path) -> None:
    build, image = build_dir("1.5-v"), photo_files["coffee"]
    wheel = _wheel(tmp_path)
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    installed = _run([python, "-m", "pip", "install", "--disable-pip-version-check", f"{wheel}[runtime]"], cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    probe = _run([python, "-c", "import importlib.util as u, json, sys; "
                  f"print(json.dumps([m for m in {TOOLCHAIN!r} if u.find_spec(m)])); "
                  "import runtime; print(runtime.__file__)"], cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    found, location = probe.stdout.splitlines()
    assert json.loads(found) == [], f"the runtime install pulled in {found}"
    assert str(tmp_path / "venv") in location, location  # the installed package, not this checkout

    plan = _run([python, "-c", "import json, sys; from runtime.manifest import Build; from ficoco.plan import BuildPlan; "
                 f"build = Build.from_directory({str(build)!r}); "
                 "schedule = json.loads((build.directory / 'manifest.json').read_text())['schedule']; "
                 "print(build.plan == BuildPlan.from_dict(schedule), build.plan.visual_tokens, 'torch' in sys.modules)"], cwd=tmp_path)
    assert plan.returncode == 0 and plan.stdout.split() == ["True", "288", "False"], plan.stdout + plan.stderr  # no torch needed

    answer = _run([python, "-m", "runtime.generate", "--engine-dir", build, "--image", image, "--prompt", "Describe the image.",
                   "--max-new-tokens", "8", "--backend", "auto", "--json"], cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr
    record = json.loads(answer.stdout)
    with Pipeline.from_build(build, backend="onnxruntime") as reference:
        expected = reference(image, "Describe the image.", max_new_tokens=8)
    assert record["token_ids"] == list(expected.token_ids) and record["backend"].startswith("onnxruntime")

    compile_here = _run([python, "-m", "export.build", "--from-onnx", build, "--backend", "tensorrt"], cwd=tmp_path)
    assert compile_here.returncode == 2 and compile_here.stderr.count("\n") == 1, compile_here.stderr
    assert "TensorRT is not installed" in compile_here.stderr and "ficoco-edge[trt]" in compile_here.stderr
