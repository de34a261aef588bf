// The example scripts, as the cross-language matrix runs them: examples/backend.mjs publishes,
// examples/client.mjs calls it and prints one JSON line per result.

import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { PUBLISH_TOKEN, startGateway, within } from "./helpers.mjs";

const run = promisify(execFile);
const examples = join(dirname(fileURLToPath(import.meta.url)), "..", "examples");

let gw;
let backend;

before(async () => {
  gw = await startGateway();
  backend = spawn(
    process.execPath,
    [join(examples, "backend.mjs"), "--url", gw.wsUrl, "--path", "/p", "--token", PUBLISH_TOKEN, "--secret", "S"],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  let err = "";
  backend.stderr.on("data", (d) => (err += d));
  await within(
    new Promise((resolve, reject) => {
      let out = "";
      backend.stdout.on("data", (d) => {
        out += d;
        if (out.split("\n").includes("ready")) resolve();
      });
      backend.on("exit", (code) => reject(new Error(`the backend exited (${code}): ${err}`)));
    }),
    10_000,
    "the example backend's ready",
  );
});

after(async () => {
  if (backend && backend.exitCode === null) {
    const exited = new Promise((r) => backend.once("exit", r));
    backend.kill("SIGTERM");
    await within(exited, 5000, "the backend's exit").catch(() => backend.kill("SIGKILL"));
  }
  await gw?.stop();
});

const expected = ['{"echo":{"hello":"js"}}', '{"count":[1,2,3]}', '{"add":6}'];

test("the example client prints echo, count and add", async () => {
  const { stdout } = await run(
    process.execPath,
    [join(examples, "client.mjs"), "--url", gw.wsUrl, "--path", "/p", "--secret", "S"],
    { timeout: 15_000 },
  );
  assert.deepEqual(stdout.trim().split("\n"), expected);
});

test("the example client on the platform's own WebSocket (--experimental-websocket)", async (t) => {
  if (!process.allowedNodeEnvironmentFlags.has("--experimental-websocket") && !globalThis.WebSocket) {
    t.skip("this Node.js has no WebSocket of its own");
    return;
  }
  const flags = globalThis.WebSocket ? [] : ["--experimental-websocket"];
  const { stdout } = await run(
    process.execPath,
    [...flags, join(examples, "client.mjs"), "--url", gw.wsUrl, "--path", "/p", "--secret", "S"],
    { timeout: 15_000 },
  );
  assert.deepEqual(stdout.trim().split("\n"), expected);
});

test("the example backend answers HTTP calls and whoami", async () => {
  const r = await fetch(`${gw.httpUrl}/p/whoami`, { method: "POST", headers: { "x-duplex-secret": "S" }, body: "{}" });
  assert.equal(r.status, 200);
  assert.equal(await r.text(), "null");
  const s = await fetch(`${gw.httpUrl}/p/count`, { method: "POST", headers: { "x-duplex-secret": "S" }, body: "3" });
  assert.equal(await s.text(), "1\n2\n3\n");
});

test("the example client exits non-zero on failure", async () => {
  await assert.rejects(
    run(process.execPath, [join(examples, "client.mjs"), "--url", gw.wsUrl, "--path", "/p", "--secret", "wrong"], {
      timeout: 15_000,
    }),
    (e) => e.code === 1 && /401/.test(e.stderr),
  );
});
