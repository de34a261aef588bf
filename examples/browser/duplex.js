// A small Duplex client for browsers, written for duplex-gateway: the handshake, calls with ids,
// reply streams, errors, calls from the backend (answered "method not found"), and reconnection.
// Plain JavaScript, no dependencies, no build step.
//
//   const client = await DuplexClient.connect("ws://127.0.0.1:8080/demo", { secret: "s3cret" });
//   await client.call("echo", { hi: 1 });               // the reply's payload
//   for await (const n of client.stream("count", 3)) {} // each frame of a reply stream
//   client.close();

class DuplexError extends Error {
  constructor(error) {
    super(error && error.message ? error.message : String(error));
    this.code = error && error.code;
    this.data = error && error.data;
  }
}

class DuplexClient {
  // Opens the WebSocket (the secret goes in the query string: browsers cannot set headers on a
  // WebSocket) and does the handshake. With `reconnect`, a dropped connection is opened again
  // (1 s, 2 s, ... up to 30 s apart); calls that were open when it dropped fail.
  // `token`: a signed client token (JWT) for an endpoint with `auth.jwt`, sent as `access_token`.
  static async connect(url, { secret, token, reconnect = false } = {}) {
    const client = new DuplexClient(url, secret, reconnect, token);
    await client.open();
    return client;
  }

  constructor(url, secret, reconnect, token) {
    const target = new URL(url);
    if (secret) target.searchParams.set("secret", secret);
    if (token) target.searchParams.set("access_token", token);
    this.url = target.toString();
    this.reconnect = reconnect;
    this.nextId = 1;
    this.pending = new Map(); // id -> { resolve, reject, onItem }
    this.closedByUser = false;
    this.delay = 1000;
    this.onstatus = () => {};
  }

  open() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      let shaken = false;
      ws.onopen = () => ws.send("SIMPLEX/1.0;json");
      ws.onmessage = (event) => {
        if (!shaken) {
          shaken = true;
          if (String(event.data).startsWith("+")) {
            this.ws = ws;
            this.delay = 1000;
            this.onstatus("connected");
            resolve();
          } else {
            reject(new Error("handshake refused: " + event.data));
            ws.close();
          }
          return;
        }
        this.receive(event.data);
      };
      ws.onclose = (event) => {
        if (!shaken) {
          reject(new Error("connection refused (" + (event.code || "no code") + ")"));
          return;
        }
        this.dropped(event.code);
      };
    });
  }

  // A frame from the gateway: a reply to one of our calls, or a call from the backend.
  receive(text) {
    if (text === "") return; // keepalive
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (e) {
      return;
    }
    if (msg.type === "req") {
      if (msg.id) {
        const reply = {
          type: "rep",
          id: msg.id,
          error: { code: -32601, message: "method not found: " + msg.method },
        };
        if (msg.ext) reply.ext = msg.ext;
        this.ws.send(JSON.stringify(reply));
      }
      return;
    }
    const call = this.pending.get(msg.id);
    if (!call) return;
    if (msg.error) {
      this.pending.delete(msg.id);
      call.reject(new DuplexError(msg.error));
    } else if (msg.more) {
      call.onItem(msg.payload === undefined ? null : msg.payload);
    } else {
      this.pending.delete(msg.id);
      call.resolve(msg.payload === undefined ? null : msg.payload);
    }
  }

  dropped(code) {
    this.ws = null;
    for (const call of this.pending.values()) {
      call.reject(new DuplexError({ code: -32000, message: "connection lost (" + code + ")" }));
    }
    this.pending.clear();
    this.onstatus("disconnected");
    if (this.reconnect && !this.closedByUser) {
      setTimeout(() => this.open().catch(() => this.dropped(code)), this.delay);
      this.delay = Math.min(this.delay * 2, 30000);
    }
  }

  send(method, payload, onItem) {
    if (!this.ws) return Promise.reject(new Error("not connected"));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, onItem: onItem || (() => {}) });
      this.ws.send(JSON.stringify({ type: "req", method, id, payload }));
    });
  }

  // Calls `method`; resolves with the reply's payload (the last one of a stream).
  call(method, payload) {
    return this.send(method, payload);
  }

  // Calls `method` and yields every payload of its reply stream, the last one included.
  async *stream(method, payload) {
    const items = [];
    let wake = null;
    let done = false;
    let failure = null;
    const poke = () => wake && wake();
    this.send(method, payload, (item) => {
      items.push(item);
      poke();
    }).then(
      (last) => {
        items.push(last);
        done = true;
        poke();
      },
      (error) => {
        failure = error;
        done = true;
        poke();
      }
    );
    while (true) {
      if (items.length) {
        yield items.shift();
      } else if (done) {
        if (failure) throw failure;
        return;
      } else {
        await new Promise((resolve) => (wake = resolve));
      }
    }
  }

  // Sends `method` without an id: no reply comes.
  notify(method, payload) {
    if (this.ws) this.ws.send(JSON.stringify({ type: "req", method, payload }));
  }

  close() {
    this.closedByUser = true;
    if (this.ws) this.ws.close(1000);
  }
}
