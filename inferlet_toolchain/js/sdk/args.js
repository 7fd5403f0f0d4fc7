// The inferlet's declaration and its parsed arguments.
//
// `declare({...})` is read by pie-build from the source without running it
// (literal values only) and embedded in the component as its manifest, which
// pie-run uses for `--help`, to check arguments and to grant capabilities.
// At run time it records the argument specs so `main(args)` receives them
// parsed: the host hands over the canonical form (`--name=value`, every
// argument with a value, in declaration order).

let declared = null;

// { name, version, description, arguments: [{ name, type, default, help, required }], capabilities }
// with type one of "string", "int", "float", "bool" (or "str", "number", "boolean").
export function declare(declaration) {
  declared = declaration;
}

export function declaration() {
  return declared;
}

const TYPES = { str: 'str', string: 'str', int: 'int', integer: 'int', float: 'float', number: 'float',
  bool: 'bool', boolean: 'bool' };

function camel(name) {
  return name.replace(/-([a-z0-9])/g, (_, c) => c.toUpperCase());
}

function convert(spec, type, text) {
  if (type === 'str') return text;
  if (type === 'bool') {
    const lowered = text.toLowerCase();
    if (['true', '1', 'yes', 'on'].includes(lowered)) return true;
    if (['false', '0', 'no', 'off'].includes(lowered)) return false;
  } else {
    const value = Number(text);
    if (text.trim() !== '' && Number.isFinite(value) && (type === 'float' || Number.isInteger(value))) return value;
  }
  throw new Error(`--${spec.name}: expected ${type === 'bool' ? 'true or false' : `a ${type}`}, got ${JSON.stringify(text)}`);
}

// {camelCaseName: value} for every declared argument (absent ones: their
// default, false for a bool, else null), from an argument list.
export function parseArguments(specs, argv) {
  const byName = new Map(specs.map((spec) => [spec.name, spec]));
  const given = new Map();
  for (let i = 0; i < argv.length; i++) {
    const item = argv[i];
    if (!item.startsWith('--')) throw new Error(`unexpected argument ${JSON.stringify(item)}`);
    const eq = item.indexOf('=');
    const name = item.slice(2, eq < 0 ? undefined : eq);
    const spec = byName.get(name);
    const type = spec && TYPES[spec.type ?? 'str'];
    if (!spec && eq < 0 && name.startsWith('no-') && TYPES[byName.get(name.slice(3))?.type] === 'bool') {
      given.set(name.slice(3), false);
      continue;
    }
    if (!spec) throw new Error(`unknown argument --${name}`);
    if (eq >= 0) given.set(name, convert(spec, type, item.slice(eq + 1)));
    else if (type === 'bool') given.set(name, true);
    else if (i + 1 < argv.length) given.set(name, convert(spec, type, argv[++i]));
    else throw new Error(`--${name} needs a value`);
  }
  const args = {};
  for (const spec of specs) {
    let value = given.has(spec.name) ? given.get(spec.name) : spec.default;
    if (value === undefined) {
      if (spec.required) throw new Error(`missing required argument --${spec.name}`);
      value = TYPES[spec.type ?? 'str'] === 'bool' ? false : null;
    }
    args[camel(spec.name)] = value;
  }
  return args;
}
