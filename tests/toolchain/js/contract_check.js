// Test inferlet for the JavaScript SDK's drift tests: reports, from inside a
// real guest, which contract bindings the SDK's table names, which of them
// are not functions in the generated bindings, how a refused call surfaces,
// and the per-step seeds of a seeded sampler.
import { InferletError, Sampler, declare, raw, store } from 'inferlet';

declare({
  name: 'contract-check',
  description: 'Checks the JavaScript SDK against the contract it was built with.',
  arguments: [{ name: 'seed', type: 'int', default: 7, help: 'Seed whose per-step seeds to report.' }],
});

export async function main(args) {
  const names = raw.BINDINGS.map(([iface, resource, fn]) => [iface, resource, fn]);
  const missing = raw.BINDINGS.filter(([, , , binding]) => typeof binding !== 'function')
    .map(([iface, resource, fn]) => `${iface}/${resource ?? '-'}/${fn}`);
  let refused = null;
  try {
    store.set('k'.repeat(5000), 'v');
  } catch (error) {
    refused = error instanceof InferletError ? error.code : `not an InferletError: ${error}`;
  }
  const sampler = Sampler.random(1, { seed: args.seed });
  const seeds = [0, 1, 2, 1000].map((step) => sampler.stepSeed(step).toString());
  return JSON.stringify({ names, missing, refused, seeds });
}
