"""Gemma's SentencePiece-style BPE tokenizer, rebuilt from a GGUF file's metadata.

llama.cpp writes a SentencePiece vocabulary (``tokenizer.ggml.model == "llama"``) as tokens,
scores and token types, without merges. transformers' GGUF loader (``gemma_tokenizer`` in
``integrations/gguf``) turns a Gemma vocabulary into its ``GemmaTokenizer``; this module builds
the same ``tokenizers`` pipeline without importing transformers, so ids match exactly:

* a BPE model with byte fallback (``<0x..>`` pieces) and ``<unk>`` fused,
* spaces normalised to "▁" and split after each one ("merged with previous"), no prefix space,
* decoding replaces "▁" by spaces, then byte-fallback pieces, then fuses,
* tokens made only of whitespace containing a space are spelled with "▁" (one per character),
  as the vocabulary's merges expect,
* merges recovered from the vocabulary: every split of a token into two vocabulary tokens,
  ranked by the token's place in the file (Gemma's scores do not follow its merge order).
"""

from __future__ import annotations

from typing import Any, Callable

import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

SPACE = "\u2581"
# Architectures whose SentencePiece vocabulary this builder reproduces.
SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def respell(tokens: list[str]) -> list[str]:
    """Whitespace-only tokens containing a space, written with one "▁" per character."""
    return [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]


def merges_from_vocabulary(tokens: list[str]) -> list[tuple[str, str]]:
    """Every (left, right) split of a token into two vocabulary tokens, best first.

    The rank of a merge is its token's place in the file (earlier = better); ties go to
    the longer left part, then the longer right part, and within one token to the split
    whose parts come first in the vocabulary (transformers' ``generate_merges``).
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    rank = {token: -index for index, token in enumerate(tokens)}
    merges: list[tuple[str, str, int]] = []
    for token, score in rank.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def sentencepiece_backend(get: Callable[[str, Any], Any], architecture: str) -> tuple[tokenizers.Tokenizer, list[str]]:
    """``(backend, vocabulary as the model sees it)`` of a GGUF SentencePiece vocabulary.

    ``get(key, default)`` reads a GGUF metadata key. Raises ValueError for an architecture
    whose SentencePiece pipeline is not reproduced here.
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF tokenizer type 'llama' is not supported for {architecture!r} models (a SentencePiece "
            f"vocabulary is rebuilt for {', '.join(SUPPORTED_ARCHITECTURES)} only)"
        )
    tokens = respell(list(get("tokenizer.ggml.tokens", None) or []))
    if not tokens:
        raise ValueError("the GGUF file's SentencePiece tokenizer lacks tokenizer.ggml.tokens")
    unk_id = get("tokenizer.ggml.unknown_token_id", None)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else "<unk>"
    backend = tokenizers.Tokenizer(
        BPE(
            vocab={token: index for index, token in enumerate(tokens)},
            merges=merges_from_vocabulary(tokens),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, tokens
