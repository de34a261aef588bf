// Reconnect against the real gateway: a gateway restart (client and backend come back, the
// backend publishes again), close code 1008 (no reconnect), and Retry-After on a refused upgrade.

import assert from "node:assert/strict";
import { test } from "node:test";
import { ConnectionError, DuplexBackend, DuplexClient, httpCall } from "../dist/index.js";
import { PUBLISH_TOKEN, WebSocket, sleep, startGateway, statusLog, waitFor, within } from "./helpers.mjs";

const fast = { initialMs: 50, maxMs: 500 };

test("a gateway restart: open calls fail, calls while down fail at once, both sides come back", async () => {
  const gw = await startGateway({ extra: "limits:\n  backend_grace: 2s" });
  let backend;
  let client;
  try {
    backend = await DuplexBackend.publish(gw.wsUrl, "/p", {
      token: PUBLISH_TOKEN,
      secret: "s",
      WebSocket,
      reconnect: fast,
      handlers: {
        echo: (call) => call.payload,
        // Never answers; ends when the connection goes.
        hang: (call) => new Promise((_, reject) => call.signal.addEventListener("abort", () => reject(call.signal.reason))),
      },
    });
    client = await DuplexClient.connect(`${gw.wsUrl}/p`, { secret: "s", WebSocket, reconnect: fast });
    const backendEvents = statusLog(backend);
    const clientEvents = statusLog(client);
    assert.equal(await client.call("echo", "before"), "before");

    // Settled while the gateway is killed: keep the outcome, to check it below.
    const open = client.call("hang", null).then(
      () => assert.fail("the open call resolved"),
      (e) => e,
    );
    const openStream = client.stream("hang", null);
    await sleep(50);
    await gw.kill("SIGKILL");

    const lost = await within(open, 3000, "the open call");
    assert.ok(lost instanceof ConnectionError && lost.kind === "connection_lost", String(lost));
    await assert.rejects(within(openStream.next(), 3000, "the open stream"), (e) => e instanceof ConnectionError);
    await waitFor(() => client.state !== "connected" && backend.state !== "connected", 3000, "both disconnected");

    // While the gateway is down: calls fail at once, nothing is buffered.
    for (let i = 0; i < 3; i++) {
      const t0 = Date.now();
      await assert.rejects(client.call("echo", i), (e) => e instanceof ConnectionError && e.kind === "not_connected");
      await assert.rejects(backend.callClient("00", "x", null), (e) => e instanceof ConnectionError && e.kind === "not_connected");
      assert.ok(Date.now() - t0 < 250, "failed at once");
      await sleep(100);
    }

    await gw.start(); // the same port
    await within(
      waitFor(() => client.connected && backend.connected, 8000, "both reconnected"),
      9000,
      "reconnect",
    );
    assert.equal(await client.call("echo", "after"), "after");
    assert.equal(await httpCall(gw.httpUrl, "/p", "echo", "http after", { secret: "s" }), "http after");

    for (const events of [backendEvents, clientEvents]) {
      const lost = events.filter((e) => e.state === "disconnected");
      assert.ok(lost.length >= 1);
      for (const e of lost) assert.ok(e.delayMs >= 0 && e.delayMs <= 500, `delay ${e.delayMs} within the cap`);
      assert.ok(events.some((e) => e.state === "connected" && e.reconnected));
      assert.ok(!events.some((e) => e.state === "closed"));
    }
  } finally {
    await client?.close();
    await backend?.close();
    await gw.stop();
  }
});

test("close code 1008 (the endpoint's secret changed on reload): no reconnect", async () => {
  const endpoints = (secret) => `limits:\n  backend_grace: 2s\nendpoints:\n  - path: /x\n    secret: ${secret}`;
  const gw = await startGateway({ extra: endpoints("s1") });
  let backend;
  let client;
  try {
    backend = await DuplexBackend.publish(gw.wsUrl, "/x", { token: PUBLISH_TOKEN, WebSocket, handlers: { echo: (c) => c.payload } });
    client = await DuplexClient.connect(`${gw.wsUrl}/x`, { secret: "s1", WebSocket, reconnect: { initialMs: 20, maxMs: 100 } });
    const events = statusLog(client);
    assert.equal(await client.call("echo", 1), 1);

    gw.reload(endpoints("s2"));
    const info = await within(client.closed, 5000, "the close");
    assert.equal(info.code, 1008);
    await sleep(600); // several backoff caps: no attempt may start
    assert.deepEqual(
      events.map((e) => e.state),
      ["closed"],
      "closed for good, no connecting",
    );
    const t0 = Date.now();
    await assert.rejects(client.call("echo", 2), (e) => e instanceof ConnectionError && e.kind === "not_connected");
    assert.ok(Date.now() - t0 < 250, "failed at once");
    // The backend was not touched, and the new secret works.
    assert.equal(backend.state, "connected");
    assert.equal(await httpCall(gw.httpUrl, "/x", "echo", 3, { secret: "s2" }), 3);
  } finally {
    await client?.close();
    await backend?.close();
    await gw.stop();
  }
});

test("a reconnect refused with 429 waits for the gateway's Retry-After", async () => {
  const base = "limits:\n  backend_grace: 2s\n  max_message_bytes: 65536";
  const gw = await startGateway({ extra: base });
  let backend;
  let client;
  try {
    backend = await DuplexBackend.publish(gw.wsUrl, "/r", { token: PUBLISH_TOKEN, secret: "s", WebSocket, handlers: { echo: (c) => c.payload } });
    client = await DuplexClient.connect(`${gw.wsUrl}/r`, { secret: "s", WebSocket, reconnect: { initialMs: 20, maxMs: 50 } });
    const events = statusLog(client);

    // One request per second per address from now on; use up this second's.
    gw.reload(`${base}\n  requests_per_ip_per_second: 1`);
    await waitFor(
      async () => {
        try {
          await httpCall(gw.httpUrl, "/r", "echo", 1, { secret: "s" });
          return false;
        } catch (e) {
          return e.status === 429;
        }
      },
      5000,
      "the rate limit",
    );
    // Keep the bucket empty until the client has been refused (a request refused with 429
    // takes no token, so the bucket refills for the client's next attempt).
    const refusedYet = () => events.some((e) => e.state === "disconnected" && e.retryAfterMs !== undefined);
    const draining = (async () => {
      const deadline = Date.now() + 5000;
      while (!refusedYet() && Date.now() < deadline) {
        await httpCall(gw.httpUrl, "/r", "echo", 1, { secret: "s" }).catch(() => {});
        await sleep(50);
      }
    })();
    // A message over max_message_bytes: the gateway closes the client with 1009, it reconnects
    // at once, and is refused with 429 and Retry-After: 1.
    client.notify("echo", "x".repeat(70_000));
    await within(
      waitFor(() => events.some((e) => e.state === "connected" && e.reconnected), 8000, "the reconnect"),
      9000,
      "reconnect",
    );
    await draining;
    const states = events.map((e) => e.state);
    const refused = events.find((e) => e.state === "disconnected" && e.retryAfterMs !== undefined);
    assert.ok(refused, `a refusal with Retry-After among ${JSON.stringify(events)}`);
    assert.equal(refused.retryAfterMs, 1000);
    assert.equal(refused.error.status, 429);
    assert.ok(refused.delayMs >= 1000 && refused.delayMs <= 1050, `delay ${refused.delayMs}`);
    const next = events[events.indexOf(refused) + 1];
    assert.equal(next.state, "connecting");
    assert.ok(next.at - refused.at >= 990, `the next attempt came ${next.at - refused.at} ms later`);
    assert.equal(events[0].code, 1009, `first the 1009 close: ${states}`);
  } finally {
    await client?.close();
    await backend?.close();
    await gw.stop();
  }
});
