"""Log-probabilities in OpenAI's two shapes, from what the completion inferlet reports.

The inferlet sends, per generated token, ``[token, logprob, [[id, logprob], ...]]``
(the model's own distribution: natural log, temperature 1). Chat completions
show them as ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``;
legacy completions as parallel lists ``tokens`` / ``token_logprobs`` /
``top_logprobs`` (token text -> logprob) / ``text_offset``.
"""

from __future__ import annotations

from typing import Any, Sequence

Entry = Sequence[Any]  # [token id, logprob, [[id, logprob], ...]]


class TokenTexts:
    """Each token id's text and bytes, from the served model's vocabulary (built once)."""

    def __init__(self, tokenizer: Any) -> None:
        self._vocabulary: list[bytes] = tokenizer.vocabulary()

    def bytes_of(self, token: int) -> bytes:
        return self._vocabulary[token] if 0 <= token < len(self._vocabulary) else b""

    def text_of(self, token: int) -> str:
        # A token can hold part of a UTF-8 character: its text then shows the bytes it has.
        return self.bytes_of(token).decode("utf-8", errors="backslashreplace")


def chat_logprobs(entries: Sequence[Entry], texts: TokenTexts) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        return {"token": texts.text_of(token), "logprob": logprob, "bytes": list(texts.bytes_of(token))}

    content = [{**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in top]}
               for token, logprob, top in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[Entry], texts: TokenTexts, offset: int) -> dict[str, Any]:
    """``offset``: where the first entry's text starts in the choice's text."""
    tokens, offsets = [], []
    for token, _, _ in entries:
        offsets.append(offset)
        text = texts.text_of(token)
        tokens.append(text)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [logprob for _, logprob, _ in entries],
        "top_logprobs": [{texts.text_of(t): lp for t, lp in top} for _, _, top in entries],
        "text_offset": offsets,
    }


class ChoiceLogprobs:
    """One response's log-probabilities, per choice: all of them (for a whole response) and
    those not yet streamed (for the next chunk of that choice)."""

    def __init__(self, choices: int, chat: bool, texts: TokenTexts) -> None:
        self.chat, self.texts = chat, texts
        self.entries: list[list[Entry]] = [[] for _ in range(choices)]
        self._streamed = [0] * choices
        self._offset = [0] * choices  # text_offset of the next streamed entry

    def add(self, choice: int, entries: Sequence[Entry]) -> None:
        self.entries[choice].extend(entries)

    def whole(self, choice: int) -> dict[str, Any]:
        return self._format(self.entries[choice], 0)

    def unsent(self, choice: int) -> dict[str, Any] | None:
        """The entries of `choice` not streamed yet, formatted (None if there are none)."""
        new = self.entries[choice][self._streamed[choice]:]
        if not new:
            return None
        self._streamed[choice] = len(self.entries[choice])
        formatted = self._format(new, self._offset[choice])
        if not self.chat:
            self._offset[choice] += sum(len(text) for text in formatted["tokens"])
        return formatted

    def _format(self, entries: Sequence[Entry], offset: int) -> dict[str, Any]:
        if self.chat:
            return chat_logprobs(entries, self.texts)
        return completion_logprobs(entries, self.texts, offset)
