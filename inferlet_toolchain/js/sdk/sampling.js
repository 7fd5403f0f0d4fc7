// Samplers and stop conditions: how each token is drawn (on the device, over
// the whole vocabulary) and when generation ends. Same meaning, and the same
// per-step seeds, as the Python SDK's `inferlet.Sampler` and `inferlet.Stop`.

const U64 = (1n << 64n) - 1n;

export class Sampler {
  // temperature: 0 = greedy; topK: 0 = off; topP: 1 = off; minP: 0 = off;
  // seed: reproducible draws (step i uses a seed derived from (seed, i));
  // allowed: BRLE over the vocabulary of the tokens that may be drawn.
  constructor({ temperature = 0, topK = 0, topP = 1, minP = 0, seed = null, allowed = null } = {}) {
    if (!(Number.isFinite(temperature) && temperature >= 0)) throw new RangeError(`temperature must be >= 0, got ${temperature}`);
    if (!(Number.isInteger(topK) && topK >= 0)) throw new RangeError(`topK must be an integer >= 0, got ${topK}`);
    if (!(topP > 0 && topP <= 1)) throw new RangeError(`topP must be in (0, 1], got ${topP}`);
    if (!(minP >= 0 && minP < 1)) throw new RangeError(`minP must be in [0, 1), got ${minP}`);
    if (seed !== null && !(BigInt(seed) >= 0n && BigInt(seed) <= U64)) throw new RangeError(`seed must be in [0, 2**64), got ${seed}`);
    Object.assign(this, { temperature, topK, topP, minP, seed: seed === null ? null : BigInt(seed), allowed });
    Object.freeze(this);
  }

  static greedy() {
    return new Sampler();
  }

  static random(temperature = 1, { topK = 0, topP = 1, minP = 0, seed = null } = {}) {
    return new Sampler({ temperature, topK, topP, minP, seed });
  }

  // The seed of draw number `step` (splitmix64 of (seed, step)); undefined when unseeded.
  stepSeed(step) {
    if (this.seed === null) return undefined;
    let z = (this.seed + BigInt(step + 1) * 0x9E3779B97F4A7C15n) & U64;
    z = ((z ^ (z >> 30n)) * 0xBF58476D1CE4E5B9n) & U64;
    z = ((z ^ (z >> 27n)) * 0x94D049BB133111EBn) & U64;
    return z ^ (z >> 31n);
  }

  // The contract's `sample-spec` for the draw number `step` at new-token `index`.
  spec(index, step) {
    return {
      index,
      temperature: this.temperature,
      topK: this.topK,
      topP: this.topP,
      minP: this.minP,
      seed: this.stepSeed(step),
      allowed: this.allowed === null ? undefined : Array.from(this.allowed),
    };
  }
}

export class Stop {
  // maxTokens: most tokens to generate; strings: stop when the text contains
  // one (the returned text ends before it); tokens: stop tokens besides the
  // model's end-of-sequence tokens (which count unless eos is false).
  constructor({ maxTokens = 256, strings = [], tokens = [], eos = true } = {}) {
    if (!(Number.isInteger(maxTokens) && maxTokens >= 1)) throw new RangeError(`maxTokens must be >= 1, got ${maxTokens}`);
    if (strings.some((s) => !s)) throw new RangeError('stop strings must not be empty');
    Object.assign(this, { maxTokens, strings: [...strings], tokens: [...tokens], eos });
    Object.freeze(this);
  }

  // Why generation stops after `generated` ('eos', 'stop-string', 'max-tokens'), or null.
  check(generated, stopIds, text) {
    if (generated.length && stopIds.has(generated[generated.length - 1])) return 'eos';
    if (this.strings.length && text !== null && this.find(text) >= 0) return 'stop-string';
    if (generated.length >= this.maxTokens) return 'max-tokens';
    return null;
  }

  find(text) {
    const hits = this.strings.map((s) => text.indexOf(s)).filter((i) => i >= 0);
    return hits.length ? Math.min(...hits) : -1;
  }

  trim(text) {
    const cut = this.find(text);
    return cut < 0 ? text : text.slice(0, cut);
  }
}
