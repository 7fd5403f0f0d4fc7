// Text completion in JavaScript: the counterpart of text_completion.py.
//
// Build and run:
//     pie-build sample_inferlets/text_completion.js
//     pie-run text-completion-js.wasm -- --prompt "The capital of France is"
import { Context, Sampler, Stop, declare, getModel } from 'inferlet';

// What this inferlet is and what it accepts. pie-build reads this call
// without running the file (literal values only) and embeds it in the
// component: pie-run validates launch arguments against it and shows it for --help.
declare({
  name: 'text-completion-js',
  version: '0.1.0',
  description: "Completes a prompt with the server's default model.",
  arguments: [
    { name: 'prompt', type: 'string', default: 'The capital of France is', help: 'Text to complete.' },
    { name: 'max-tokens', type: 'int', default: 64, help: 'Most tokens to generate.' },
    { name: 'temperature', type: 'float', default: 0.0, help: '0 = greedy decoding.' },
    { name: 'top-p', type: 'float', default: 1.0, help: 'Nucleus sampling threshold (1 = off).' },
    { name: 'seed', type: 'int', help: 'Seed for reproducible sampling.' },
    { name: 'chat', type: 'bool', help: "Wrap the prompt in the model's chat template." },
  ],
});

export async function main(args) {
  const ctx = new Context(getModel()); // a sequence with its own KV pages and command queue

  if (args.chat) ctx.fillChat([{ role: 'user', content: args.prompt }]);
  else ctx.fill(args.prompt);

  const sampler = args.temperature === 0
    ? Sampler.greedy()
    : Sampler.random(args.temperature, { topP: args.topP, seed: args.seed });

  // Prefill the prompt in one pass, then decode until an end-of-sequence
  // token or max-tokens. Only the new text is returned.
  const completion = await ctx.generate(sampler, new Stop({ maxTokens: args.maxTokens }));
  ctx.release();
  return completion;
}
