"""What every backend's LLM steps share: the text embedding table, and the KV cache allocated once.

`Embedding` memory-maps the table where the build stores it once (manifest `embedding`: the LM
head's weight when tied, else embed.onnx's), and looks rows up on the host: a prompt's text tokens,
or one token per decode step. `KVCache` is the per-layer buffers and their filled lengths; a
backend's steps read the past from the buffers in place and write the new rows at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BackendError
from .manifest import Build, BuildError, plain_name


FLOATS = {"float32": np.float32, "float16": np.float16}


def to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns as uint16 (round to nearest even), for bf16 graph inputs."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Embedding:
    """input ids -> rows [q, D] of the embedding table (a read-only memory map; bf16 as uint16 bits)."""

    def __init__(self, build: Build):
        self.__init_from(build.directory, build.manifest.get("embedding"))
        width = self.table.shape[0] if self.transposed else self.table.shape[1]
        if (self.vocab, width) != (build.vocab, build.hidden):
            raise BuildError(f"manifest: the embedding table is {self.vocab} x {width}; source.text implies "
                             f"{build.vocab} x {build.hidden}")

    @classmethod
    def from_entry(cls, directory, entry: dict) -> Embedding:
        """From a manifest `embedding` entry of the build in `directory` (export.trace.verify, before the manifest exists)."""
        self = cls.__new__(cls)
        self.__init_from(directory, entry)
        return self

    def __init_from(self, directory, entry) -> None:
        from pathlib import Path

        if not isinstance(entry, dict):
            raise BuildError(f"{str(directory)!r}: the manifest has no embedding entry (a build from before the weights-once layout?)")
        path = Path(directory) / plain_name(entry.get("file"), "embedding.file")
        try:
            dtype = np.dtype(np.uint16) if entry["dtype"] == "bfloat16" else np.dtype(FLOATS[entry["dtype"]])
            shape, offset, transposed = entry["shape"], entry["offset"], entry["transposed"]
        except (KeyError, TypeError) as error:
            raise BuildError(f"manifest: embedding lacks or mangles {error} (needs file, offset, shape, dtype, transposed)") from None
        if not (isinstance(shape, list) and len(shape) == 2 and all(_count(d) and d > 0 for d in shape)
                and _count(offset) and isinstance(transposed, bool)):
            raise BuildError(f"manifest: embedding shape {shape!r}, offset {offset!r}, transposed {transposed!r} are not "
                             "[rows, cols] of positive ints, an int >= 0 and a bool")
        try:
            self.table = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
        except (OSError, ValueError) as error:
            raise BuildError(f"cannot map the embedding table {shape} from {str(path)!r}: {error}") from None
        self.transposed, self.vocab = transposed, shape[1] if transposed else shape[0]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids [q] (any int dtype) -> [q, D], a fresh array."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise BackendError(f"token id {int(ids.max() if ids.max() >= self.vocab else ids.min())} is outside the vocabulary of {self.vocab}")
        return np.ascontiguousarray(self.table[:, ids].T if self.transposed else self.table[ids])


@dataclass
class KVCache:
    """Layer i's key and value buffers (backend-owned: host arrays or device pointers) and its filled rows."""

    keys: list[Any]
    values: list[Any]
    lengths: list[int]  # per layer
    capacities: tuple[int, ...]  # per layer

    def check_room(self, layers: range, rows: int) -> None:
        """BackendError when `rows` more do not fit every layer of `layers`."""
        for i in layers:
            if self.lengths[i] + rows > self.capacities[i]:
                raise BackendError(f"layer {i}'s cache holds {self.capacities[i]} tokens; {self.lengths[i]} + {rows} do not fit "
                                   f"(max_seq_len of this build)")
