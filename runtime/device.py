"""What this machine has for TensorRT, and whether a build's engines fit it. Imports nothing heavy.

* `driver()`: the CUDA driver through libcuda and ctypes (no cuda-python, no torch): its CUDA version,
  the visible devices and device 0's compute capability. None without a driver.
* `torch_has_cuda()`: whether the installed torch is a CUDA build, read from torch/version.py without
  importing torch (a CPU-only torch is no CUDA allocator).
* `trt_version_problem()`: the TensorRT versions this project supports (standard 10.x, strongly
  typed; TensorRT-RTX 1.x). JetPack 6.0 ships TensorRT 8.6, whose ONNX parser cannot read these graphs.
* `engine_problem()`: the manifest's TensorRT version and compute capabilities against the installed
  library and the GPU. Standard TensorRT engines run only on the TensorRT version that built them
  (this project does not build version-compatible engines) and on the GPU they were built on;
  TensorRT-RTX engines run only on the same TensorRT-RTX release, for the compute capabilities they target.
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_MAJORS = {"tensorrt": 10, "tensorrt-rtx": 1}
SUPPORTED_TEXT = "TensorRT 10.x (JetPack 6.1/6.2: 10.3; JetPack 7: 10.13; x86: pip) or TensorRT-RTX 1.x"
_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR


@dataclass(frozen=True)
class Driver:
    """The CUDA driver: `cuda_version` as the driver reports it (12060 = CUDA 12.6), visible devices, device 0's CC."""

    cuda_version: int
    devices: int
    compute_capability: str | None  # "8.7"; None without a device

    @property
    def cuda(self) -> str:
        """The CUDA version the driver supports, as "12.6"."""
        return f"{self.cuda_version // 1000}.{self.cuda_version % 1000 // 10}"


def _libcuda() -> ctypes.CDLL | None:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def driver() -> Driver | None:
    """Ask libcuda (cuInit, cuDriverGetVersion, cuDeviceGetCount, cuDeviceGetAttribute); None without a driver."""
    lib = _libcuda()
    if lib is None:
        return None
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return Driver(version.value, 0, None)
    device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    ok = lib.cuDeviceGet(ctypes.byref(device), 0) == 0
    ok = ok and lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device) == 0
    ok = ok and lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device) == 0
    return Driver(version.value, count.value, f"{major.value}.{minor.value}" if ok else None)


def cuda_devices() -> int:
    """CUDA devices the driver reports (0 without a driver)."""
    found = driver()
    return found.devices if found else 0


def torch_has_cuda() -> bool:
    """Whether torch is installed as a CUDA build; reads torch/version.py (`cuda = '12.8'` or None), imports nothing."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return False
    match = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*(.+)$", text, re.MULTILINE)
    return bool(match) and match[1].strip() not in ("None", "''", '""')


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def trt_version_problem(flavour: str, version: str) -> str | None:
    """None if this project supports `flavour` at `version`; else one line naming the supported versions."""
    numbers = _numbers(version)
    if numbers and numbers[0] == SUPPORTED_MAJORS.get(flavour):
        return None
    line = f"{flavour} {version} is not supported; this project needs {SUPPORTED_TEXT}"
    if flavour == "tensorrt" and numbers[:1] == (8,):
        line += " (JetPack 6.0 ships TensorRT 8.6, whose ONNX parser cannot read these graphs: upgrade to JetPack 6.1 or later)"
    return line


def engine_problem(section: dict, installed: str, device_cc: str | None) -> str | None:
    """Why the engines of a manifest's `tensorrt` section cannot run with TensorRT `installed` on a GPU of
    compute capability `device_cc`; None when nothing rules them out."""
    flavour, built = section.get("flavour"), str(section.get("version"))
    if _numbers(built) != _numbers(installed):
        return f"the engines were built with {flavour} {built} and this machine has {installed}; engines run only on the version that built them"
    targets = [c for c in section.get("compute_capabilities") or [] if re.fullmatch(r"\d+\.\d+", str(c))]
    if device_cc and targets and device_cc not in targets:
        return f"the engines were built for compute capability {', '.join(targets)} and this GPU is {device_cc}"
    return None
