// The contract itself (wit/inferlet.wit, pie:inferlet@0.2.0): every interface
// as componentize-js binds it. Names are camelCase (`lastPageLen`), resources
// are classes (`Queue`), `list<u32>` comes back as a Uint32Array, `option`
// is a value or undefined, `u64` is a BigInt, variants are {tag, val}, and a
// call returning `result` returns its ok value or throws a ComponentError
// whose `payload` is the `error` record ({code, message}).
import * as grammar from 'pie:inferlet/grammar@0.2.0';
import * as inference from 'pie:inferlet/inference@0.2.0';
import * as kvstore from 'pie:inferlet/kvstore@0.2.0';
import * as messaging from 'pie:inferlet/messaging@0.2.0';
import * as model from 'pie:inferlet/model@0.2.0';
import * as runtime from 'pie:inferlet/runtime@0.2.0';
import * as types from 'pie:inferlet/types@0.2.0';

export { grammar, inference, kvstore, messaging, model, runtime, types };

const method = (cls, name) => cls?.prototype?.[name];

// Every function of the contract as [interface, resource or null, WIT name,
// binding]: a drift test compares the names with wit/ and, inside a guest,
// that each binding is a function.
export const BINDINGS = [
  ['types', 'pollable', 'ready', method(types.Pollable, 'ready')],
  ['types', 'future-unit', 'pollable', method(types.FutureUnit, 'pollable')],
  ['types', 'future-unit', 'get', method(types.FutureUnit, 'get')],
  ['types', 'future-string', 'pollable', method(types.FutureString, 'pollable')],
  ['types', 'future-string', 'get', method(types.FutureString, 'get')],
  ['runtime', null, 'version', runtime.version],
  ['runtime', null, 'instance-id', runtime.instanceId],
  ['runtime', null, 'arguments', runtime.arguments],
  ['runtime', null, 'models', runtime.models],
  ['runtime', null, 'poll', runtime.poll],
  ['runtime', null, 'launch', runtime.launch],
  ['runtime', null, 'scheduling', runtime.scheduling],
  ['messaging', null, 'send', messaging.send],
  ['messaging', null, 'receive', messaging.receive],
  ['messaging', null, 'broadcast', messaging.broadcast],
  ['messaging', null, 'subscribe', messaging.subscribe],
  ['messaging', 'subscription', 'next', method(messaging.Subscription, 'next')],
  ['kvstore', null, 'get', kvstore.get],
  ['kvstore', null, 'set', kvstore.set],
  ['kvstore', null, 'delete', kvstore.delete],
  ['kvstore', null, 'list-keys', kvstore.listKeys],
  ['model', 'tokenizer', 'encode', method(model.Tokenizer, 'encode')],
  ['model', 'tokenizer', 'decode', method(model.Tokenizer, 'decode')],
  ['model', 'tokenizer', 'vocabulary', method(model.Tokenizer, 'vocabulary')],
  ['model', 'tokenizer', 'special-tokens', method(model.Tokenizer, 'specialTokens')],
  ['model', 'model', 'open', model.Model?.open],
  ['model', 'model', 'info', method(model.Model, 'info')],
  ['model', 'model', 'tokenizer', method(model.Model, 'tokenizer')],
  ['model', 'model', 'apply-chat-template', method(model.Model, 'applyChatTemplate')],
  ['model', 'model', 'create-queue', method(model.Model, 'createQueue')],
  ['inference', 'forward-future', 'pollable', method(inference.ForwardFuture, 'pollable')],
  ['inference', 'forward-future', 'get', method(inference.ForwardFuture, 'get')],
  ['inference', 'queue', 'set-priority', method(inference.Queue, 'setPriority')],
  ['inference', 'queue', 'synchronize', method(inference.Queue, 'synchronize')],
  ['inference', 'queue', 'allocate-pages', method(inference.Queue, 'allocatePages')],
  ['inference', 'queue', 'free-pages', method(inference.Queue, 'freePages')],
  ['inference', 'queue', 'copy-slots', method(inference.Queue, 'copySlots')],
  ['inference', 'queue', 'mask-slots', method(inference.Queue, 'maskSlots')],
  ['inference', 'queue', 'export-pages', method(inference.Queue, 'exportPages')],
  ['inference', 'queue', 'unexport', method(inference.Queue, 'unexport')],
  ['inference', 'queue', 'import-pages', method(inference.Queue, 'importPages')],
  ['inference', 'queue', 'list-exports', method(inference.Queue, 'listExports')],
  ['inference', 'queue', 'forward', method(inference.Queue, 'forward')],
  ['grammar', 'matcher', 'from-json-schema', grammar.Matcher?.fromJsonSchema],
  ['grammar', 'matcher', 'from-regex', grammar.Matcher?.fromRegex],
  ['grammar', 'matcher', 'from-ebnf', grammar.Matcher?.fromEbnf],
  ['grammar', 'matcher', 'accept', method(grammar.Matcher, 'accept')],
  ['grammar', 'matcher', 'allowed-tokens', method(grammar.Matcher, 'allowedTokens')],
  ['grammar', 'matcher', 'is-accepting', method(grammar.Matcher, 'isAccepting')],
  ['grammar', 'matcher', 'is-done', method(grammar.Matcher, 'isDone')],
  ['grammar', 'matcher', 'rollback', method(grammar.Matcher, 'rollback')],
  ['grammar', 'matcher', 'reset', method(grammar.Matcher, 'reset')],
];
