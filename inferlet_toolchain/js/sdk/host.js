// The runtime's other services: client messages, broadcast topics, the
// key-value store and child instances. Calls the server refuses throw an
// InferletError.
import * as kv from 'pie:inferlet/kvstore@0.2.0';
import * as messaging from 'pie:inferlet/messaging@0.2.0';
import * as runtime from 'pie:inferlet/runtime@0.2.0';
import { check, drop } from './errors.js';
import { take } from './loop.js';

export const version = () => runtime.version();
export const instanceId = () => runtime.instanceId();

// Sends a message to the client that launched this instance.
export function send(message) {
  check(() => messaging.send(String(message)));
}

// The next message from the client; an InferletError "closed" once it has no more.
export function receive() {
  return take(messaging.receive());
}

// Sends `message` to every current subscriber of `topic`.
export function broadcast(topic, message) {
  check(() => messaging.broadcast(topic, String(message)));
}

export class Subscription {
  constructor(topic) {
    this.topic = topic;
    this.raw = check(() => messaging.subscribe(topic));
  }

  // The next message broadcast on the topic after subscribing.
  next() {
    return take(this.raw.next());
  }

  close() {
    drop(this.raw);
  }
}

export const subscribe = (topic) => new Subscription(topic);

// The key-value store shared by this user's instances.
export const store = {
  get: (key) => kv.get(key) ?? null,
  set: (key, value) => check(() => kv.set(key, String(value))),
  delete: (key) => kv.delete(key),
  keys: (prefix = '') => kv.listKeys(prefix),
};

// Runs a child instance (of `program`, '' = this inferlet) to completion; its
// result string. Needs the "launch" capability.
export function launch(args = [], program = '') {
  return take(check(() => runtime.launch(program, args.map(String))));
}
