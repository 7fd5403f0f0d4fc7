// pie-build's JavaScript steps, run by inferlet_toolchain/js_build.py with the
// toolchain installed from package-lock.json:
//
//   node build.mjs bundle APP.js SDK OUT.js    one ES module: the inferlet, its local
//                                              imports, the SDK (`inferlet`) and the
//                                              `run` export calling its `main`
//   node build.mjs componentize BUNDLE.js WIT OUT.wasm
//                                              a component of the `inferlet` world
//
// Errors go to stderr as plain lines (no stack) and exit 2.
import { componentize } from '@bytecodealliance/componentize-js';
import * as esbuild from 'esbuild';
import { writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

async function bundle(app, sdk, out) {
  // The component's `run` export: the SDK's runner around the inferlet's module.
  const entry = [
    `import * as app from ${JSON.stringify(`./${basename(app)}`)};`,
    `import { makeRun } from ${JSON.stringify(join(sdk, 'runner.js'))};`,
    'export const run = makeRun(app);',
  ].join('\n');
  const result = await esbuild.build({
    stdin: { contents: entry, resolveDir: dirname(app), sourcefile: 'pie-entry.js' },
    absWorkingDir: dirname(app),
    bundle: true,
    format: 'esm',
    platform: 'neutral',
    target: 'es2022',
    // The contract's interfaces are the component's imports, not modules to bundle.
    external: ['pie:*'],
    alias: { inferlet: join(sdk, 'index.js') },
    write: false,
    logLevel: 'silent',
  }).catch((error) => error);
  if (result.errors && result.errors.length) {
    const lines = await esbuild.formatMessages(result.errors, { kind: 'error', color: false });
    throw new Error(lines.join('').trim());
  }
  await writeFile(out, result.outputFiles[0].contents);
}

async function compile(source, wit, out) {
  const { component } = await componentize({
    sourcePath: source,
    witPath: wit,
    worldName: 'inferlet',
    // The host provides WASI 0.2 for CLI programs, not wasi:http.
    disableFeatures: ['http', 'fetch-event'],
  });
  await writeFile(out, component);
}

const [command, ...args] = process.argv.slice(2);
const steps = { bundle, componentize: compile };
try {
  if (!(command in steps) || args.length !== 3) {
    throw new Error('usage: node build.mjs bundle APP SDK OUT | componentize BUNDLE WIT OUT');
  }
  await steps[command](...args);
} catch (error) {
  process.stderr.write(`${error.message || error}\n`);
  process.exit(2);
}
