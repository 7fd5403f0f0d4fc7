// Reads a JavaScript inferlet's declaration without running it:
//
//   node manifest.mjs APP.js
//
// prints {"declaration": {...}, "line": N} (the object literal given to the
// module-level `declare(...)` call, evaluated statically) or exits 2 with
// `APP.js:LINE: message` on stderr. Like the Python side (source_check.py),
// nothing of the inferlet executes on the host.
import { readFileSync } from 'node:fs';
import { parseSync } from 'oxc-parser';

class DeclarationError extends Error {
  constructor(message, node) {
    super(message);
    this.node = node;
  }
}

// A literal value: strings, numbers (with sign), booleans, null, arrays and
// objects of literals, template strings without substitutions.
function literal(node) {
  switch (node.type) {
    case 'Literal':
      if (node.regex || typeof node.value === 'bigint') break;
      return node.value;
    case 'UnaryExpression':
      if ((node.operator === '-' || node.operator === '+') && node.argument.type === 'Literal'
          && typeof node.argument.value === 'number') {
        return node.operator === '-' ? -node.argument.value : node.argument.value;
      }
      break;
    case 'TemplateLiteral':
      if (node.expressions.length === 0) return node.quasis.map((q) => q.value.cooked).join('');
      break;
    case 'ArrayExpression':
      return node.elements.map((element) => {
        if (element === null || element.type === 'SpreadElement') {
          throw new DeclarationError('declare() takes literal values only (no holes or spreads)', element || node);
        }
        return literal(element);
      });
    case 'ObjectExpression': {
      const out = {};
      for (const property of node.properties) {
        if (property.type !== 'Property' || property.computed || property.kind !== 'init' || property.method) {
          throw new DeclarationError('declare() takes plain `key: value` properties only', property);
        }
        const key = property.key.type === 'Identifier' ? property.key.name : property.key.value;
        out[key] = literal(property.value);
      }
      return out;
    }
    default:
      break;
  }
  throw new DeclarationError('declare() takes literal values only (strings, numbers, booleans, arrays, objects)', node);
}

// Names under which `declare` of the SDK is reachable: `declare` (or its alias)
// imported from 'inferlet', and `X.declare` for `import * as X from 'inferlet'`.
function declareNames(program) {
  const direct = new Set();
  const namespaces = new Set();
  for (const statement of program.body) {
    if (statement.type !== 'ImportDeclaration' || statement.source.value !== 'inferlet') continue;
    for (const spec of statement.specifiers) {
      if (spec.type === 'ImportNamespaceSpecifier') namespaces.add(spec.local.name);
      else if (spec.type === 'ImportDefaultSpecifier') namespaces.add(spec.local.name);
      else if ((spec.imported.name ?? spec.imported.value) === 'declare') direct.add(spec.local.name);
    }
  }
  return { direct, namespaces };
}

function isDeclareCall(expression, names) {
  if (expression?.type !== 'CallExpression') return false;
  const callee = expression.callee;
  if (callee.type === 'Identifier') return names.direct.has(callee.name);
  return callee.type === 'MemberExpression' && !callee.computed && callee.object.type === 'Identifier'
    && names.namespaces.has(callee.object.name) && callee.property.name === 'declare';
}

function exportsMain(program) {
  for (const statement of program.body) {
    if (statement.type !== 'ExportNamedDeclaration') continue;
    const declaration = statement.declaration;
    if (declaration?.type === 'FunctionDeclaration' && declaration.id.name === 'main') return true;
    if (declaration?.type === 'VariableDeclaration'
        && declaration.declarations.some((d) => d.id.type === 'Identifier' && d.id.name === 'main')) return true;
    if (statement.specifiers.some((s) => (s.exported.name ?? s.exported.value) === 'main')) return true;
  }
  return false;
}

function read(path, source) {
  const lineOf = (offset) => source.slice(0, offset).split('\n').length;
  const parsed = parseSync(path, source, { sourceType: 'module' });
  if (parsed.errors.length) {
    const error = parsed.errors[0];
    const offset = error.labels?.[0]?.start ?? 0;
    return { error: error.message, line: lineOf(offset) };
  }
  const program = parsed.program;
  const names = declareNames(program);
  const calls = program.body.filter((s) => s.type === 'ExpressionStatement' && isDeclareCall(s.expression, names));
  if (calls.length === 0) {
    return { error: "no module-level `declare({...})` call (import { declare } from 'inferlet')", line: 1 };
  }
  if (calls.length > 1) return { error: 'declare() is called more than once', line: lineOf(calls[1].start) };
  const call = calls[0].expression;
  if (call.arguments.length !== 1 || call.arguments[0].type !== 'ObjectExpression') {
    return { error: 'declare() takes one object literal: declare({ name: ..., arguments: [...] })',
             line: lineOf(call.start) };
  }
  if (!exportsMain(program)) {
    return { error: 'the inferlet does not export `main` (export async function main(args) { ... })', line: 1 };
  }
  try {
    return { declaration: literal(call.arguments[0]), line: lineOf(call.start) };
  } catch (error) {
    if (!(error instanceof DeclarationError)) throw error;
    return { error: error.message, line: lineOf(error.node.start) };
  }
}

const path = process.argv[2];
const result = read(path, readFileSync(path, 'utf8'));
if (result.error) {
  process.stderr.write(`${path}:${result.line}: ${result.error}\n`);
  process.exit(2);
}
process.stdout.write(JSON.stringify(result));
