// Context: one token sequence, its KV pages and its command queue (the
// JavaScript counterpart of the Python SDK's `inferlet.Context`).
//
// What it keeps, and the contract's rules it follows:
// - `tokens`/`positions`: the tokens whose KV is in `pages`, in slot order,
//   with their RoPE positions. Slot i lives in pages[floor(i / pageSize)];
//   the sequence is (pages.length - 1) * pageSize + lastPageLen slots long.
// - `pending`: tokens filled but not yet run through the model. After
//   `flush()` and `generate()` one token stays pending: the next pass needs
//   a token to draw its distribution from.
// - Page ids are per instance, so forks hold the same ids for the pages they
//   share; a module-wide count decides when a page is really freed. A
//   context never writes into a page another context holds: full shared
//   pages are only read, and a shared partial page is copied first.
// - Commands on different queues are unordered, so `fork()` first waits for
//   this context's queue: the child then reads pages whose KV is written.
import { getModel } from './model.js';
import { InferletError, check, drop } from './errors.js';
import { take } from './loop.js';
import { Sampler, Stop } from './sampling.js';

const holders = new Map(); // page id -> contexts of this instance holding it

function retain(pages) {
  for (const page of pages) holders.set(page, (holders.get(page) ?? 0) + 1);
}

// Drops one hold on each page; the pages nobody holds any more.
function release(pages) {
  const freed = [];
  for (const page of pages) {
    const left = (holders.get(page) ?? 0) - 1;
    if (left <= 0) {
      holders.delete(page);
      freed.push(page);
    } else {
      holders.set(page, left);
    }
  }
  return freed;
}

export class Context {
  constructor(model = getModel(), { priority = 0 } = {}) {
    this.model = model;
    this.queue = model.createQueue(priority);
    this.pageSize = model.pageSize;
    this.pages = [];
    this.tokens = [];
    this.positions = [];
    this.pending = [];
    this.nextPosition = 0;
    this.generated = []; // tokens of the last generate() (without a final end-of-sequence token)
    this.stopReason = null;
    this.step = 0; // draws made so far: seeds the sampler's per-step seeds
    this.chat = null; // {messages, text} once fillChat() was used
    this.released = false;
  }

  get kvLen() {
    return this.tokens.length;
  }

  get lastPageLen() {
    return this.pages.length ? this.kvLen - (this.pages.length - 1) * this.pageSize : 0;
  }

  // The whole sequence (in KV and pending) as text.
  get text() {
    return this.model.tokenizer.decode([...this.tokens, ...this.pending]);
  }

  checkAlive() {
    if (this.released) throw new Error('this context was released');
  }

  // Filling ---------------------------------------------------------------

  // Appends `text`, tokenized by the model's tokenizer, to the pending tokens.
  fill(text) {
    this.fillTokens(this.model.tokenizer.encode(text));
  }

  // Appends token ids to the pending tokens (BOS first on an empty context).
  fillTokens(tokens) {
    this.checkAlive();
    const vocab = this.model.info.vocabSize;
    tokens = Array.from(tokens);
    for (const token of tokens) {
      if (!(Number.isInteger(token) && token >= 0 && token < vocab)) {
        throw new RangeError(`token ${token} is not an id in this model's vocabulary (0..${vocab - 1})`);
      }
    }
    const bos = this.model.info.bosToken;
    if (bos !== undefined && !this.tokens.length && !this.pending.length && tokens.length && tokens[0] !== bos) {
      tokens.unshift(bos);
    }
    this.pending.push(...tokens);
  }

  // Appends chat turns [{role, content}], rendered by the model's chat
  // template; call once per turn (generate() adds the assistant's reply).
  fillChat(messages, addGenerationPrompt = true) {
    this.chat ??= { messages: [], text: '' };
    this.chat.messages.push(...messages);
    const rendered = this.model.applyChatTemplate(this.chat.messages, addGenerationPrompt);
    if (!rendered.startsWith(this.chat.text)) {
      throw new InferletError('unsupported', 'the chat template renders earlier turns differently once new ones '
        + 'are added; fill the rendered text yourself with fill()');
    }
    this.fill(rendered.slice(this.chat.text.length));
    this.chat.text = rendered;
  }

  // Pages -------------------------------------------------------------------

  allocate(count) {
    const pages = Array.from(check(() => this.queue.allocatePages(count)));
    retain(pages);
    return pages;
  }

  releasePages(pages) {
    const freed = release(pages);
    if (freed.length) check(() => this.queue.freePages(freed));
  }

  // Makes pages[index] private (a copy if another context holds it) before a write.
  ownPage(index) {
    const page = this.pages[index];
    if ((holders.get(page) ?? 0) <= 1) return;
    const used = Math.min(this.pageSize, this.kvLen - index * this.pageSize);
    const fresh = this.allocate(1)[0];
    check(() => this.queue.copySlots(page, 0, fresh, 0, used));
    this.pages[index] = fresh;
    this.releasePages([page]);
  }

  // Makes room for `tokens` at the next slots and positions, records them as
  // in KV, and returns the contract's forward-request for them.
  request(tokens, outputs) {
    this.checkAlive();
    const positions = tokens.map((_, i) => this.nextPosition + i);
    if (this.pages.length && this.lastPageLen < this.pageSize) this.ownPage(this.pages.length - 1);
    const needed = Math.ceil((this.kvLen + tokens.length) / this.pageSize);
    if (needed > this.pages.length) this.pages.push(...this.allocate(needed - this.pages.length));
    this.tokens.push(...tokens);
    this.positions.push(...positions);
    if (positions.length) this.nextPosition = Math.max(this.nextPosition, positions[positions.length - 1] + 1);
    return { tokens, positions, pages: [...this.pages], lastPageLen: this.lastPageLen, mask: undefined, outputs };
  }

  forward(request, { feedPrevious = false, draws = [] } = {}) {
    return check(() => this.queue.forward(request, { feedPrevious, draws }));
  }

  // Forgets the last `count` tokens in KV (their slots get overwritten).
  rollback(count) {
    if (count <= 0) return;
    if (count > this.kvLen) throw new RangeError(`cannot roll back ${count} tokens of ${this.kvLen}`);
    const dropped = this.positions.splice(-count);
    this.tokens.splice(-count);
    this.nextPosition = this.positions.length ? this.positions[this.positions.length - 1] + 1 : Math.min(...dropped);
    const keep = Math.ceil(this.kvLen / this.pageSize);
    if (keep < this.pages.length) this.releasePages(this.pages.splice(keep));
  }

  // Forward passes ----------------------------------------------------------

  // Prefills the pending tokens but the last (which the next generation step
  // needs) in one forward pass.
  async flush() {
    if (this.pending.length <= 1) return;
    const tokens = this.pending.slice(0, -1);
    this.pending = this.pending.slice(-1);
    await take(this.forward(this.request(tokens, [])));
  }

  // Queues a decode run of `length` draws from `tokens` (a placeholder when
  // `feedPrevious`): KV room and placeholder ids for the tokens and every
  // draw but the last, which stays pending.
  queueRun(tokens, length, sampler, step, feedPrevious) {
    const request = this.request([...tokens, ...new Array(length - 1).fill(0)],
      [{ tag: 'sample', val: sampler.spec(tokens.length - 1, step) }]);
    request.tokens = tokens;
    request.positions = request.positions.slice(0, tokens.length);
    const draws = [];
    for (let i = 1; i < length; i++) draws.push(sampler.spec(0, step + i));
    const future = this.forward(request, { feedPrevious, draws });
    return { future, length, firstDrawSlot: this.tokens.length - (length - 1) };
  }

  // Generates until `stop` (default: end of sequence or 256 tokens); resolves
  // to the new text. The passes go to the server `runLength` per call
  // (default: the server's decode-run hint; onToken then sees tokens in
  // bursts) and, when the server asks for it (queue-ahead: accelerators),
  // each run is queued before the one ahead of it has run, so the engine
  // never waits for this inferlet. Passes drawn past a stop are rolled back.
  async generate(sampler = Sampler.greedy(), stop = new Stop(), { onToken = null, runLength = null } = {}) {
    this.checkAlive();
    if (!this.pending.length) throw new Error('nothing to generate from: fill() a prompt first');
    const hints = this.model.scheduling();
    const run = runLength ?? hints.decodeRun;
    if (!(Number.isInteger(run) && run >= 1)) throw new RangeError(`runLength must be >= 1, got ${run}`);
    const stopIds = new Set(stop.eos ? [...stop.tokens, ...this.model.eosTokens] : stop.tokens);
    const tokenizer = this.model.tokenizer;
    const generated = [];
    let reason = null;
    let tokens = this.pending;
    this.pending = [];
    let current = null;
    let next = null;
    let queuedStep = this.step; // the step of the next draw to queue
    try {
      while (reason === null) {
        if (current === null) {
          current = this.queueRun(tokens, Math.min(run, stop.maxTokens - generated.length), sampler, this.step, false);
          queuedStep = this.step + current.length;
        }
        const room = stop.maxTokens - (queuedStep - this.step) - generated.length;
        if (hints.queueAhead && room > 0) { // token 0 stands in for the last token `current` draws
          next = this.queueRun([0], Math.min(run, room), sampler, queuedStep, true);
          queuedStep += next.length;
        }
        const waiting = current;
        current = null;
        const drawn = (await take(waiting.future)).map((output) => output.val);
        // The drawn tokens now in KV: all but the last, and the last as the
        // first token of the run queued behind (if any).
        this.tokens.splice(waiting.firstDrawSlot, waiting.length - 1, ...drawn.slice(0, -1));
        if (next !== null) this.tokens[next.firstDrawSlot - 1] = drawn[drawn.length - 1];
        let used = 0;
        for (const token of drawn) {
          generated.push(token);
          used += 1;
          onToken?.(token);
          reason = stop.check(generated, stopIds, stop.strings.length ? tokenizer.decode(generated) : null);
          if (reason !== null) break;
        }
        this.step += used;
        if (reason !== null) {
          this.rollback(waiting.length - used + (next !== null ? next.length : 0));
        } else {
          current = next;
          next = null;
          tokens = [generated[generated.length - 1]];
        }
      }
    } finally {
      for (const queued of [current, next]) if (queued !== null) drop(queued.future);
    }
    this.pending = [generated[generated.length - 1]];
    if (reason === 'eos') {
      // The end token is not part of the text, and a chat template writes
      // its own end of turn when the conversation goes on.
      this.pending = [];
      generated.pop();
    }
    this.generated = generated;
    this.stopReason = reason;
    const text = stop.trim(tokenizer.decode(generated));
    if (this.chat !== null) {
      this.chat.messages.push({ role: 'assistant', content: text });
      this.chat.text += text;
    }
    return text;
  }

  // Sharing and lifetime ------------------------------------------------------

  // Resolves once every command issued on this context's queue has taken effect.
  async synchronize() {
    await take(this.queue.synchronize());
  }

  // A new context (with its own queue) continuing this sequence: full pages
  // are shared, the partial last page is copied. Both then evolve independently.
  async fork({ priority = 0 } = {}) {
    this.checkAlive();
    await this.synchronize();
    const child = new Context(this.model, { priority });
    Object.assign(child, {
      tokens: [...this.tokens], positions: [...this.positions], pending: [...this.pending],
      nextPosition: this.nextPosition, step: this.step,
      chat: this.chat === null ? null : { messages: [...this.chat.messages], text: this.chat.text },
    });
    const full = Math.floor(this.kvLen / this.pageSize);
    child.pages = this.pages.slice(0, full);
    retain(child.pages);
    const used = this.kvLen - full * this.pageSize;
    if (used) {
      const fresh = child.allocate(1)[0];
      check(() => child.queue.copySlots(this.pages[full], 0, fresh, 0, used));
      child.pages.push(fresh);
    }
    return child;
  }

  // Frees this context's pages (those no other context holds) and its queue.
  release() {
    if (this.released) return;
    this.released = true;
    const pages = this.pages;
    this.pages = [];
    this.releasePages(pages);
    drop(this.queue);
  }
}
