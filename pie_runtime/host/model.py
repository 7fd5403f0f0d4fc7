"""The `model` interface: opening a served model, its info, chat template and queues, and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from wasmtime.component import Record

from pie_runtime.errors import PieError
from pie_runtime.host.inference import QueueHandle
from pie_runtime.host.resource_table import Kind, borrowed, own

if TYPE_CHECKING:
    from pie_runtime.host.registry import ServedModel


@dataclass
class ModelHandle:
    """A `model` resource (the grammar interface reads `.served` too)."""

    served: ServedModel


def _tokenizer_encode(ctx, store, this, text):
    served: ServedModel = borrowed(ctx, store, this, Kind.TOKENIZER)
    return [int(t) for t in served.tokenizer.encode(text, add_special_tokens=False)]


def _tokenizer_decode(ctx, store, this, tokens):
    served: ServedModel = borrowed(ctx, store, this, Kind.TOKENIZER)
    vocab = _tokenizer_vocab_size(served)
    for t in tokens:
        if not 0 <= t < vocab:
            raise PieError.invalid(f"token id {t} is outside the vocabulary [0, {vocab})")
    return served.tokenizer.decode(list(tokens))


def _tokenizer_vocab_size(served: ServedModel) -> int:
    return int(served.tokenizer.vocab_size)


def _tokenizer_vocabulary(ctx, store, this):
    served: ServedModel = borrowed(ctx, store, this, Kind.TOKENIZER)
    return [bytes(b) for b in served.tokenizer.vocabulary()]


def _tokenizer_special_tokens(ctx, store, this):
    served: ServedModel = borrowed(ctx, store, this, Kind.TOKENIZER)
    return [(str(text), int(i)) for text, i in sorted(served.tokenizer.special_tokens().items(),
                                                       key=lambda kv: kv[1])]


def _model_open(ctx, store, name):
    return own(ctx, Kind.MODEL, ModelHandle(ctx.host.model(name)))


def _model_info(ctx, store, this):
    served = borrowed(ctx, store, this, Kind.MODEL).served
    cfg = served.engine.config
    tok = served.tokenizer
    # The tokenizer's view first (it reads tokenizer_config.json); the model
    # config's as a fallback for checkpoints that only declare them there.
    eos = list(tok.eos_token_ids) or list(cfg.eos_token_ids)
    bos = tok.bos_token_id if tok.bos_token_id is not None else cfg.bos_token_id
    info = Record()
    for name, value in (
        ("name", served.name),
        ("architecture", str(cfg.architecture)),
        ("vocab-size", int(cfg.vocab_size)),
        ("page-size", served.page_size),
        ("max-positions", int(cfg.max_position_embeddings)),
        ("eos-tokens", [int(t) for t in eos]),
        ("bos-token", None if bos is None else int(bos)),
        ("chat-template", tok.chat_template or ""),
    ):
        setattr(info, name, value)
    return info


def _model_tokenizer(ctx, store, this):
    served = borrowed(ctx, store, this, Kind.MODEL).served
    return own(ctx, Kind.TOKENIZER, served)


def _model_apply_chat_template(ctx, store, this, messages, add_generation_prompt):
    served = borrowed(ctx, store, this, Kind.MODEL).served
    if not served.tokenizer.chat_template:
        raise PieError.unsupported(f"model {served.name!r} has no chat template")
    msgs = [{"role": m.role, "content": m.content} for m in messages]
    try:
        return str(served.tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt))
    except Exception as e:  # jinja2 template errors, raise_exception() inside templates
        raise PieError.invalid(f"chat template failed: {e}") from None


def _model_create_queue(ctx, store, this, priority):
    served = borrowed(ctx, store, this, Kind.MODEL).served
    queue = ctx.state_for(served).create_queue(priority)
    return own(ctx, Kind.QUEUE, QueueHandle(served, queue))


RESOURCES = (("tokenizer", Kind.TOKENIZER), ("model", Kind.MODEL))
FUNCTIONS = (
    ("[method]tokenizer.encode", _tokenizer_encode, False),
    ("[method]tokenizer.decode", _tokenizer_decode, True),
    ("[method]tokenizer.vocabulary", _tokenizer_vocabulary, False),
    ("[method]tokenizer.special-tokens", _tokenizer_special_tokens, False),
    ("[static]model.open", _model_open, True),
    ("[method]model.info", _model_info, False),
    ("[method]model.tokenizer", _model_tokenizer, False),
    ("[method]model.apply-chat-template", _model_apply_chat_template, True),
    ("[method]model.create-queue", _model_create_queue, True),
)
