// Test helpers: run the real duplex-gateway binary on free loopback ports with a config file in
// a temporary directory. The binary is /work/main/target/debug/duplex-gateway (the repository's
// target/debug, found from this file), or $DUPLEX_GATEWAY_BIN. A missing binary FAILS the tests.

import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

export { WebSocket };

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, "..", "..", "..");
export const PUBLISH_TOKEN = "main-token-0123456789";

export function gatewayBinary() {
  const bin = process.env.DUPLEX_GATEWAY_BIN || join(repoRoot, "target", "debug", "duplex-gateway");
  if (!existsSync(bin)) {
    throw new Error(
      `the gateway binary is missing: ${bin} (build it with cargo build, or set DUPLEX_GATEWAY_BIN)`,
    );
  }
  return bin;
}

/** A free loopback port (the OS picks one; a tiny race before the gateway binds it is accepted). */
export function freePort() {
  return new Promise((resolveP, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolveP(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Waits until `predicate()` is true (polling), or throws after `timeoutMs`. */
export async function waitFor(predicate, timeoutMs = 5000, what = "condition") {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await predicate()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** The YAML config: one listener, metrics, one token for every path, and `extra` lines. */
export function configYaml(port, metricsPort, extra = "") {
  return [
    "listen:",
    `  - address: 127.0.0.1:${port}`,
    "metrics:",
    `  address: 127.0.0.1:${metricsPort}`,
    "tokens:",
    "  - name: main",
    `    token: ${PUBLISH_TOKEN}`,
    '    endpoints: ["/*"]',
    extra,
    "",
  ].join("\n");
}

/**
 * Starts a gateway. `limits` and `endpoints` are YAML fragments (without their top-level key's
 * indentation problems: pass whole blocks). Returns an object to stop, restart and reload it.
 */
export async function startGateway({ extra = "limits:\n  backend_grace: 2s" } = {}) {
  const bin = gatewayBinary();
  const dir = mkdtempSync(join(tmpdir(), "duplex-js-test-"));
  const port = await freePort();
  const metricsPort = await freePort();
  const configFile = join(dir, "gateway.yaml");
  const gw = {
    port,
    metricsPort,
    dir,
    configFile,
    wsUrl: `ws://127.0.0.1:${port}`,
    httpUrl: `http://127.0.0.1:${port}`,
    proc: null,
    log: "",
    write(extraYaml) {
      writeFileSync(configFile, configYaml(port, metricsPort, extraYaml));
    },
    async start() {
      const proc = spawn(bin, ["--config", configFile], {
        env: { ...process.env, RUST_LOG: "warn" },
        stdio: ["ignore", "pipe", "pipe"],
      });
      gw.proc = proc;
      proc.stdout.on("data", (d) => (gw.log += d));
      proc.stderr.on("data", (d) => (gw.log += d));
      let exited = false;
      proc.on("exit", () => (exited = true));
      const deadline = Date.now() + 20_000;
      for (;;) {
        if (exited) throw new Error(`the gateway exited at start:\n${gw.log}`);
        try {
          // Any HTTP answer means the listener serves (404: no such endpoint).
          const r = await fetch(`${gw.httpUrl}/__probe__/x`, {
            method: "POST",
            body: "null",
            signal: AbortSignal.timeout(1000),
          });
          await r.text();
          if (r.status === 404) break;
        } catch {
          // not up yet
        }
        if (Date.now() > deadline) throw new Error(`the gateway did not come up in 20 s:\n${gw.log}`);
        await sleep(25);
      }
    },
    /** Kills the process at once (SIGKILL: connections drop without a close frame). */
    async kill(signal = "SIGKILL") {
      const proc = gw.proc;
      if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = new Promise((r) => proc.once("exit", r));
      proc.kill(signal);
      let timer;
      await Promise.race([exited, new Promise((r) => (timer = setTimeout(r, 10_000)))]);
      clearTimeout(timer);
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill("SIGKILL");
        await exited;
      }
    },
    async restart() {
      await gw.kill();
      await gw.start();
    },
    /** Rewrites the config and sends SIGHUP. */
    reload(extraYaml) {
      gw.write(extraYaml);
      gw.proc.kill("SIGHUP");
    },
    async stop() {
      await gw.kill();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  gw.write(extra);
  await gw.start();
  return gw;
}

/** Collects the status events of a peer. */
export function statusLog(peer) {
  const events = [];
  peer.on("status", (e) => events.push({ ...e, at: Date.now() }));
  return events;
}

/** An HS256 JWT signed with `secret`. */
export async function hs256(claims, secret) {
  const { createHmac } = await import("node:crypto");
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  const sig = createHmac("sha256", secret).update(body).digest("base64url");
  return `${body}.${sig}`;
}

/** Rejects if `promise` does not settle within `ms`. */
export function within(promise, ms, what = "operation") {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} took more than ${ms} ms`)), ms);
    }),
  ]);
}
