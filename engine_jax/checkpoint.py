"""The converted-model cache: an orbax checkpoint of the HF-named state dict plus HF side files.

A converted model directory holds::

    config.json              the Hugging Face config dict
    tokenizer.json           \\ the tokenizer (Tokenizer.save)
    tokenizer_config.json    /
    state/                   orbax checkpoint of {HF tensor name: array}
    pie_model.json           written last: format version, source, sha256 (its presence = complete)

Converting a GGUF costs seconds (dequantization); restoring the orbax checkpoint about one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from engine_jax.tokenizer import Tokenizer

FORMAT_VERSION = 1
MARKER = "pie_model.json"
STATE_DIR = "state"


class ModelCacheError(ValueError):
    """A converted-model directory that is missing, incomplete or from another format version."""


@dataclass
class ConvertedModel:
    config: dict[str, Any]
    state_dict: dict[str, np.ndarray]
    tokenizer: Tokenizer
    info: dict[str, Any]  # the pie_model.json record


def is_converted(directory: str | Path) -> bool:
    """Whether ``directory`` holds a complete converted model."""
    return (Path(directory) / MARKER).is_file()


def read_info(directory: str | Path) -> dict[str, Any]:
    """The pie_model.json record of a converted model (cheap: no weights are read)."""
    path = Path(directory) / MARKER
    if not path.is_file():
        raise ModelCacheError(f"{directory}: not a converted model directory (no {MARKER}; convert it first)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelCacheError(f"{path}: unreadable ({exc})") from exc
    if info.get("format") != FORMAT_VERSION:
        raise ModelCacheError(
            f"{directory}: converted with cache format {info.get('format')!r}, this version reads "
            f"{FORMAT_VERSION}; delete the directory and convert again"
        )
    return info


def save_converted(
    directory: str | Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    tokenizer: Tokenizer,
    *,
    source: Mapping[str, Any] | None = None,
    total: int | None = None,
    progress: bool = True,
) -> Path:
    """Write a converted model to ``directory`` (replacing one that is there) and return it.

    ``tensors`` may be a lazy iterator (e.g. dequantizing a GGUF tensor by tensor): it is
    consumed under a tqdm bar on stderr. The directory appears complete or not at all: it is
    built beside the destination and renamed into place.
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        if total is None and isinstance(tensors, Mapping):
            total = len(tensors)
        bar = tqdm(items, total=total, desc=f"converting {directory.name}", unit="tensor",
                   file=sys.stderr, disable=not progress)
        state = {name: np.asarray(array) for name, array in bar}
        if not state:
            raise ModelCacheError("refusing to save a model without tensors")
        started = time.perf_counter()
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / STATE_DIR, state)
            checkpointer.wait_until_finished()
        if progress:
            print(f"wrote orbax checkpoint in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        (staging / "config.json").write_text(json.dumps(dict(config), indent=2), encoding="utf-8")
        tokenizer.save(staging)
        info = {
            "format": FORMAT_VERSION,
            "source": dict(source or {}),
            "num_tensors": len(state),
            "num_parameters": int(sum(a.size for a in state.values())),
            "dtypes": sorted({str(a.dtype) for a in state.values()}),
        }
        (staging / MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def restore_converted(directory: str | Path, placement: tuple[Callable[[str], Any], Any] | None = None
                      ) -> ConvertedModel:
    """Read a converted model back: numpy state dict, config dict, tokenizer, info.

    ``placement`` = (tensor name -> jax Sharding, dtype) restores every tensor as a jax
    array in that dtype with that sharding instead: orbax reads each device's shard
    straight onto the device (each process only its own devices' shards).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    info = read_info(directory)
    config = _read_config(directory)
    tokenizer = Tokenizer.from_directory(directory)
    state_path = directory / STATE_DIR
    if not state_path.is_dir():
        raise ModelCacheError(f"{directory}: the orbax checkpoint {STATE_DIR}/ is missing")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            target = None
            if placement is not None:
                import jax

                sharding_of, dtype = placement
                stored = checkpointer.metadata(state_path).item_metadata.tree
                target = {name: jax.ShapeDtypeStruct(meta.shape, dtype, sharding=sharding_of(name))
                          for name, meta in stored.items()}
            state = checkpointer.restore(state_path, target)
    except Exception as exc:  # orbax/tensorstore raise many types on damaged data
        raise ModelCacheError(f"{state_path}: cannot restore the orbax checkpoint ({exc})") from exc
    return ConvertedModel(config=config, state_dict=dict(state), tokenizer=tokenizer, info=info)


def read_config(directory: str | Path) -> dict[str, Any]:
    """The config.json of a converted model, checking the directory is one."""
    read_info(directory)
    return _read_config(Path(directory))


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelCacheError(f"{directory}: config.json is missing or unreadable ({exc})") from exc


def convert(src: str | Path, out: str | Path, *, progress: bool = True, source: Mapping[str, Any] | None = None) -> Path:
    """Convert a GGUF file or a Hugging Face checkpoint directory into a converted model at ``out``."""
    from engine_jax import gguf

    src = Path(src)
    record = {"path": str(src.absolute()), **(source or {})}
    if gguf.is_gguf(src):
        reader, model_config, tokenizer = gguf.read_gguf_header(src)
        tensors = gguf.iter_gguf_tensors(reader, model_config, src)
        return save_converted(out, model_config, tensors, tokenizer, source={"format": "gguf", **record},
                              total=len(reader.tensors), progress=progress)
    if src.is_dir():
        from engine_jax.weights import load_hf_checkpoint

        model_config, state = load_hf_checkpoint(src)
        tokenizer = Tokenizer.from_directory(src)
        return save_converted(out, model_config, state, tokenizer, source={"format": "hf", **record},
                              progress=progress)
    if src.is_file():
        raise ModelCacheError(f"{src}: neither a GGUF file nor a Hugging Face checkpoint directory")
    raise ModelCacheError(f"{src}: no such file or directory")
