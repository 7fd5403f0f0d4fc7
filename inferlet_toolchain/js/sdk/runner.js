// The component's `run` export around the inferlet's module (pie-build
// generates `export const run = makeRun(app)`): parses the arguments the host
// gives against the declaration, awaits `main(args)`, and returns its string;
// an exception becomes the run's error string, with its stack.
import { arguments as hostArguments } from 'pie:inferlet/runtime@0.2.0';
import { declaration, parseArguments } from './args.js';

function describe(error) {
  if (error instanceof Error) return error.stack ? `${error.name}: ${error.message}\n${error.stack}` : String(error);
  return typeof error === 'string' ? error : JSON.stringify(error);
}

async function runMain(app) {
  if (typeof app.main !== 'function') throw new Error('the inferlet does not export a main(args) function');
  const args = parseArguments(declaration()?.arguments ?? [], hostArguments());
  const result = await app.main(args);
  if (result === undefined || result === null) return '';
  if (typeof result !== 'string') throw new TypeError(`main() must return a string, got ${typeof result}`);
  return result;
}

export function makeRun(app) {
  return {
    run() {
      // A rejection with a string is the `err` of run's result<string, string>.
      return runMain(app).catch((error) => Promise.reject(describe(error).trimEnd()));
    },
  };
}
