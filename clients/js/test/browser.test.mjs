// dist/ in a real browser: headless Chromium loads a page that imports ./dist/index.js as an ES
// module and calls the example backend over the browser's own WebSocket and fetch (CORS).
// Skipped when no Chromium is installed ($CHROMIUM, chromium, chromium-browser, google-chrome).

import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, normalize } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { DuplexBackend } from "../dist/index.js";
import { PUBLISH_TOKEN, WebSocket, startGateway, within } from "./helpers.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");

function findChromium() {
  for (const name of [process.env.CHROMIUM, "chromium", "chromium-browser", "google-chrome"]) {
    if (!name) continue;
    try {
      execFileSync("sh", ["-c", `command -v "${name}"`], { stdio: "pipe" });
      return name;
    } catch {
      // not this one
    }
  }
  return undefined;
}

const PAGE = `<!doctype html><html><body><script type="module">
import { DuplexClient, DuplexError, httpCall, httpStream } from "./dist/index.js";
const gw = new URLSearchParams(location.search).get("gw");
const out = {};
try {
  const client = await DuplexClient.connect(gw.replace(/^http/, "ws") + "/p", { secret: "S" });
  client.handle("greet", (call) => "hi " + call.payload);
  out.echo = await client.call("echo", { hello: "browser" });
  out.count = [];
  for await (const n of client.stream("count", 3)) out.count.push(n);
  out.add = await client.callWithInput("add", [1, 2, 3]);
  out.back = await client.call("askClient", "page");
  try { await client.call("nope"); } catch (e) { out.error = [e instanceof DuplexError, e.code]; }
  out.http = await httpCall(gw, "/p", "echo", { via: "fetch" }, { secret: "S" });
  out.httpStream = [];
  for await (const x of httpStream(gw, "/p", "count", 4, { secret: "S" })) out.httpStream.push(x);
  await client.close();
  out.state = client.state;
} catch (e) { out.failed = String(e && e.stack || e); }
await fetch("/result", { method: "POST", body: JSON.stringify(out) });
</script></body></html>`;

test("dist/index.js works in a browser as an ES module", async (t) => {
  const chromium = findChromium();
  // A test that needs Chromium fails without it (scripts/setup.sh installs it).
  assert.ok(chromium, "Chromium is not installed: run scripts/setup.sh (Debian package chromium)");
  let resolveResult;
  const result = new Promise((r) => (resolveResult = r));
  const server = createServer((req, res) => {
    const url = new URL(req.url, "http://localhost");
    if (req.method === "POST" && url.pathname === "/result") {
      let body = "";
      req.on("data", (d) => (body += d));
      req.on("end", () => {
        res.end("ok");
        resolveResult(JSON.parse(body));
      });
      return;
    }
    if (url.pathname === "/page.html") {
      res.setHeader("content-type", "text/html");
      res.end(PAGE);
      return;
    }
    const file = normalize(join(root, url.pathname));
    if (!file.startsWith(join(root, "dist"))) {
      res.statusCode = 404;
      res.end();
      return;
    }
    try {
      const body = readFileSync(file);
      res.setHeader("content-type", "text/javascript");
      res.end(body);
    } catch {
      res.statusCode = 404;
      res.end();
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const origin = `http://127.0.0.1:${server.address().port}`;
  const gw = await startGateway({ extra: `limits:\n  backend_grace: 2s\ncors:\n  allowed_origins: ["${origin}"]` });
  const profile = mkdtempSync(join(tmpdir(), "duplex-js-chromium-"));
  let backend;
  let browser;
  try {
    backend = await DuplexBackend.publish(gw.wsUrl, "/p", {
      token: PUBLISH_TOKEN,
      secret: "S",
      WebSocket,
      handlers: {
        echo: (call) => call.payload,
        count: async (call) => {
          for (let i = 1; i < call.payload; i++) await call.send(i);
          return call.payload;
        },
        add: async (call) => {
          let sum = 0;
          for await (const x of call.payloads()) sum += x;
          return sum;
        },
        askClient: (call) => backend.callClient(call.route, "greet", call.payload),
      },
    });
    browser = spawn(
      chromium,
      [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        `--user-data-dir=${profile}`,
        "--remote-debugging-port=0",
        `${origin}/page.html?gw=${encodeURIComponent(gw.httpUrl)}`,
      ],
      // Its own process group: the browser's helper processes are ended with it.
      { stdio: "ignore", detached: true },
    );
    const out = await within(result, 30_000, "the page's result");
    assert.equal(out.failed, undefined, out.failed);
    assert.deepEqual(out, {
      echo: { hello: "browser" },
      count: [1, 2, 3],
      add: 6,
      back: "hi page",
      error: [true, -32601],
      http: { via: "fetch" },
      httpStream: [1, 2, 3, 4],
      state: "closed",
    });
  } finally {
    if (browser?.pid) {
      const exited = new Promise((r) => (browser.exitCode !== null || browser.signalCode !== null ? r() : browser.once("exit", r)));
      try {
        process.kill(-browser.pid, "SIGKILL");
      } catch {
        browser.kill("SIGKILL");
      }
      await within(exited, 5000, "the browser's exit").catch(() => {});
    }
    await backend?.close();
    await gw.stop();
    server.closeAllConnections?.();
    await new Promise((r) => server.close(r));
    // Helper processes may still be writing the profile for a moment.
    try {
      rmSync(profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 });
    } catch {
      // a temporary directory left behind is no failure
    }
  }
});
