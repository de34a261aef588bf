// Unit tests: the reconnect policy (full-jitter backoff, Retry-After, close code 1008), against a
// small in-process WebSocket server (no gateway needed for these).

import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";
import { WebSocketServer } from "ws";
import {
  ConnectionError,
  DuplexClient,
  DuplexError,
  backoffCap,
  backoffDelay,
  callUrl,
  parseRetryAfter,
  reconnectDelay,
  redact,
} from "../dist/index.js";
import { WebSocket, sleep, statusLog, waitFor, within } from "./helpers.mjs";

describe("full-jitter backoff", () => {
  test("the cap doubles from 0.5 s and stops at 30 s", () => {
    assert.equal(backoffCap(0), 500);
    assert.equal(backoffCap(1), 1000);
    assert.equal(backoffCap(2), 2000);
    assert.equal(backoffCap(5), 16000);
    assert.equal(backoffCap(6), 30000);
    assert.equal(backoffCap(7), 30000);
    assert.equal(backoffCap(1000), 30000);
    assert.equal(backoffCap(3, 50, 500), 400);
    assert.equal(backoffCap(4, 50, 500), 500);
  });

  test("delays spread over [0, cap]: full jitter, not equal jitter", () => {
    for (const attempt of [0, 3, 6, 20]) {
      const cap = backoffCap(attempt);
      const samples = Array.from({ length: 20000 }, () => backoffDelay(attempt));
      const min = Math.min(...samples);
      const max = Math.max(...samples);
      const mean = samples.reduce((s, v) => s + v, 0) / samples.length;
      assert.ok(min >= 0 && max <= cap, `attempt ${attempt}: [${min}, ${max}] within [0, ${cap}]`);
      assert.ok(min < cap * 0.02, `attempt ${attempt}: some delays near 0 (min ${min})`);
      assert.ok(max > cap * 0.98, `attempt ${attempt}: some delays near the cap (max ${max})`);
      assert.ok(Math.abs(mean - cap / 2) < cap * 0.03, `attempt ${attempt}: mean ${mean} near ${cap / 2}`);
      // Every tenth of the range gets its share: a uniform spread.
      const buckets = new Array(10).fill(0);
      for (const s of samples) buckets[Math.min(9, Math.floor((s / cap) * 10))]++;
      for (const b of buckets) assert.ok(b > 1600 && b < 2400, `bucket counts ${buckets}`);
    }
  });

  test("never more than 30 s, whatever the attempt", () => {
    for (let attempt = 0; attempt < 200; attempt++) {
      assert.ok(backoffDelay(attempt, { random: () => 0.999999 }) <= 30000);
    }
    assert.equal(backoffDelay(50, { random: () => 1 }), 30000);
    assert.equal(backoffDelay(50, { random: () => 0 }), 0);
  });

  test("initialMs, maxMs and random can be overridden", () => {
    assert.equal(backoffDelay(0, { initialMs: 50, maxMs: 500, random: () => 0.5 }), 25);
    assert.equal(backoffDelay(10, { initialMs: 50, maxMs: 500, random: () => 1 }), 500);
  });

  test("Retry-After: waits at least that long, jitter on top", () => {
    for (let i = 0; i < 1000; i++) {
      const d = reconnectDelay(0, 2000);
      assert.ok(d >= 2000 && d <= 2500, `delay ${d}`);
    }
    assert.equal(reconnectDelay(0, undefined, { random: () => 1 }), 500);
    assert.equal(reconnectDelay(0, 0, { random: () => 0 }), 0);
  });

  test("Retry-After values: seconds and HTTP dates", () => {
    assert.equal(parseRetryAfter("1"), 1000);
    assert.equal(parseRetryAfter(" 120 "), 120000);
    assert.equal(parseRetryAfter(["3", "9"]), 3000);
    assert.equal(parseRetryAfter(null), undefined);
    assert.equal(parseRetryAfter(""), undefined);
    assert.equal(parseRetryAfter("soon"), undefined);
    const now = Date.parse("2030-01-01T00:00:00Z");
    assert.equal(parseRetryAfter("Tue, 01 Jan 2030 00:00:05 GMT", now), 5000);
    assert.equal(parseRetryAfter("Mon, 31 Dec 2029 00:00:00 GMT", now), 0);
  });
});

describe("helpers", () => {
  test("callUrl and redact", () => {
    assert.equal(callUrl("http://h:1", "/demo", "echo"), "http://h:1/demo/echo");
    assert.equal(callUrl("ws://h:1/", "demo/", "echo"), "http://h:1/demo/echo");
    assert.equal(callUrl("wss://h", "/", "echo"), "https://h/echo");
    assert.equal(callUrl("http://h", "/team/a", "search"), "http://h/team/a/search");
    assert.equal(redact("ws://h/p?token=abc&secret=s&x=1"), "ws://h/p?token=***&secret=***&x=1");
  });

  test("DuplexError keeps code, message, data and retry_after_ms", () => {
    const e = DuplexError.from({ code: -32004, message: "rate limited", data: { retry_after_ms: 250 } });
    assert.equal(e.code, -32004);
    assert.equal(e.message, "rate limited");
    assert.equal(e.retryAfterMs, 250);
    assert.deepEqual(e.toErrorObject(), { code: -32004, message: "rate limited", data: { retry_after_ms: 250 } });
  });
});

/**
 * A tiny gateway stand-in: answers upgrades as `plan` says, one entry per upgrade request:
 * "accept" (the handshake is answered +OK), or [status, headers] (refused).
 */
function fakeGateway(plan) {
  const wss = new WebSocketServer({ noServer: true });
  const server = createServer();
  const state = { upgrades: [], sockets: [], plan: [...plan] };
  server.on("upgrade", (req, socket, head) => {
    state.upgrades.push(Date.now());
    const step = state.plan.length > 0 ? state.plan.shift() : "accept";
    if (step === "accept") {
      wss.handleUpgrade(req, socket, head, (ws) => {
        state.sockets.push(ws);
        ws.on("message", (data) => {
          const text = String(data);
          if (text === "SIMPLEX/1.0;json") ws.send("+OK");
          else {
            const msg = JSON.parse(text);
            if (msg.type === "req" && msg.method === "echo" && msg.id) {
              ws.send(JSON.stringify({ type: "rep", id: msg.id, payload: msg.payload }));
            }
          }
        });
      });
    } else {
      const [status, headers] = step;
      const body = JSON.stringify({ error: { code: status, message: "too many requests from this address" } });
      socket.end(
        `HTTP/1.1 ${status} Refused\r\n` +
          Object.entries(headers)
            .map(([k, v]) => `${k}: ${v}\r\n`)
            .join("") +
          `content-type: application/json\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n${body}`,
      );
    }
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      state.url = `ws://127.0.0.1:${server.address().port}/p`;
      state.close = () =>
        new Promise((r) => {
          for (const ws of state.sockets) ws.terminate();
          wss.close();
          server.close(() => r());
          server.closeAllConnections?.();
        });
      resolve(state);
    });
  });
}

describe("reconnect policy (in-process server)", () => {
  let fake;
  before(async () => {
    fake = await fakeGateway([]);
  });
  after(async () => {
    await fake.close();
  });

  test("a refused upgrade's status and Retry-After are seen", async () => {
    const refusing = await fakeGateway([[429, { "retry-after": "7" }]]);
    try {
      await assert.rejects(
        DuplexClient.connect(refusing.url, { secret: "s", WebSocket, reconnect: false }),
        (e) =>
          e instanceof ConnectionError &&
          e.kind === "refused" &&
          e.status === 429 &&
          e.retryAfterMs === 7000 &&
          /too many requests/.test(e.message),
      );
    } finally {
      await refusing.close();
    }
  });

  test("Retry-After is honoured between reconnect attempts", async () => {
    // accept, then refuse with 429 Retry-After: 1, then accept.
    const server = await fakeGateway(["accept", [429, { "retry-after": "1" }], "accept"]);
    const client = await DuplexClient.connect(server.url, {
      secret: "s",
      WebSocket,
      reconnect: { initialMs: 20, maxMs: 50 },
    });
    const events = statusLog(client);
    try {
      server.sockets[0].close(1011, "going");
      await within(
        waitFor(() => server.upgrades.length >= 3 && client.connected, 5000, "the third upgrade"),
        6000,
        "reconnect",
      );
      const [, refused, accepted] = server.upgrades;
      assert.ok(accepted - refused >= 1000, `waited ${accepted - refused} ms after a Retry-After of 1 s`);
      assert.ok(accepted - refused < 1000 + 50 + 500, `but not much longer (${accepted - refused} ms)`);
      const honoured = events.find((e) => e.state === "disconnected" && e.retryAfterMs === 1000);
      assert.ok(honoured, JSON.stringify(events));
      assert.ok(honoured.delayMs >= 1000 && honoured.delayMs <= 1050);
      assert.ok(events.some((e) => e.state === "connected" && e.reconnected));
      assert.deepEqual(await client.call("echo", 42), 42);
    } finally {
      await client.close();
      await server.close();
    }
  });

  test("close code 1008: no reconnect, calls fail at once", async () => {
    const client = await DuplexClient.connect(fake.url, {
      secret: "s",
      WebSocket,
      reconnect: { initialMs: 10, maxMs: 20 },
    });
    const events = statusLog(client);
    const upgrades = fake.upgrades.length;
    fake.sockets.at(-1).close(1008, "policy");
    const info = await within(client.closed, 2000, "close");
    assert.equal(info.code, 1008);
    await sleep(300);
    assert.equal(fake.upgrades.length, upgrades, "no new upgrade after 1008");
    assert.deepEqual(
      events.map((e) => e.state),
      ["closed"],
    );
    const t0 = Date.now();
    await assert.rejects(client.call("echo", 1), (e) => e instanceof ConnectionError && e.kind === "not_connected");
    assert.ok(Date.now() - t0 < 250, "failed at once");
  });

  test("other close codes: reconnect with the backoff of the options", async () => {
    const client = await DuplexClient.connect(fake.url, {
      secret: "s",
      WebSocket,
      reconnect: { initialMs: 10, maxMs: 20 },
    });
    const events = statusLog(client);
    try {
      for (const code of [1001, 1011, 1013]) {
        const before = fake.upgrades.length;
        fake.sockets.at(-1).close(code);
        await waitFor(() => fake.upgrades.length > before && client.connected, 3000, `reconnect after ${code}`);
      }
      const delays = events.filter((e) => e.state === "disconnected").map((e) => e.delayMs);
      assert.equal(delays.length, 3);
      for (const d of delays) assert.ok(d >= 0 && d <= 10, `first attempt's delay ${d} within [0, 10]`);
      assert.equal(await client.call("echo", "back"), "back");
    } finally {
      await client.close();
    }
  });

  test("reconnect: false closes the peer when the connection drops", async () => {
    const client = await DuplexClient.connect(fake.url, { secret: "s", WebSocket, reconnect: false });
    fake.sockets.at(-1).close(1001);
    const info = await within(client.closed, 2000, "close");
    assert.equal(info.code, 1001);
    assert.equal(client.state, "closed");
  });

  test("without a WebSocket implementation the error says what to do", async () => {
    if (globalThis.WebSocket) return; // Node 22+: there is one
    await assert.rejects(DuplexClient.connect(fake.url), /pass one/);
  });
});
