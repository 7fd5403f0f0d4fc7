"""The converted-model cache: an orbax checkpoint of the HF-named state dict plus HF side files.

A converted model directory holds::

    config.json              the Hugging Face config dict
    tokenizer.json           \\ the tokenizer (Tokenizer.save)
    tokenizer_config.json    /
    state/                   orbax checkpoint of {HF tensor name: array}
    pie_model.json           written last: format version, source, sha256 (its presence = complete)

Converting streams: tensors are read (a GGUF dequantized, a safetensors file memory-mapped)
one at a time, cast to the target dtype, and written in batches of ``BATCH_BYTES`` with
orbax's partial saves, so a model larger than host memory converts; the peak host memory is
measured and reported. Format 2 keeps the tree under ``state/state/`` (orbax's partial-save
layout); format 1 caches (``state/`` itself) are still read.

Converting a GGUF costs seconds (dequantization); restoring the orbax checkpoint about one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from engine_jax.tokenizer import Tokenizer

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MARKER = "pie_model.json"
STATE_DIR = "state"
PYTREE_DIR = "state"  # inside STATE_DIR: where orbax's partial saves put the tree
BATCH_BYTES = 64 * 1024 * 1024
DTYPES = ("float32", "bfloat16", "float16")


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
    if info.get("format") not in READABLE_FORMATS:
        raise ModelCacheError(
            f"{directory}: converted with cache format {info.get('format')!r}, this version reads "
            f"{', '.join(map(str, READABLE_FORMATS))}; delete the directory and convert again"
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
    dtype: str | None = None,
    batch_bytes: int = BATCH_BYTES,
) -> Path:
    """Write a converted model to ``directory`` (replacing one that is there) and return it.

    ``tensors`` may be a lazy iterator (e.g. dequantizing a GGUF tensor by tensor): it is
    consumed under a tqdm bar on stderr, each tensor cast to ``dtype`` (one of ``DTYPES``;
    None keeps the source's) and written once ``batch_bytes`` have gathered, so host memory
    holds about one batch, never the model. The directory appears complete or not at all: it
    is built beside the destination and renamed into place.
    """
    from orbax.checkpoint.experimental.v1 import partial
    from tqdm import tqdm

    if dtype is not None and dtype not in DTYPES:
        raise ModelCacheError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
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
        started = time.perf_counter()
        names: set[str] = set()
        stats = {"num_parameters": 0, "bytes": 0, "dtypes": set()}
        batch: dict[str, np.ndarray] = {}
        with PeakMemory() as peak:
            for name, array in bar:
                if name in names:
                    raise ModelCacheError(f"tensor {name!r} appears twice in the source")
                names.add(name)
                array = _cast(np.asarray(array), dtype)
                stats["num_parameters"] += int(array.size)
                stats["bytes"] += int(array.nbytes)
                stats["dtypes"].add(str(array.dtype))
                batch[name] = array
                if sum(a.nbytes for a in batch.values()) >= batch_bytes:
                    partial.save(staging / STATE_DIR, batch)
                    batch = {}
            if not names:
                raise ModelCacheError("refusing to save a model without tensors")
            if batch:
                partial.save(staging / STATE_DIR, batch)
            del batch
            partial.finalize(staging / STATE_DIR)
        if progress:
            print(f"wrote orbax checkpoint in {time.perf_counter() - started:.1f}s: {len(names)} tensors, "
                  f"{stats['bytes'] / 2**20:.0f} MiB ({', '.join(sorted(stats['dtypes']))}); "
                  f"{peak.describe()}", file=sys.stderr)
        (staging / "config.json").write_text(json.dumps(dict(config), indent=2), encoding="utf-8")
        tokenizer.save(staging)
        info = {
            "format": FORMAT_VERSION,
            "source": dict(source or {}),
            "num_tensors": len(names),
            "num_parameters": stats["num_parameters"],
            "dtypes": sorted(stats["dtypes"]),
            "peak_host_bytes": peak.bytes,
        }
        (staging / MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _cast(array: np.ndarray, dtype: str | None) -> np.ndarray:
    if dtype is None or not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        return array
    import ml_dtypes

    target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    return array if array.dtype == target else array.astype(target)


class PeakMemory:
    """Samples the process's anonymous resident memory (Linux ``RssAnon``) in a thread; ``bytes``
    is the peak above the start (file-backed pages, e.g. a memory-mapped source, are excluded:
    the kernel can drop them). None where /proc is not there."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.bytes: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        start = _anonymous_rss()
        if start is not None:
            self._start, self.bytes = start, 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            now = _anonymous_rss()
            if now is not None:
                self.bytes = max(self.bytes or 0, now - self._start)
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.bytes is not None:
            self._thread.join()

    def describe(self) -> str:
        if self.bytes is None:
            return "peak host memory not measured (no /proc/self/status)"
        return f"peak host memory {self.bytes / 2**20:.0f} MiB above the start"


def _anonymous_rss() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def restore_converted(directory: str | Path,
                      placement: Callable[[str, tuple[int, ...]], Any] | None = None) -> ConvertedModel:
    """Read a converted model back: numpy state dict, config dict, tokenizer, info.

    ``placement`` = (tensor name, shape) -> ``jax.ShapeDtypeStruct`` with a sharding (e.g.
    ``TensorParallel.hf_target``) restores every tensor as a jax array of that dtype and
    sharding instead: orbax reads each device's shard straight onto the device (each process
    only its own devices' shards).
    """
    import orbax.checkpoint as ocp

    config, tokenizer, info, tree_path = _open(directory)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            target = None
            if placement is not None:
                stored = checkpointer.metadata(tree_path).item_metadata.tree
                target = {name: placement(name, tuple(meta.shape)) for name, meta in stored.items()}
            state = checkpointer.restore(tree_path, target)
    except Exception as exc:  # orbax/tensorstore raise many types on damaged data
        raise ModelCacheError(f"{tree_path}: cannot restore the orbax checkpoint ({exc})") from exc
    return ConvertedModel(config=config, state_dict=dict(state), tokenizer=tokenizer, info=info)


def open_converted(directory: str | Path) -> ConvertedModel:
    """A converted model whose state dict reads lazily: each tensor is a ``weights.LazyTensor``
    restored when read, the tensors of one layer in one orbax call (``StoredTensors``), so a
    loader that builds the model layer by layer never holds the whole checkpoint on the host."""
    import orbax.checkpoint as ocp

    config, tokenizer, info, tree_path = _open(directory)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            stored = checkpointer.metadata(tree_path).item_metadata.tree
    except Exception as exc:  # orbax/tensorstore raise many types on damaged data
        raise ModelCacheError(f"{tree_path}: cannot read the orbax checkpoint's metadata ({exc})") from exc
    shapes = {name: (tuple(meta.shape), np.dtype(meta.dtype)) for name, meta in stored.items()}
    return ConvertedModel(config=config, state_dict=StoredTensors(tree_path, shapes).tensors(), tokenizer=tokenizer,
                          info=info)


class StoredTensors:
    """Reads a converted checkpoint's tensors on demand, a group (one layer's, or one top-level
    tensor) per orbax restore; a group's other tensors wait in memory until they are read."""

    def __init__(self, tree_path: Path, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        self._path, self._shapes = tree_path, dict(shapes)
        self._waiting: dict[str, np.ndarray] = {}

    def tensors(self) -> dict[str, Any]:
        from engine_jax.weights import LazyTensor

        return {name: LazyTensor(shape, dtype, functools.partial(self.read, name))
                for name, (shape, dtype) in self._shapes.items()}

    def read(self, name: str) -> np.ndarray:
        if name not in self._waiting:
            group = _group(name)
            self._waiting = self._restore([n for n in self._shapes if _group(n) == group])
        return self._waiting.pop(name)

    def _restore(self, names: list[str]) -> dict[str, np.ndarray]:
        import orbax.checkpoint as ocp

        item = {n: np.empty(*self._shapes[n]) for n in names}  # shapes only: orbax allocates its own
        args = ocp.args.PyTreeRestore(item=item, restore_args={n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names},
                                      partial_restore=True)
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                return dict(checkpointer.restore(self._path, args=args))
        except Exception as exc:  # orbax/tensorstore raise many types on damaged data
            raise ModelCacheError(f"{self._path}: cannot restore {names[0]!r} from the orbax checkpoint ({exc})") from exc


_LAYER_PREFIX = re.compile(r"^.*?layers\.\d+\.")


def _group(name: str) -> str:
    """Tensors restored together: a layer's (``...layers.3.``), else each alone."""
    match = _LAYER_PREFIX.match(name)
    return match.group(0) if match else name


def _open(directory: str | Path) -> tuple[dict[str, Any], Tokenizer, dict[str, Any], Path]:
    """A converted model's config, tokenizer, info record and the path of its orbax tree."""
    directory = Path(directory).absolute()
    info = read_info(directory)
    return _read_config(directory), Tokenizer.from_directory(directory), info, _tree_path(directory, info)


def _tree_path(directory: Path, info: Mapping[str, Any]) -> Path:
    """Format 2: orbax's partial saves put the tree one level down; format 1 has it in state/."""
    state_path = directory / STATE_DIR
    if not state_path.is_dir():
        raise ModelCacheError(f"{directory}: the orbax checkpoint {STATE_DIR}/ is missing")
    return state_path if info.get("format") == 1 else state_path / PYTREE_DIR


def read_config(directory: str | Path) -> dict[str, Any]:
    """The config.json of a converted model, checking the directory is one."""
    read_info(directory)
    return _read_config(Path(directory))


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelCacheError(f"{directory}: config.json is missing or unreadable ({exc})") from exc


def convert(src: str | Path, out: str | Path, *, progress: bool = True, source: Mapping[str, Any] | None = None,
            chat_template: str | None = None, dtype: str | None = None) -> Path:
    """Convert a GGUF file or a Hugging Face checkpoint directory into a converted model at ``out``,
    tensor by tensor, in ``dtype`` (default: float32 for a GGUF's dequantized tensors, a
    safetensors file's own dtype). ``chat_template`` is used when the GGUF file carries none."""
    from engine_jax import gguf

    src = Path(src)
    record = {"path": str(src.absolute()), **(source or {})}
    if gguf.is_gguf(src):
        if progress:  # parsing a large vocabulary's metadata takes a while before the bar starts
            print(f"reading {src.name}: metadata and tokenizer ...", file=sys.stderr)
        reader, model_config, tokenizer = gguf.read_gguf_header(src)
        if chat_template and not tokenizer.chat_template:
            tokenizer = tokenizer.with_chat_template(chat_template)
        tensors = gguf.iter_gguf_tensors(reader, model_config, src)
        return save_converted(out, model_config, tensors, tokenizer, source={"format": "gguf", **record},
                              total=len(reader.tensors), progress=progress, dtype=dtype)
    if src.is_dir():
        from engine_jax.weights import load_hf_checkpoint

        model_config, state = load_hf_checkpoint(src)
        tokenizer = Tokenizer.from_directory(src)
        return save_converted(out, model_config, state, tokenizer, source={"format": "hf", **record},
                              progress=progress, dtype=dtype)
    if src.is_file():
        raise ModelCacheError(f"{src}: neither a GGUF file nor a Hugging Face checkpoint directory")
    raise ModelCacheError(f"{src}: no such file or directory")
