"""Reading a Hugging Face checkpoint directory: ``config.json`` plus ``*.safetensors``.

The safetensors files are parsed here (an 8-byte header length, a JSON
header, raw little-endian data) and memory-mapped, so tensors are read
lazily and bfloat16 works through ``ml_dtypes`` without torch.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing or malformed; the message names the file."""


def load_hf_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config dict, {tensor name: array})`` of the checkpoint in ``directory``.

    Reads a single ``*.safetensors`` file, several, or the shards listed by
    ``model.safetensors.index.json``. Arrays are read-only memory maps.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    config = _read_json(directory / "config.json")
    files = _safetensors_files(directory)
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        for name, array in read_safetensors(path).items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} also appears in another file")
            tensors[name] = array
    return config, tensors


def _safetensors_files(directory: Path) -> list[Path]:
    index_path = directory / INDEX_FILE
    if index_path.exists():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: has no 'weight_map'")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.exists():
                raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files found")
    return files


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, as read-only memory-mapped arrays."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: corrupt header length {header_len} (file has {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header (not a JSON object)")
    data_start = 8 + header_len
    data_len = size - data_start
    buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)) if data_len else None
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except KeyError as exc:
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or missing field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed entry ({exc})") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or end > data_len:
            raise CheckpointError(
                f"{path}: tensor {name!r} data [{begin}, {end}) does not fit its shape {shape} "
                f"and dtype {info['dtype']} in a data section of {data_len} bytes (file truncated?)"
            )
        if nbytes == 0:
            tensors[name] = np.zeros(shape, dtype)
        else:
            tensors[name] = buffer[begin:end].view(dtype).reshape(shape)
    return tensors


class LazyTensor:
    """A tensor read (into a new numpy array) only when asked for, ``np.asarray(t)`` or ``t[index]``:
    a state dict of these holds no weights, so a loader reads one tensor at a time (a GGUF's
    dequantised tensors, a converted checkpoint's restored ones)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, read: Callable[[], np.ndarray]) -> None:
        self.shape, self.dtype, self.read = tuple(shape), np.dtype(dtype), read

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.read()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.read()[index]
