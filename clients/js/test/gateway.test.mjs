// Against the real gateway: calls, reply streams, streamed input, backend-to-client calls,
// error replies, notifications, HTTP calls and streams, signed tokens ($refresh), $drain.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  ConnectionError,
  DuplexBackend,
  DuplexClient,
  DuplexError,
  ErrorCode,
  httpCall,
  httpNotify,
  httpStream,
} from "../dist/index.js";
import { PUBLISH_TOKEN, WebSocket, hs256, sleep, startGateway, waitFor, within } from "./helpers.mjs";

const JWT_SECRET = "0123456789abcdef0123456789abcdef-jwt-secret";

const CONFIG = `limits:
  backend_grace: 2s
endpoints:
  - path: /jwt
    auth:
      secret: false
      jwt:
        hs256_secret: "${JWT_SECRET}"`;

let gw;
let backend;
let client;
const notes = [];
const fast = { initialMs: 50, maxMs: 500 };

function handlers() {
  return {
    echo: (call) => call.payload,
    ext: (call) => call.ext ?? null,
    count: async (call) => {
      for (let i = 1; i < call.payload; i++) await call.send(i);
      return call.payload;
    },
    countThenFail: async (call) => {
      await call.send(1);
      await call.send(2);
      throw new DuplexError(-32099, "broke midway", { at: 3 });
    },
    add: async (call) => {
      let sum = 0;
      for await (const x of call.payloads()) sum += x ?? 0;
      return sum;
    },
    // Streamed input and a reply stream: one running sum per input frame.
    running: async (call) => {
      let sum = 0;
      const sums = [];
      for await (const x of call.payloads()) {
        sum += x;
        sums.push(sum);
        if (call.streamed) await call.send(sum);
      }
      return { final: sum, frames: sums.length };
    },
    invalid: () => {
      throw new DuplexError(ErrorCode.InvalidParams, "no good", { field: "x" });
    },
    crash: () => {
      throw new Error("boom");
    },
    whoami: (call) => call.auth ?? null,
    note: (call) => {
      notes.push(call.payload);
    },
    notes: () => notes,
    // Calls the caller back (backend-to-client), and answers with what it said.
    askClient: async (call) => backend.callClient(call.route, call.payload.method, call.payload.payload),
    askClientStream: async (call) => {
      const all = [];
      for await (const x of backend.streamClient(call.route, "countdown", call.payload)) all.push(x);
      return all;
    },
    slow: async (call) => {
      await sleep(call.payload);
      return "slept";
    },
  };
}

before(async () => {
  gw = await startGateway({ extra: CONFIG });
  backend = await DuplexBackend.publish(gw.wsUrl, "/p", {
    token: PUBLISH_TOKEN,
    secret: "s",
    WebSocket,
    handlers: handlers(),
    reconnect: fast,
  });
  client = await DuplexClient.connect(`${gw.wsUrl}/p`, { secret: "s", WebSocket, reconnect: fast });
});

after(async () => {
  await client?.close();
  await backend?.close();
  await gw?.stop();
});

describe("calls over WebSocket", () => {
  test("echo: payloads come back as sent", async () => {
    for (const payload of [{ hello: "js" }, null, 0, "text", [1, [2, { a: true }]], { unicode: "é€😀" }]) {
      assert.deepEqual(await client.call("echo", payload), payload);
    }
    assert.equal(await client.call("echo"), null);
  });

  test("many calls at once are told apart by id", async () => {
    const results = await Promise.all(Array.from({ length: 200 }, (_, i) => client.call("echo", i)));
    assert.deepEqual(
      results,
      Array.from({ length: 200 }, (_, i) => i),
    );
  });

  test("ext goes to the backend with the route key", async () => {
    const ext = await client.call("ext", null, { ext: { trace: "abc" } });
    assert.equal(ext.trace, "abc");
    assert.match(ext.route, /^[0-9a-f]{32}$/);
  });

  test("reply streams: every payload, the last one included", async () => {
    const seen = [];
    for await (const n of client.stream("count", 5)) seen.push(n);
    assert.deepEqual(seen, [1, 2, 3, 4, 5]);
    assert.deepEqual(await client.stream("count", 1).toArray(), [1]);
    // call() on a stream resolves with its last payload
    assert.equal(await client.call("count", 4), 4);
  });

  test("a reply stream read partly, then dropped, leaves the client usable", async () => {
    for await (const n of client.stream("count", 50)) {
      if (n === 3) break;
    }
    assert.equal(await client.call("echo", "after"), "after");
    await waitFor(() => client.pendingCalls.outgoing === 0, 2000, "no call left open");
  });

  test("streamed input: arrays, generators, async generators, empty", async () => {
    assert.equal(await client.callWithInput("add", [1, 2, 3]), 6);
    assert.equal(await client.callWithInput("add", [5]), 5);
    assert.equal(await client.callWithInput("add", []), 0);
    function* gen() {
      yield 10;
      yield 20;
    }
    assert.equal(await client.callWithInput("add", gen()), 30);
    async function* slow() {
      for (const x of [1, 1, 1, 1]) {
        await sleep(10);
        yield x;
      }
    }
    assert.equal(await client.callWithInput("add", slow()), 4);
  });

  test("streamed input frame by frame with openInput", async () => {
    const call = client.openInput("add");
    await call.send(1);
    await call.send(2);
    call.end(39);
    assert.equal(await call.result, 42);
  });

  test("streamed input and a reply stream together", async () => {
    const replies = await client.streamWithInput("running", [1, 2, 3, 4]).toArray();
    assert.deepEqual(replies, [1, 3, 6, 10, { final: 10, frames: 4 }]);
  });

  test("two clients streaming input on the same ids do not mix", async () => {
    const other = await DuplexClient.connect(`${gw.wsUrl}/p`, { secret: "s", WebSocket });
    try {
      const slowly = async function* (xs) {
        for (const x of xs) {
          await sleep(5);
          yield x;
        }
      };
      const [a, b] = await Promise.all([
        client.callWithInput("add", slowly([1, 2, 3])),
        other.callWithInput("add", slowly([100, 200, 300])),
      ]);
      assert.equal(a, 6);
      assert.equal(b, 600);
    } finally {
      await other.close();
    }
  });

  test("input that throws fails the call locally", async () => {
    async function* broken() {
      yield 1;
      yield 2;
      throw new Error("input broke");
    }
    await assert.rejects(client.callWithInput("add", broken()), /input broke/);
    assert.equal(await client.call("echo", 1), 1);
  });

  test("error replies: code, message and data", async () => {
    await assert.rejects(client.call("invalid"), (e) => {
      assert.ok(e instanceof DuplexError);
      assert.equal(e.code, -32602);
      assert.equal(e.message, "no good");
      assert.deepEqual(e.data, { field: "x" });
      return true;
    });
    await assert.rejects(client.call("nope"), (e) => e instanceof DuplexError && e.code === ErrorCode.MethodNotFound);
    await assert.rejects(client.call("crash"), (e) => e.code === -32603 && /boom/.test(e.message));
    const seen = [];
    await assert.rejects(
      (async () => {
        for await (const x of client.stream("countThenFail")) seen.push(x);
      })(),
      (e) => e.code === -32099 && e.data.at === 3,
    );
    assert.deepEqual(seen, [1, 2]);
  });

  test("an aborted call rejects with the signal's reason", async () => {
    await assert.rejects(client.call("slow", 500, { signal: AbortSignal.timeout(50) }), (e) => e.name === "TimeoutError");
    assert.equal(await client.call("echo", "still fine"), "still fine");
  });

  test("notifications reach the backend, without a reply", async () => {
    client.notify("note", "first");
    client.notify("note", { second: true });
    await waitFor(() => notes.length >= 2, 2000, "notes");
    assert.deepEqual(await client.call("notes"), ["first", { second: true }]);
  });
});

describe("backend-to-client calls", () => {
  test("the backend calls a handler of the client", async () => {
    client.handle("greet", (call) => ({ hi: call.payload }));
    assert.deepEqual(await client.call("askClient", { method: "greet", payload: "you" }), { hi: "you" });
  });

  test("a client's handler can stream its replies", async () => {
    client.handle("countdown", async (call) => {
      for (let i = call.payload; i > 1; i--) await call.send(i);
      return 1;
    });
    assert.deepEqual(await client.call("askClientStream", 3), [3, 2, 1]);
  });

  test("a client's handler errors reach the backend", async () => {
    client.handle("refuse", () => {
      throw new DuplexError(-32602, "client says no");
    });
    await assert.rejects(client.call("askClient", { method: "refuse" }), (e) => e.code === -32602 && e.message === "client says no");
  });

  test("a method the client does not have: -32601", async () => {
    await assert.rejects(client.call("askClient", { method: "missing" }), (e) => e.code === ErrorCode.MethodNotFound);
  });

  test("a client that is not there: -32001", async () => {
    await assert.rejects(
      backend.callClient("0123456789abcdef0123456789abcdef", "greet", null),
      (e) => e instanceof DuplexError && e.code === ErrorCode.ClientNotConnected,
    );
  });
});

describe("HTTP calls", () => {
  test("a call: the payload as JSON", async () => {
    assert.deepEqual(await httpCall(gw.httpUrl, "/p", "echo", { via: "http" }, { secret: "s" }), { via: "http" });
    assert.equal(await httpCall(gw.httpUrl, "/p", "echo", null, { secret: "s" }), null);
    // ws:// base URLs are taken as http://
    assert.equal(await httpCall(gw.wsUrl, "/p", "echo", 7, { secret: "s" }), 7);
  });

  test("a reply stream: NDJSON, read as it comes", async () => {
    const seen = [];
    for await (const x of httpStream(gw.httpUrl, "/p", "count", 4, { secret: "s" })) seen.push(x);
    assert.deepEqual(seen, [1, 2, 3, 4]);
    assert.equal(await httpCall(gw.httpUrl, "/p", "count", 4, { secret: "s" }), 4);
    // A plain reply through httpStream: one payload
    const one = [];
    for await (const x of httpStream(gw.httpUrl, "/p", "echo", "x", { secret: "s" })) one.push(x);
    assert.deepEqual(one, ["x"]);
  });

  test("a reply stream that fails midway throws its last line's error", async () => {
    const seen = [];
    await assert.rejects(
      (async () => {
        for await (const x of httpStream(gw.httpUrl, "/p", "countThenFail", null, { secret: "s" })) seen.push(x);
      })(),
      (e) => e instanceof DuplexError && e.code === -32099,
    );
    assert.deepEqual(seen, [1, 2]);
  });

  test("errors: status, code and message", async () => {
    await assert.rejects(httpCall(gw.httpUrl, "/p", "echo", 1, { secret: "wrong" }), (e) => e.status === 401 && e.code === 401);
    await assert.rejects(httpCall(gw.httpUrl, "/p", "nope", 1, { secret: "s" }), (e) => e.status === 501 && e.code === -32601);
    await assert.rejects(
      httpCall(gw.httpUrl, "/p", "invalid", 1, { secret: "s" }),
      (e) => e.status === 400 && e.code === -32602 && e.data.field === "x",
    );
    await assert.rejects(httpCall(gw.httpUrl, "/none", "echo", 1, { secret: "s" }), (e) => e.status === 404);
  });

  test("fire-and-forget: 202", async () => {
    const before = notes.length;
    await httpNotify(gw.httpUrl, "/p", "note", "over http", { secret: "s" });
    await waitFor(() => notes.length > before, 2000, "the note");
    assert.equal(notes.at(-1), "over http");
  });
});

describe("signed client tokens", () => {
  let jwtBackend;
  before(async () => {
    jwtBackend = await DuplexBackend.publish(gw.wsUrl, "/jwt", { token: PUBLISH_TOKEN, WebSocket, handlers: handlers() });
  });
  after(async () => {
    await jwtBackend?.close();
  });

  const now = () => Math.floor(Date.now() / 1000);

  test("the backend sees ext.auth; $refresh renews the token", async () => {
    const token = await hs256({ sub: "alice", exp: now() + 600 }, JWT_SECRET);
    const c = await DuplexClient.connect(`${gw.wsUrl}/jwt`, { token, WebSocket });
    try {
      assert.deepEqual(await c.call("whoami"), { sub: "alice" });
      const exp = now() + 1200;
      const renewed = await c.refresh(await hs256({ sub: "alice", exp }, JWT_SECRET));
      assert.equal(renewed.exp, exp);
      await assert.rejects(
        c.refresh(await hs256({ sub: "bob", exp }, JWT_SECRET)),
        (e) => e instanceof DuplexError && e.code === ErrorCode.InvalidParams,
      );
      assert.deepEqual(await c.call("whoami"), { sub: "alice" });
    } finally {
      await c.close();
    }
  });

  test("a token from a function, in headers", async () => {
    const c = await DuplexClient.connect(`${gw.wsUrl}/jwt`, {
      token: () => hs256({ sub: "carol", exp: now() + 600 }, JWT_SECRET),
      credentials: "headers",
      WebSocket,
    });
    try {
      assert.deepEqual(await c.call("whoami"), { sub: "carol" });
    } finally {
      await c.close();
    }
  });

  test("a bad token is refused with 401 and the failed check", async () => {
    const expired = await hs256({ sub: "alice", exp: now() - 3600 }, JWT_SECRET);
    await assert.rejects(
      DuplexClient.connect(`${gw.wsUrl}/jwt`, { token: expired, WebSocket }),
      (e) => e instanceof ConnectionError && e.status === 401 && /exp/.test(e.message),
    );
  });

  test("HTTP calls carry the token", async () => {
    const token = await hs256({ sub: "dave", exp: now() + 600 }, JWT_SECRET);
    assert.deepEqual(await httpCall(gw.httpUrl, "/jwt", "whoami", null, { token }), { sub: "dave" });
  });

  test("$refresh on an endpoint without signed tokens: -32601", async () => {
    await assert.rejects(client.refresh("a.b.c"), (e) => e.code === ErrorCode.MethodNotFound);
  });
});

describe("backends", () => {
  test("the builder publishes, headers carry the credentials", async () => {
    const b = await DuplexBackend.builder(gw.httpUrl, "/built")
      .token(PUBLISH_TOKEN)
      .secret("bs")
      .credentials("headers")
      .webSocket(WebSocket)
      .handle("echo", (call) => ({ built: call.payload }))
      .publish();
    try {
      assert.deepEqual(await httpCall(gw.httpUrl, "/built", "echo", 1, { secret: "bs" }), { built: 1 });
    } finally {
      await b.close();
    }
  });

  test("a wrong publish token is refused with 401", async () => {
    await assert.rejects(
      DuplexBackend.publish(gw.wsUrl, "/x", { token: "not-the-token-000000", secret: "s", WebSocket }),
      (e) => e instanceof ConnectionError && e.status === 401,
    );
  });

  test("drain: running calls finish, then the backend closes for good", async () => {
    const b = await DuplexBackend.publish(gw.wsUrl, "/drain", { token: PUBLISH_TOKEN, secret: "d", WebSocket, handlers: handlers() });
    const c = await DuplexClient.connect(`${gw.wsUrl}/drain`, { secret: "d", WebSocket, reconnect: false });
    try {
      const running = c.call("slow", 300);
      await sleep(50);
      const t0 = Date.now();
      const pending = await within(b.drain(), 5000, "drain");
      assert.equal(pending, 0);
      assert.ok(Date.now() - t0 >= 150, "the drain waited for the running call");
      assert.equal(await running, "slept");
      assert.equal(b.state, "closed");
      await sleep(200);
      assert.equal(b.state, "closed", "no re-publish after a drain");
    } finally {
      await c.close();
      await b.close();
    }
  });

  test("a call on a closed client fails at once", async () => {
    const c = await DuplexClient.connect(`${gw.wsUrl}/p`, { secret: "s", WebSocket });
    await c.close();
    const t0 = Date.now();
    await assert.rejects(c.call("echo", 1), (e) => e instanceof ConnectionError && e.kind === "not_connected");
    assert.throws(() => c.notify("note", 1), ConnectionError);
    await assert.rejects(c.stream("count", 2).next(), ConnectionError);
    await assert.rejects(c.callWithInput("add", [1]), ConnectionError);
    assert.ok(Date.now() - t0 < 250, "failed at once");
  });
});
