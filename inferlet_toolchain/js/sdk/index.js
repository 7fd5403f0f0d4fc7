// inferlet: the JavaScript SDK for Pie inferlets.
//
//   import { declare, getModel, Context, Sampler, Stop } from 'inferlet';
//
//   declare({ name: 'hello', arguments: [{ name: 'prompt', type: 'string', default: 'Hi' }] });
//
//   export async function main(args) {
//     const ctx = new Context(getModel());
//     ctx.fill(args.prompt);
//     return await ctx.generate(Sampler.greedy(), new Stop({ maxTokens: 32 }));
//   }
//
// `raw` is the contract itself (every WIT interface); the rest is the
// common path: models, tokenizers, contexts, samplers, stop conditions,
// messaging, the key-value store and child instances.
export { declare, parseArguments } from './args.js';
export { Context } from './context.js';
export { InferletError } from './errors.js';
export { broadcast, instanceId, launch, receive, send, store, subscribe, Subscription, version } from './host.js';
export { wait } from './loop.js';
export { getModel, Model, models, Tokenizer } from './model.js';
export { Sampler, Stop } from './sampling.js';
export * as raw from './raw.js';
