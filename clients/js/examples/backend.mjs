#!/usr/bin/env node
// An example backend: publishes `echo`, `count`, `add` and `whoami` at a path of a gateway,
// prints `ready` once published, and serves until killed. It publishes again when the
// connection drops (backoff with full jitter). SIGINT/SIGTERM drain it first ($drain).
//
//   node examples/backend.mjs --url ws://127.0.0.1:8080 --path /demo --token TOKEN --secret s3cret
//
// - echo:   answers with its payload.
// - count:  payload n: streams 1, 2, ..., n-1 (more: true), then answers n.
// - add:    sums numbers (a number or an array of numbers per frame), streamed input included.
// - whoami: answers ext.auth (who the gateway says calls, on endpoints with signed tokens), or null.

import { DuplexBackend, DuplexError, ErrorCode, backoffDelay } from "../dist/index.js";
import { parseArgs, webSocketImpl } from "./args.mjs";

const args = parseArgs(process.argv.slice(2), {
  url: "ws://127.0.0.1:8080",
  path: "/demo",
  token: process.env.DUPLEX_GATEWAY_TOKEN ?? "",
});

function sum(value) {
  if (value === null) return 0;
  if (typeof value === "number") return value;
  if (Array.isArray(value)) return value.reduce((s, v) => s + sum(v), 0);
  throw new DuplexError(ErrorCode.InvalidParams, "add takes numbers or arrays of numbers");
}

const handlers = {
  echo: (call) => call.payload,
  count: async (call) => {
    const n = call.payload;
    if (!Number.isInteger(n) || n < 1 || n > 1_000_000) {
      throw new DuplexError(ErrorCode.InvalidParams, "count takes an integer from 1 to 1000000");
    }
    for (let i = 1; i < n; i++) await call.send(i);
    return n;
  },
  add: async (call) => {
    let total = 0;
    for await (const frame of call.payloads()) total += sum(frame);
    return total;
  },
  whoami: (call) => call.auth ?? null,
};

const WebSocket = await webSocketImpl();
const options = {
  token: args.token,
  secret: args.secret,
  handlers,
  WebSocket,
  onStatus: (e) => {
    if (e.state === "disconnected") console.error(`connection lost (${e.error?.message}); again in ${e.delayMs} ms`);
    if (e.state === "connected" && e.reconnected) console.error("published again");
  },
};

// The first publish: try again while the gateway is not there yet (no answer, 429, 503);
// give up on any other refusal (a wrong token stays wrong).
let backend;
for (let attempt = 0; ; attempt++) {
  try {
    backend = await DuplexBackend.publish(args.url, args.path, options);
    break;
  } catch (error) {
    const status = error.status;
    if (status !== undefined && status !== 429 && status !== 503) {
      console.error(`cannot publish: ${error.message}`);
      process.exit(1);
    }
    const delay = backoffDelay(attempt) + (error.retryAfterMs ?? 0);
    console.error(`cannot publish yet (${error.message}); again in ${delay} ms`);
    await new Promise((r) => setTimeout(r, delay));
  }
}
console.log("ready");

let stopping = false;
const stop = async () => {
  if (stopping) process.exit(1);
  stopping = true;
  const timer = setTimeout(() => process.exit(0), 3000);
  try {
    const pending = await backend.drain();
    console.error(`drained (${pending} calls still running)`);
  } catch (error) {
    console.error(`drain failed: ${error.message}`);
  }
  clearTimeout(timer);
  process.exit(0);
};
process.on("SIGINT", stop);
process.on("SIGTERM", stop);

const info = await backend.closed;
if (!stopping) {
  console.error(`closed for good (code ${info.code ?? "none"}${info.error ? `: ${info.error.message}` : ""})`);
  process.exit(info.code === 1012 ? 0 : 1);
}
