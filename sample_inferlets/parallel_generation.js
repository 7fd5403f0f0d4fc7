// Parallel generation in JavaScript: the counterpart of parallel_generation.py.
//
// The prompt is prefilled once; each fork shares its KV pages (the partial
// last page is copied), and Promise.all runs the forks together so the
// server batches their decode steps into shared forward passes.
import { Context, Sampler, Stop, declare, getModel } from 'inferlet';

declare({
  name: 'parallel-generation-js',
  version: '0.1.0',
  description: 'Generates several continuations of a prompt that share its KV cache.',
  arguments: [
    { name: 'prompt', type: 'string', default: 'Once upon a time', help: 'Shared prefix.' },
    { name: 'n', type: 'int', default: 4, help: 'Number of continuations.' },
    { name: 'max-tokens', type: 'int', default: 32, help: 'Most tokens per continuation.' },
    { name: 'temperature', type: 'float', default: 0.8, help: 'Sampling temperature (0 = greedy).' },
    { name: 'seed', type: 'int', default: 0, help: 'Base seed; continuation i uses seed + i.' },
  ],
});

export async function main(args) {
  const ctx = new Context(getModel());
  ctx.fill(args.prompt);
  await ctx.flush(); // prefill the shared prefix once

  const forks = [];
  for (let i = 0; i < args.n; i++) forks.push(await ctx.fork());

  const texts = await Promise.all(forks.map(async (fork, i) => {
    const sampler = args.temperature ? Sampler.random(args.temperature, { seed: args.seed + i }) : Sampler.greedy();
    const text = await fork.generate(sampler, new Stop({ maxTokens: args.maxTokens }));
    fork.release();
    return text;
  }));
  ctx.release();
  return texts.map((text, i) => `[${i}] ${text}`).join('\n');
}
