"""Models and tokenizers (high level). Guest-only: imports the bindings."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, TypeVar, Union

from . import raw
from .errors import InferletError

T = TypeVar("T")

# A chat message as users write it: {"role": ..., "content": ...}, a
# (role, content) pair, or the contract's record.
Message = Union[dict, tuple, "raw.ChatMessage"]


def call(fn: Callable[..., T], *args: Any) -> T:
    """Calls a binding, turning the contract's `Err(error)` into InferletError."""
    try:
        return fn(*args)
    except raw.Err as err:
        raise InferletError.from_wit(err.value) from None


class Tokenizer:
    """A model's tokenizer (the server runs the real Hugging Face tokenizer)."""

    def __init__(self, handle: "raw.Tokenizer") -> None:
        self.raw = handle
        self._vocabulary: Optional[list[bytes]] = None
        self._special: Optional[dict[str, int]] = None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special tokens in it are recognised; no BOS added)."""
        return list(self.raw.encode(text))

    def decode(self, tokens: Iterable[int]) -> str:
        return call(self.raw.decode, list(tokens))

    def vocabulary(self) -> list[bytes]:
        """Every token's bytes, indexed by id (fetched once, then cached)."""
        if self._vocabulary is None:
            self._vocabulary = [bytes(b) for b in self.raw.vocabulary()]
        return self._vocabulary

    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id (fetched once, then cached)."""
        if self._special is None:
            self._special = {text: tid for text, tid in self.raw.special_tokens()}
        return self._special


class Model:
    """A model served by this server. Get one with `inferlet.get_model()`."""

    def __init__(self, handle: "raw.Model") -> None:
        self.raw = handle
        self.info: raw.ModelInfo = handle.info()
        self._tokenizer: Optional[Tokenizer] = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def page_size(self) -> int:
        return self.info.page_size

    @property
    def eos_tokens(self) -> list[int]:
        return list(self.info.eos_tokens)

    @property
    def chat_template(self) -> str:
        """The Jinja2 chat template source ("" when the model has none)."""
        return self.info.chat_template

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.raw.tokenizer())
        return self._tokenizer

    def apply_chat_template(self, messages: Iterable[Message], add_generation_prompt: bool = True) -> str:
        """Renders `messages` with the model's chat template (on the server)."""
        return call(self.raw.apply_chat_template, [to_chat_message(m) for m in messages],
                    add_generation_prompt)

    def create_queue(self, priority: int = 0) -> "raw.Queue":
        """A new command queue; commands on one queue run in order."""
        return call(self.raw.create_queue, priority)

    def scheduling(self) -> "raw.SchedulingHints":
        """How the server would like decode loops to hand it work now
        (`decode_run`, `queue_ahead`); asked afresh by each generation."""
        return raw.runtime.scheduling(self.raw)

    def __repr__(self) -> str:
        return f"Model({self.name!r})"


def to_chat_message(message: Message) -> "raw.ChatMessage":
    if isinstance(message, raw.ChatMessage):
        return message
    if isinstance(message, dict):
        try:
            return raw.ChatMessage(role=str(message["role"]), content=str(message["content"]))
        except KeyError as missing:
            raise ValueError(f"chat message {message!r} has no {missing} key") from None
    if isinstance(message, tuple) and len(message) == 2:
        return raw.ChatMessage(role=str(message[0]), content=str(message[1]))
    raise TypeError(f"a chat message is a dict with role/content or a (role, content) pair, got {message!r}")


_models: dict[str, Model] = {}


def models() -> list[str]:
    """Names of the models this server serves."""
    return list(raw.runtime.models())


def get_model(name: Optional[str] = None) -> Model:
    """The model called `name`, or the server's first (default) model."""
    if name is None:
        names = models()
        if not names:
            raise InferletError("not-found", "this server serves no models")
        name = names[0]
    model = _models.get(name)
    if model is None:
        model = _models[name] = Model(call(raw.Model.open, name))
    return model
