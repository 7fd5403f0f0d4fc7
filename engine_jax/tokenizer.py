"""The model's tokenizer: encode/decode, raw token bytes, special tokens and the chat template.

One class serves both sources of a tokenizer:

* a Hugging Face directory (``tokenizer.json`` + ``tokenizer_config.json``), and
* a GGUF file's metadata (llama.cpp's ``tokenizer.ggml.*`` keys), rebuilt so that it encodes
  exactly as transformers' ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` does.

``save`` writes the Hugging Face layout, so a GGUF tokenizer converted once is read back with
``from_directory`` (that is how the model cache stores it).
"""

from __future__ import annotations

import codecs
import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or read, or an input it cannot handle."""


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


# Pre-tokenizer split patterns by llama.cpp's ``tokenizer.ggml.pre`` name, the same table
# transformers uses; any other name (e.g. "smollm", "gpt2") gets GPT-2's ByteLevel regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
}

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL = 3
_USER_DEFINED = 4

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Control tokens llama.cpp treats as an end of generation by their spelling.
_END_OF_TURN_TOKENS = ("<end_of_turn>",)


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"unreadable special token entry {value!r} in tokenizer_config.json")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus what transformers keeps beside it (special tokens, template)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: Mapping[str, Any] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        """``config`` holds tokenizer_config.json fields: bos/eos/unk/pad_token, chat_template, ...

        ``extra_eos_token_ids`` are further ids that end a generation (e.g. a model's
        config.json lists several), kept after the tokenizer's own eos token.
        """
        self._backend = backend
        self._config = dict(config or {})
        self._specials: dict[str, str] = {}
        for name in _SPECIAL_NAMES:
            content = _token_content(self._config.get(name))
            if content is not None:
                self._specials[name] = content
        template = self._config.get("chat_template")
        if isinstance(template, list):  # the named-template form: [{"name":..., "template":...}]
            by_name = {t.get("name"): t.get("template") for t in template}
            template = by_name.get("default") or next(iter(by_name.values()), None)
        self._chat_template: str = template or ""
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._added = dict(backend.get_added_tokens_decoder())
        eos: list[int] = []
        if "eos_token" in self._specials:
            eos_id = backend.token_to_id(self._specials["eos_token"])
            if eos_id is not None:
                eos.append(eos_id)
        for i in extra_eos_token_ids:
            if i not in eos and 0 <= int(i) < self._vocab_size:
                eos.append(int(i))
        self._eos_ids = eos
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        self._byte_level = _has_byte_level(decoder)
        self._vocabulary: list[bytes] | None = None
        self._template_cache: jinja2.Template | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_directory(cls, directory: str | Path) -> "Tokenizer":
        """Read a Hugging Face tokenizer directory (``tokenizer.json`` required).

        ``tokenizer_config.json``, ``chat_template.jinja`` (transformers 5 writes the template
        there), and eos ids from ``config.json`` / ``generation_config.json`` are used when present.
        """
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json (a Hugging Face tokenizer directory needs one)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises bare Exceptions
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({exc})") from exc
        config = _read_json(directory / "tokenizer_config.json") or {}
        template_file = directory / "chat_template.jinja"
        if not config.get("chat_template") and template_file.is_file():
            config["chat_template"] = template_file.read_text(encoding="utf-8")
        extra: list[int] = []
        for name in ("config.json", "generation_config.json"):
            value = (_read_json(directory / name) or {}).get("eos_token_id")
            extra.extend([value] if isinstance(value, int) else list(value or []))
        return cls(backend, config, extra)

    @classmethod
    def from_gguf_metadata(cls, reader: Any) -> "Tokenizer":
        """Rebuild the tokenizer a ``gguf.GGUFReader``'s metadata describes, as transformers does:
        byte-level BPE ("gpt2") or, for Gemma models, SentencePiece-style BPE ("llama")."""
        fields = reader.fields

        def get(key: str, default: Any = None) -> Any:
            return fields[key].contents() if key in fields else default

        model = get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
        if model == "gpt2":
            backend, vocab, alphabet = _byte_level_backend(get)
        elif model == "llama":
            from engine_jax.gguf_sentencepiece import sentencepiece_backend

            try:
                backend, spelled = sentencepiece_backend(get, get("general.architecture"))
            except ValueError as exc:
                raise TokenizerError(str(exc)) from None
            vocab, alphabet = set(spelled), None
        else:
            raise TokenizerError(
                f"GGUF tokenizer type {model!r} is not supported (byte-level BPE 'gpt2', or 'llama' for Gemma)"
            )
        tokens: list[str] = get("tokenizer.ggml.tokens")
        token_types: list[int] = get("tokenizer.ggml.token_type") or []

        config: dict[str, Any] = {}
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        ):
            token_id = get(f"tokenizer.ggml.{key}")
            if token_id is not None:
                if not 0 <= token_id < len(tokens):
                    raise TokenizerError(f"GGUF tokenizer.ggml.{key}={token_id} is outside the vocabulary")
                config[name] = tokens[token_id]
        config["add_bos_token"] = bool(get("tokenizer.ggml.add_bos_token", False))
        config["add_eos_token"] = bool(get("tokenizer.ggml.add_eos_token", False))
        config["chat_template"] = get("tokenizer.chat_template") or ""

        # Control tokens become special added tokens, user-defined ones plain added tokens, so
        # both are matched whole in text. In a byte-level vocabulary a "control" token outside
        # the byte alphabet is a llama.cpp mislabel and is skipped, as transformers does.
        control = [
            t for t, kind in zip(tokens, token_types)
            if kind == _CONTROL and (alphabet is None or set(t) <= alphabet)
        ]
        named = [config[n] for n in _SPECIAL_NAMES if n in config and config[n] not in control]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control + named])
        user = [t for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        backend.post_processor = _bos_eos_processor(
            config.get("bos_token") if config["add_bos_token"] else None,
            config.get("eos_token") if config["add_eos_token"] else None,
            backend,
        )

        extra = [
            v
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if (v := get(key)) is not None
        ]
        if model == "llama":
            # llama.cpp ends a generation at a control token spelled like an end of turn even when
            # the file names no eot id (Gemma's <end_of_turn>); so do we.
            extra += [i for i, (t, kind) in enumerate(zip(tokens, token_types))
                      if kind == _CONTROL and t in _END_OF_TURN_TOKENS]
        return cls(backend, config, extra)

    def with_chat_template(self, template: str) -> "Tokenizer":
        """This tokenizer with ``template`` as its chat template."""
        return Tokenizer(self._backend, {**self._config, "chat_template": template}, self._eos_ids)

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (template included) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        config = dict(self._config)
        config["chat_template"] = self._chat_template
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
        )

    # ----------------------------------------------------------------- queries
    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_ids)

    @property
    def bos_token_id(self) -> int | None:
        bos = self._specials.get("bos_token")
        return None if bos is None else self._backend.token_to_id(bos)

    @property
    def chat_template(self) -> str:
        """The Jinja chat template, or "" when the model has none."""
        return self._chat_template

    def special_tokens(self) -> dict[str, int]:
        """Every special token's text -> id (bos/eos/unk/pad and all added special tokens)."""
        out = {t.content: i for i, t in sorted(self._added.items()) if t.special}
        for content in self._specials.values():
            token_id = self._backend.token_to_id(content)
            if token_id is not None:
                out.setdefault(content, token_id)
        return out

    def special_token_names(self) -> dict[str, str]:
        """The named special tokens: {"bos_token": "<s>", "eos_token": ...}."""
        return dict(self._specials)

    # ----------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in it (e.g. "<|im_start|>") map to their ids.

        ``add_special_tokens`` adds what the tokenizer's post-processor adds (e.g. a bos token).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ValueError for an id outside ``[0, vocab_size)``."""
        ids = [self._check_id(i) for i in ids]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def vocabulary(self) -> list[bytes]:
        """Each token id's raw bytes (byte-level decoded; added tokens as their UTF-8 text)."""
        if self._vocabulary is None:
            self._vocabulary = [self._token_bytes(i) for i in range(self._vocab_size)]
        return self._vocabulary

    def is_special(self, token_id: int) -> bool:
        added = self._added.get(token_id)
        return added is not None and added.special

    def _check_id(self, token_id: int) -> int:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            try:
                token_id = int(token_id)  # numpy integers
            except (TypeError, ValueError):
                raise ValueError(f"token id {token_id!r} is not an integer") from None
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self._vocab_size})")
        return token_id

    def _token_bytes(self, token_id: int) -> bytes:
        added = self._added.get(token_id)
        if added is not None:
            return added.content.encode("utf-8")
        token = self._backend.id_to_token(token_id)
        if token is None:
            return b""
        if self._byte_level:
            table = unicode_to_byte()
            if all(c in table for c in token):
                return bytes(table[c] for c in token)
            return token.encode("utf-8")
        # SentencePiece-style vocabularies: byte-fallback pieces and the "▁" space marker.
        match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
        if match:
            return bytes([int(match.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")

    # ----------------------------------------------------------------- chat template
    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template, the way transformers does."""
        if not self._chat_template:
            raise TokenizerError("this model's tokenizer has no chat template")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        if self._template_cache is None:
            self._template_cache = _compile_template(self._chat_template)
        variables: dict[str, Any] = {"tools": None, "documents": None, **self._specials, **kwargs}
        return self._template_cache.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences.

    Each ``push`` returns only the newly completed text, so the concatenation of all pieces
    plus ``flush()`` equals the text of the whole sequence (byte-exact for byte-level BPE).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._vocabulary = tokenizer.vocabulary()
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        token_id = self._tokenizer._check_id(token_id)
        if self._skip and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._vocabulary[token_id])

    def flush(self) -> str:
        """Whatever is still buffered (an incomplete sequence becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _byte_level_backend(get: Any) -> tuple[tokenizers.Tokenizer, dict[str, int], set[str]]:
    """GPT-2 style byte-level BPE from GGUF metadata: (backend, vocab, the byte alphabet)."""
    tokens: list[str] = get("tokenizer.ggml.tokens")
    merges: list[str] | None = get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise TokenizerError("the GGUF file's BPE tokenizer lacks tokenizer.ggml.tokens or .merges")
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    # llama.cpp stores some tokens as plain text; the BPE model needs them in the byte alphabet.
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    backend = tokenizers.Tokenizer(
        BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ")) for m in merges],
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _GGUF_PRE_SPLITS.get(get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend, vocab, alphabet


def _bos_eos_processor(
    bos: str | None, eos: str | None, backend: tokenizers.Tokenizer
) -> processors.TemplateProcessing:
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _has_byte_level(decoder: Mapping[str, Any]) -> bool:
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(d) for d in decoder.get("decoders") or [])


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from exc


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace(), refusing underscore attributes (no reaching into Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r}")


def _compile_template(source: str) -> jinja2.Template:
    """The environment transformers renders chat templates in (templates are untrusted code)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # jinja's own tojson escapes HTML characters, which templates do not expect
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TokenizerError(f"the chat template does not parse: {exc}") from exc
