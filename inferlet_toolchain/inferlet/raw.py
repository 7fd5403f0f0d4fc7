"""The contract itself: every WIT interface, type and function, unwrapped.

These are the bindings componentize-py generates from `wit/inferlet.wit`,
re-exported under names that do not depend on the generator's layout, for
inferlets that need something the high-level API does not offer. Failures
come back as `Err` (from `componentize_py_types`) whose `.value` is a
`types.Error` record; `inferlet.InferletError` wraps that for the
high-level API.

Only importable inside the guest (or wherever `wit_world` bindings exist).
"""

from __future__ import annotations

from componentize_py_types import Err, Ok, Some
from wit_world.imports import grammar, inference, kvstore, messaging, model, runtime, types

# types
Error = types.Error
ErrorCode = types.ErrorCode
Pollable = types.Pollable
FutureUnit = types.FutureUnit
FutureString = types.FutureString

# runtime
SchedulingHints = runtime.SchedulingHints

# model
ModelInfo = model.ModelInfo
ChatMessage = model.ChatMessage
Tokenizer = model.Tokenizer
Model = model.Model

# messaging
Subscription = messaging.Subscription

# inference
Queue = inference.Queue
ForwardFuture = inference.ForwardFuture
ForwardRequest = inference.ForwardRequest
ForwardOptions = inference.ForwardOptions
SampleSpec = inference.SampleSpec
DistributionSpec = inference.DistributionSpec
LogprobsSpec = inference.LogprobsSpec
OutputRequest = inference.OutputRequest
OutputRequestSample = inference.OutputRequest_Sample
OutputRequestDistribution = inference.OutputRequest_Distribution
OutputRequestLogprobs = inference.OutputRequest_Logprobs
Output = inference.Output
OutputToken = inference.Output_Token
OutputSampled = inference.Output_Sampled
SampledToken = inference.SampledToken
OutputDistribution = inference.Output_Distribution
OutputLogprobs = inference.Output_Logprobs

# grammar
Matcher = grammar.Matcher

# Every WIT function, as (interface, resource or None, function name) -> the
# Python callable's location, for the drift test: a function missing from the
# generated bindings (or from this table) fails it.
BINDINGS: dict[tuple[str, str | None, str], object] = {
    ("types", "pollable", "ready"): Pollable.ready,
    ("types", "future-unit", "pollable"): FutureUnit.pollable,
    ("types", "future-unit", "get"): FutureUnit.get,
    ("types", "future-string", "pollable"): FutureString.pollable,
    ("types", "future-string", "get"): FutureString.get,
    ("runtime", None, "version"): runtime.version,
    ("runtime", None, "instance-id"): runtime.instance_id,
    ("runtime", None, "arguments"): runtime.arguments,
    ("runtime", None, "models"): runtime.models,
    ("runtime", None, "poll"): runtime.poll,
    ("runtime", None, "launch"): runtime.launch,
    ("runtime", None, "scheduling"): runtime.scheduling,
    ("messaging", None, "send"): messaging.send,
    ("messaging", None, "receive"): messaging.receive,
    ("messaging", None, "broadcast"): messaging.broadcast,
    ("messaging", None, "subscribe"): messaging.subscribe,
    ("messaging", "subscription", "next"): Subscription.next,
    ("kvstore", None, "get"): kvstore.get,
    ("kvstore", None, "set"): kvstore.set,
    ("kvstore", None, "delete"): kvstore.delete,
    ("kvstore", None, "list-keys"): kvstore.list_keys,
    ("model", "tokenizer", "encode"): Tokenizer.encode,
    ("model", "tokenizer", "decode"): Tokenizer.decode,
    ("model", "tokenizer", "vocabulary"): Tokenizer.vocabulary,
    ("model", "tokenizer", "special-tokens"): Tokenizer.special_tokens,
    ("model", "model", "open"): Model.open,
    ("model", "model", "info"): Model.info,
    ("model", "model", "tokenizer"): Model.tokenizer,
    ("model", "model", "apply-chat-template"): Model.apply_chat_template,
    ("model", "model", "create-queue"): Model.create_queue,
    ("inference", "forward-future", "pollable"): ForwardFuture.pollable,
    ("inference", "forward-future", "get"): ForwardFuture.get,
    ("inference", "queue", "set-priority"): Queue.set_priority,
    ("inference", "queue", "synchronize"): Queue.synchronize,
    ("inference", "queue", "allocate-pages"): Queue.allocate_pages,
    ("inference", "queue", "free-pages"): Queue.free_pages,
    ("inference", "queue", "copy-slots"): Queue.copy_slots,
    ("inference", "queue", "mask-slots"): Queue.mask_slots,
    ("inference", "queue", "export-pages"): Queue.export_pages,
    ("inference", "queue", "unexport"): Queue.unexport,
    ("inference", "queue", "import-pages"): Queue.import_pages,
    ("inference", "queue", "list-exports"): Queue.list_exports,
    ("inference", "queue", "forward"): Queue.forward,
    ("grammar", "matcher", "from-json-schema"): Matcher.from_json_schema,
    ("grammar", "matcher", "from-regex"): Matcher.from_regex,
    ("grammar", "matcher", "from-ebnf"): Matcher.from_ebnf,
    ("grammar", "matcher", "accept"): Matcher.accept,
    ("grammar", "matcher", "allowed-tokens"): Matcher.allowed_tokens,
    ("grammar", "matcher", "is-accepting"): Matcher.is_accepting,
    ("grammar", "matcher", "is-done"): Matcher.is_done,
    ("grammar", "matcher", "rollback"): Matcher.rollback,
    ("grammar", "matcher", "reset"): Matcher.reset,
}

__all__ = [
    "Err", "Ok", "Some", "grammar", "inference", "kvstore", "messaging", "model", "runtime", "types",
    "Error", "ErrorCode", "Pollable", "FutureUnit", "FutureString", "SchedulingHints", "ModelInfo",
    "ChatMessage", "Tokenizer", "Model", "Subscription", "Queue", "ForwardFuture", "ForwardRequest",
    "ForwardOptions",
    "SampleSpec", "DistributionSpec", "LogprobsSpec", "OutputRequest", "OutputRequestSample",
    "OutputRequestDistribution", "OutputRequestLogprobs", "Output", "OutputToken", "OutputSampled", "SampledToken",
    "OutputDistribution", "OutputLogprobs", "Matcher", "BINDINGS",
]
