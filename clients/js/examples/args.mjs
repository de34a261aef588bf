// A tiny `--name value` parser for the example scripts.
export function parseArgs(argv, defaults = {}) {
  const out = { ...defaults };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith("--")) throw new Error(`unexpected argument ${arg}`);
    const eq = arg.indexOf("=");
    if (eq > 0) {
      out[arg.slice(2, eq)] = arg.slice(eq + 1);
    } else {
      const value = argv[i + 1];
      if (value === undefined || value.startsWith("--")) throw new Error(`${arg} needs a value`);
      out[arg.slice(2)] = value;
      i++;
    }
  }
  return out;
}

// The platform's WebSocket (browsers, Node 22+), else the `ws` package (a dev dependency of
// this package: present after `npm ci`).
export async function webSocketImpl() {
  if (globalThis.WebSocket) return globalThis.WebSocket;
  const ws = await import("ws");
  return ws.default ?? ws.WebSocket;
}
