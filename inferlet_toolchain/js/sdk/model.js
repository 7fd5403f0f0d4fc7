// Models and tokenizers.
import { Model as RawModel } from 'pie:inferlet/model@0.2.0';
import { models as rawModels, scheduling } from 'pie:inferlet/runtime@0.2.0';
import { InferletError, check } from './errors.js';

export class Tokenizer {
  constructor(handle) {
    this.raw = handle;
  }

  // Token ids of `text`, as the model's Hugging Face tokenizer encodes it (no BOS added).
  encode(text) {
    return Array.from(this.raw.encode(text));
  }

  decode(tokens) {
    return check(() => this.raw.decode(Array.from(tokens)));
  }
}

export class Model {
  constructor(handle) {
    this.raw = handle;
    const info = handle.info();
    this.info = { ...info, eosTokens: Array.from(info.eosTokens) };
    this.name = info.name;
    this.pageSize = info.pageSize;
    this.eosTokens = this.info.eosTokens;
    this.tokenizer = new Tokenizer(handle.tokenizer());
  }

  // Renders [{role, content}, ...] with the model's chat template (on the server).
  applyChatTemplate(messages, addGenerationPrompt = true) {
    const records = messages.map(({ role, content }) => ({ role: String(role), content: String(content) }));
    return check(() => this.raw.applyChatTemplate(records, addGenerationPrompt));
  }

  // A new command queue: commands on one queue run in order.
  createQueue(priority = 0) {
    return check(() => this.raw.createQueue(priority));
  }

  // How the server would like decode loops to hand it work now: {decodeRun, queueAhead}.
  scheduling() {
    return scheduling(this.raw);
  }
}

export function models() {
  return rawModels();
}

const opened = new Map();

// The model called `name`, or the server's first (default) model.
export function getModel(name = undefined) {
  if (name === undefined) {
    const names = models();
    if (!names.length) throw new InferletError('not-found', 'this server serves no models');
    name = names[0];
  }
  if (!opened.has(name)) opened.set(name, new Model(check(() => RawModel.open(name))));
  return opened.get(name);
}
