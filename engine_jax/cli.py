"""``pie-model``: list, pull, convert and inspect models.

User errors (unknown names, bad files, corrupt downloads) print one line to stderr and exit
with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from engine_jax import checkpoint, gguf, registry
from engine_jax.tokenizer import Tokenizer

EXIT_USER_ERROR = 2

_EPILOG = """\
examples:
  pie-model list
  pie-model pull smollm2-135m-instruct
  pie-model convert ./SmolLM2.gguf --out ./smollm2-converted
  pie-model info smollm2-135m-instruct
  pie-model info gemma3-270m          # also shows the license terms of the weights

Converted models are cached under $PIE_HOME/models/<name>/ (default ~/.cache/pie).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pie-model",
        description="Manage the models Pie serves: list the known ones, download and convert them "
                    "into the local cache (orbax checkpoints), and inspect them.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("list", help="known models and whether each is converted in the cache")
    pull = sub.add_parser("pull", help="install a known model's weights, verify them and convert them into the cache")
    pull.add_argument("name", metavar="NAME", help=f"a known model name (e.g. {registry.DEFAULT_MODEL})")
    pull.add_argument("--force", action="store_true", help="convert again even if already cached")
    convert = sub.add_parser("convert", help="convert a GGUF file or a Hugging Face checkpoint directory")
    convert.add_argument("src", metavar="SRC", help="a .gguf file or a directory with config.json + *.safetensors")
    convert.add_argument("--out", required=True, metavar="DIR", help="directory to write the converted model to")
    convert.add_argument("--dtype", choices=checkpoint.DTYPES, default=None,
                         help="store the weights in this dtype (default: float32 for a GGUF, the source's for "
                              "safetensors); tensors are converted one at a time, and the peak host memory is printed")
    info = sub.add_parser("info", help="architecture, sizes, vocabulary, special tokens of a model")
    info.add_argument("target", metavar="NAME_OR_PATH",
                      help="a known model name, a .gguf file, a converted or Hugging Face model directory")
    info.add_argument("--json", action="store_true", help="print the information as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pie-model``; returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list()
        if args.command == "pull":
            directory = registry.pull(args.name, force=args.force)
            print(f"{args.name}: converted in {directory}")
            return 0
        if args.command == "convert":
            directory = checkpoint.convert(args.src, args.out, dtype=args.dtype)
            print(f"converted {args.src} -> {directory}")
            return 0
        return _info(args.target, as_json=args.json)
    except (ValueError, OSError) as exc:  # our errors are ValueError subclasses; OSError: disk, permissions
        print(f"pie-model: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _list() -> int:
    rows = []
    for name, spec in sorted(registry.KNOWN_MODELS.items()):
        cached = registry.is_cached(name)
        where = str(registry.cache_dir(name)) if cached else "-"
        default = " (default)" if name == registry.DEFAULT_MODEL else ""
        rows.append((name + default, "yes" if cached else "no", spec.description, where))
    header = ("NAME", "CACHED", "DESCRIPTION", "PATH")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    print(f"\ncache: {registry.models_dir()}")
    return 0


def describe(target: str) -> dict[str, Any]:
    """What ``info`` prints, without reading any weights (config, tokenizer, tensor headers)."""
    out: dict[str, Any] = {}
    path = Path(target).expanduser()
    if target in registry.KNOWN_MODELS:
        spec = registry.get_spec(target)
        out.update(name=spec.name, description=spec.description, source=" + ".join(spec.requirements),
                   sha256=spec.sha256, license=spec.license or "not stated",
                   license_files=[str(p) for p in registry.license_paths(spec)],
                   cached=registry.is_cached(target))
        if out["cached"]:
            path = registry.cache_dir(target)
            out["cache_dir"] = str(path)
        else:
            source = registry.installed_source(spec)
            if source is None:
                state = "not assembled yet" if not registry.missing_distributions(spec) else "not installed"
                out["note"] = f"{state}; run `pie-model pull {target}`"
                return out
            path = source
            out["note"] = f"not converted yet; run `pie-model pull {target}`"
    if path.is_file():
        reader, config, tokenizer = gguf.read_gguf_header(path)
        out.setdefault("name", path.stem)
        out.update(format="gguf", path=str(path),
                   quantization=sorted({t.tensor_type.name for t in reader.tensors}),
                   parameters=int(sum(int(t.n_elements) for t in reader.tensors if t.name != "rope_freqs.weight")))
    elif path.is_dir() and checkpoint.is_converted(path):
        record = checkpoint.read_info(path)
        config, tokenizer = checkpoint.read_config(path), Tokenizer.from_directory(path)
        out.setdefault("name", path.name)
        out.update(format="converted (orbax)", path=str(path), parameters=record["num_parameters"],
                   dtypes=record["dtypes"], converted_from=record.get("source", {}).get("path"))
    elif path.is_dir() and (path / "config.json").is_file():
        from engine_jax.weights import load_hf_checkpoint

        config, state = load_hf_checkpoint(path)  # memory-mapped: only headers are read
        tokenizer = Tokenizer.from_directory(path)
        out.setdefault("name", path.name)
        out.update(format="hugging face", path=str(path), parameters=int(sum(a.size for a in state.values())),
                   dtypes=sorted({str(a.dtype) for a in state.values()}))
    else:
        raise registry.RegistryError(
            f"{target!r} is neither a known model ({', '.join(sorted(registry.KNOWN_MODELS))}) "
            "nor a GGUF file or model directory"
        )
    out["architecture"] = config.get("model_type")
    out.update({k: config.get(k) for k in (
        "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
        "rope_theta", "tie_word_embeddings")})
    out["tokenizer_vocab_size"] = tokenizer.vocab_size
    out["bos_token_id"] = tokenizer.bos_token_id
    out["eos_token_ids"] = tokenizer.eos_token_ids
    out["special_tokens"] = tokenizer.special_tokens()
    out["chat_template"] = bool(tokenizer.chat_template)
    return out


def _info(target: str, as_json: bool) -> int:
    data = describe(target)
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if key == "special_tokens":
            value = ", ".join(f"{t}={i}" for t, i in value.items()) or "-"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "-"
        print(f"{key.replace('_', ' '):>24}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
