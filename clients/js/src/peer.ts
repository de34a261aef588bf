/**
 * The machinery shared by `DuplexClient` and `DuplexBackend`: one WebSocket to the gateway, the
 * Duplex handshake, calls (plain, reply streams, streamed input), handlers for the calls the far
 * side makes, and reconnection with full-jitter backoff.
 */

import {
  type ReconnectOptions,
  DEFAULT_INITIAL_MS,
  DEFAULT_MAX_MS,
  parseRetryAfter,
  reconnectDelay,
} from "./backoff.js";
import { ConnectionError, DuplexError, ErrorCode } from "./errors.js";
import { type Ext, type Message, HANDSHAKE, encodeReply, encodeRequest, frameId } from "./protocol.js";
import { AsyncQueue } from "./queue.js";

// ---------------------------------------------------------------------------------------------
// WebSocket: the platform's, or one the caller passes (Node 20 has none: pass `ws`).

/** The part of the standard `WebSocket` this library uses. */
export interface WebSocketLike {
  readonly readyState: number;
  readonly bufferedAmount: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: any) => void): void;
}

/**
 * A WebSocket constructor: the standard one (browsers, Node 22+), or the `ws` package's.
 * Headers (`credentials: "headers"`, `headers`) are passed as `new WebSocket(url, { headers })`,
 * which `ws` and Node's own WebSocket understand and browsers do not.
 */
export type WebSocketConstructor = new (url: string, ...rest: any[]) => WebSocketLike;

const OPEN = 1;
const CONNECTING = 0;

function resolveWebSocket(impl: WebSocketConstructor | undefined): WebSocketConstructor {
  const found = impl ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (!found) {
    throw new TypeError(
      "duplex-gateway-client: this platform has no global WebSocket (Node.js before 22): " +
        'pass one, e.g. `import WebSocket from "ws"` and the option `{ WebSocket }`',
    );
  }
  return found;
}

// ---------------------------------------------------------------------------------------------
// Public types.

/** The connection's state, as reported by status events. */
export type State = "connecting" | "connected" | "disconnected" | "closed";

/**
 * A status event:
 * - `connecting`: a connection attempt starts (`attempt`: 0 for the first reconnect attempt);
 * - `connected`: the handshake was answered `+OK` (`reconnected` after a lost connection; a
 *   backend has published again);
 * - `disconnected`: the connection was lost or an attempt failed; the next attempt comes in
 *   `delayMs` (`retryAfterMs` when the gateway's `Retry-After` was honoured);
 * - `closed`: for good: `close()`, reconnect turned off, or a close code that forbids it (1008).
 */
export interface StatusEvent {
  state: State;
  /** The reconnect attempt (0, 1, ...) the event belongs to. */
  attempt?: number;
  /** `disconnected`: the wait before the next attempt, in ms. */
  delayMs?: number;
  /** The WebSocket close code, when there was one. */
  code?: number;
  reason?: string;
  /** What failed, for `disconnected` and `closed`. */
  error?: Error;
  /** The gateway's `Retry-After`, in ms, when it refused the upgrade with one. */
  retryAfterMs?: number;
  /** `connected` after a lost connection. */
  reconnected?: boolean;
}

/** How the peer's connection ended for good. */
export interface CloseInfo {
  code?: number;
  reason?: string;
  error?: Error;
}

/** Options of an outgoing call. */
export interface CallOptions {
  /** Extension metadata sent with the request (and copied by the far side onto its replies). */
  ext?: Ext;
  /** Gives up on the call: it rejects with the signal's reason; later replies are dropped. */
  signal?: AbortSignal;
}

/** A call the far side made, handed to a handler. */
export interface Call {
  /** The call's id; `undefined` for a notification (no reply is sent). */
  readonly id: number | undefined;
  readonly method: string;
  /** The payload of the (first) request frame. */
  readonly payload: unknown;
  /** The request's `ext`, as received (a backend sees `route`, and `auth` on signed-token endpoints). */
  readonly ext: Ext | undefined;
  /** `ext.route`: on a backend, the caller's route key (pass it to `callClient`). */
  readonly route: string | undefined;
  /** `ext.auth`: on a backend of an endpoint with signed client tokens, who calls. */
  readonly auth: unknown;
  /** Whether more input frames follow the first one (streamed input). */
  readonly streamed: boolean;
  /** The streamed input frames that follow the first one (empty when `streamed` is false). */
  readonly input: AsyncIterable<unknown>;
  /** Every input payload: the first one, then those of `input`. */
  payloads(): AsyncIterable<unknown>;
  /** Aborted when the connection is lost or the peer is closed before the call ended. */
  readonly signal: AbortSignal;
  /** Sends one reply of a reply stream (`more: true`); the handler's return value is the last. */
  send(payload: unknown): Promise<void>;
}

/**
 * Answers a call: its return value (or resolved value) is the reply's payload. Throw a
 * `DuplexError` to answer with an error; anything else thrown is answered `-32603`.
 */
export type Handler = (call: Call) => unknown;

/** Options common to clients and backends. */
export interface PeerOptions {
  /** The WebSocket implementation (default: the global one). Node 20: `ws`. */
  WebSocket?: WebSocketConstructor;
  /**
   * Reconnect after a lost connection (default `true`): full-jitter backoff from 0.5 s up to
   * 30 s. `false`: the peer is closed when its connection drops.
   */
  reconnect?: boolean | ReconnectOptions;
  /** How long the gateway has to answer the handshake (and the upgrade), in ms (default 10 000). */
  handshakeTimeoutMs?: number;
  /** Extra headers on the upgrade request (Node only: browsers cannot set WebSocket headers). */
  headers?: Record<string, string>;
  /** Handlers for the calls the far side makes, by method. */
  handlers?: Record<string, Handler>;
  /** Called with every status event. */
  onStatus?: (event: StatusEvent) => void;
  /**
   * When a reply stream or streamed input is sent faster than the connection takes it, `send`
   * waits while more than this many bytes are buffered (default 1 MiB).
   */
  highWaterMark?: number;
}

// ---------------------------------------------------------------------------------------------
// Outgoing calls.

interface Outgoing {
  onItem: (payload: unknown) => void;
  onDone: (payload: unknown) => void;
  onError: (error: Error) => void;
}

/** The replies of a call, as an async iterator: every payload, the last one included. */
export class ReplyStream implements AsyncIterableIterator<unknown> {
  private readonly queue: AsyncQueue<unknown>;

  /** @internal */
  constructor(queue: AsyncQueue<unknown>) {
    this.queue = queue;
  }

  next(): Promise<IteratorResult<unknown>> {
    return this.queue.next();
  }

  /** Stops reading: the replies still to come are dropped (the call itself cannot be cancelled). */
  return(): Promise<IteratorResult<unknown>> {
    return this.queue.return();
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<unknown> {
    return this;
  }

  /** Reads the whole stream into an array. */
  async toArray(): Promise<unknown[]> {
    const all: unknown[] = [];
    for await (const item of this) all.push(item);
    return all;
  }
}

/**
 * A call with streamed input that the caller writes frame by frame: `send` writes a frame with
 * `more: true`, `end` writes the last one. `result` is the final reply's payload, `replies`
 * every reply payload (use one of them).
 */
export interface InputCall {
  readonly id: number;
  /** Sends one input frame (`more: true`). Waits while the connection falls behind. */
  send(payload: unknown): Promise<void>;
  /** Sends the last input frame (`more: false`), with `payload` (default `null`). */
  end(payload?: unknown): void;
  /** The final reply's payload. */
  readonly result: Promise<unknown>;
  /** Every reply payload, the last one included. */
  readonly replies: ReplyStream;
  /** Whether the call has ended (a final reply, an error, or a lost connection). */
  readonly finished: boolean;
}

// ---------------------------------------------------------------------------------------------
// Incoming calls.

class IncomingCall implements Call {
  readonly id: number | undefined;
  readonly method: string;
  readonly payload: unknown;
  readonly ext: Ext | undefined;
  readonly streamed: boolean;
  readonly input: AsyncQueue<unknown>;
  readonly signal: AbortSignal;
  private readonly controller = new AbortController();
  finished = false;

  constructor(
    private readonly peer: Peer,
    private readonly ws: WebSocketLike,
    msg: Message,
  ) {
    this.id = frameId(msg);
    this.method = String(msg.method);
    this.payload = msg.payload === undefined ? null : msg.payload;
    this.ext = msg.ext && typeof msg.ext === "object" && !Array.isArray(msg.ext) ? (msg.ext as Ext) : undefined;
    this.streamed = msg.more === true && this.id !== undefined;
    this.input = new AsyncQueue<unknown>();
    if (!this.streamed) this.input.end();
    this.signal = this.controller.signal;
  }

  get route(): string | undefined {
    const r = this.ext?.route;
    return typeof r === "string" ? r : undefined;
  }

  get auth(): unknown {
    return this.ext?.auth;
  }

  async *payloads(): AsyncIterable<unknown> {
    yield this.payload;
    yield* this.input;
  }

  /** A further input frame of this call. */
  pushInput(msg: Message): void {
    this.input.push(msg.payload === undefined ? null : msg.payload);
    if (msg.more !== true) this.input.end();
  }

  async send(payload: unknown): Promise<void> {
    if (this.id === undefined) throw new Error("a notification (a request without id) gets no replies");
    if (this.finished) throw new Error(`call ${this.method} (id ${this.id}) has already ended`);
    if (this.ws.readyState !== OPEN || this.peer.socket !== this.ws) {
      throw new ConnectionError("connection_lost", "the connection this call came on is gone");
    }
    this.ws.send(encodeReply(this.id, payload, true, this.ext));
    await this.peer.backpressure(this.ws);
  }

  /** The handler returned: the last reply. */
  finish(result: unknown): void {
    if (this.finished) return;
    this.finished = true;
    this.peer.forgetIncoming(this);
    if (this.id === undefined) return;
    if (this.ws.readyState === OPEN) this.ws.send(encodeReply(this.id, result, false, this.ext));
  }

  /** The handler threw: an error reply. */
  fail(error: unknown): void {
    if (this.finished) return;
    this.finished = true;
    this.peer.forgetIncoming(this);
    if (this.id === undefined) return;
    const object =
      error instanceof DuplexError
        ? error.toErrorObject()
        : {
            code: ErrorCode.InternalError,
            message: `internal error: ${error instanceof Error ? error.message : String(error)}`,
          };
    if (this.ws.readyState === OPEN) this.ws.send(encodeReply(this.id, null, false, this.ext, object));
  }

  /** The connection is gone: the call can no longer be answered. */
  abort(error: Error): void {
    if (this.finished) return;
    this.finished = true;
    this.input.fail(error);
    this.controller.abort(error);
  }
}

// ---------------------------------------------------------------------------------------------
// The peer.

/** What a connection attempt needs: the URL and the upgrade's headers. */
export interface Target {
  url: string;
  headers: Record<string, string>;
}

export abstract class Peer {
  /** The connection's state. */
  get state(): State {
    return this._state;
  }

  /** Resolves once the peer is closed for good (never rejects). */
  readonly closed: Promise<CloseInfo>;

  /** @internal the socket the peer speaks on, once its handshake was answered. */
  socket: WebSocketLike | null = null;

  private _state: State = "connecting";
  private attemptSocket: WebSocketLike | null = null;
  private readonly WebSocketImpl: WebSocketConstructor;
  private readonly reconnectEnabled: boolean;
  private readonly reconnectOptions: ReconnectOptions;
  private readonly stopCodes: number[];
  private readonly handshakeTimeoutMs: number;
  private readonly highWaterMark: number;
  private readonly extraHeaders: Record<string, string>;
  private readonly handlers = new Map<string, Handler>();
  private readonly outgoing = new Map<number, Outgoing>();
  private readonly incoming = new Map<number, IncomingCall>();
  private readonly listeners = new Set<(event: StatusEvent) => void>();
  private nextId = 1;
  private attempt = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private userClosed = false;
  /** Set by a drain: the connection ends on purpose, never reconnect. */
  protected noReconnect = false;
  private resolveClosed!: (info: CloseInfo) => void;

  protected constructor(options: PeerOptions, defaultStopCodes: number[]) {
    this.WebSocketImpl = resolveWebSocket(options.WebSocket);
    const r = options.reconnect ?? true;
    this.reconnectEnabled = r !== false;
    this.reconnectOptions = typeof r === "object" ? { ...r } : {};
    this.reconnectOptions.initialMs ??= DEFAULT_INITIAL_MS;
    this.reconnectOptions.maxMs ??= DEFAULT_MAX_MS;
    this.stopCodes = this.reconnectOptions.stopCodes ?? defaultStopCodes;
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000;
    this.highWaterMark = options.highWaterMark ?? 1 << 20;
    this.extraHeaders = { ...(options.headers ?? {}) };
    for (const [method, fn] of Object.entries(options.handlers ?? {})) this.handlers.set(method, fn);
    if (options.onStatus) this.listeners.add(options.onStatus);
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
  }

  /** The URL and headers of the next connection attempt (credentials included). */
  protected abstract target(): Target | Promise<Target>;

  // --- events -------------------------------------------------------------------------------

  /** Listens to status events; returns a function that stops listening. */
  on(event: "status", listener: (event: StatusEvent) => void): () => void {
    if (event !== "status") throw new TypeError(`unknown event ${String(event)}: only "status"`);
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Stops a listener added with `on`. */
  off(event: "status", listener: (event: StatusEvent) => void): void {
    if (event === "status") this.listeners.delete(listener);
  }

  private emit(event: StatusEvent): void {
    this._state = event.state;
    for (const listener of [...this.listeners]) {
      try {
        listener(event);
      } catch {
        // A listener's failure is its own.
      }
    }
  }

  /** Whether the peer is connected now (calls can be sent). */
  get connected(): boolean {
    return this._state === "connected" && this.socket !== null && this.socket.readyState === OPEN;
  }

  // --- handlers -----------------------------------------------------------------------------

  /** Registers the handler of `method` (replacing any); returns the peer. */
  handle(method: string, handler: Handler): this {
    this.handlers.set(method, handler);
    return this;
  }

  /** Removes the handler of `method`: its calls are then answered `-32601`. */
  unhandle(method: string): this {
    this.handlers.delete(method);
    return this;
  }

  // --- connecting ---------------------------------------------------------------------------

  /** @internal The first connection: rejects (and closes the peer) when it fails. */
  protected async start(): Promise<void> {
    this.emit({ state: "connecting" });
    try {
      await this.connectOnce(false);
    } catch (error) {
      this.finalClose({ error: error as Error, code: (error as ConnectionError).closeCode });
      throw error;
    }
  }

  /** One connection attempt: the upgrade, then the handshake. Resolves once `+OK` came. */
  private async connectOnce(reconnected: boolean): Promise<void> {
    const { url, headers } = await this.target();
    if (this.userClosed) throw new ConnectionError("closed", "the peer was closed");
    const allHeaders = { ...this.extraHeaders, ...headers };
    return new Promise<void>((resolve, reject) => {
      let ws: WebSocketLike;
      try {
        ws =
          Object.keys(allHeaders).length > 0
            ? new this.WebSocketImpl(url, { headers: allHeaders })
            : new this.WebSocketImpl(url);
      } catch (error) {
        reject(new ConnectionError("refused", `cannot open ${redact(url)}: ${(error as Error).message}`));
        return;
      }
      this.attemptSocket = ws;
      let settled = false;
      let status: number | undefined;
      let statusText = "";
      let retryAfterMs: number | undefined;

      const fail = (error: ConnectionError) => {
        if (settled) return;
        settled = true;
        clearTimeout(timeout);
        if (this.attemptSocket === ws) this.attemptSocket = null;
        try {
          if (ws.readyState === CONNECTING || ws.readyState === OPEN) ws.close();
        } catch {
          // Closing a socket that never opened may throw; it is gone either way.
        }
        reject(error);
      };

      const timeout = setTimeout(() => {
        const terminate = (ws as { terminate?: () => void }).terminate;
        fail(new ConnectionError("timeout", `no handshake answer from ${redact(url)} within ${this.handshakeTimeoutMs} ms`));
        if (typeof terminate === "function") terminate.call(ws);
      }, this.handshakeTimeoutMs);

      // The `ws` package shows a refused upgrade's status and headers (Retry-After); a browser's
      // WebSocket (and Node's own) shows nothing but a close with code 1006.
      const emitter = ws as unknown as { on?: (event: string, fn: (...args: any[]) => void) => void; terminate?: () => void };
      if (typeof emitter.on === "function") {
        emitter.on("unexpected-response", (_req: unknown, res: any) => {
          status = res.statusCode;
          retryAfterMs = parseRetryAfter(res.headers?.["retry-after"]);
          let body = "";
          const done = () => {
            clearTimeout(bodyTimer);
            statusText = errorMessageOf(body) ?? res.statusMessage ?? "";
            emitter.terminate?.();
          };
          const bodyTimer = setTimeout(done, 500);
          try {
            res.setEncoding?.("utf8");
            res.on("data", (chunk: string) => {
              if (body.length < 4096) body += chunk;
            });
            res.on("end", done);
            res.on("error", done);
          } catch {
            done();
          }
        });
      }

      ws.addEventListener("open", () => {
        try {
          ws.send(HANDSHAKE);
        } catch (error) {
          fail(new ConnectionError("refused", `cannot send the handshake: ${(error as Error).message}`));
        }
      });
      ws.addEventListener("message", (event: { data: unknown }) => {
        if (!settled) {
          const text = frameText(event.data);
          if (text === "" || text === undefined) return; // a keepalive
          if (text.trim().startsWith("+")) {
            settled = true;
            clearTimeout(timeout);
            if (this.attemptSocket === ws) this.attemptSocket = null;
            if (this.userClosed) {
              ws.close(1000);
              reject(new ConnectionError("closed", "the peer was closed"));
              return;
            }
            this.attach(ws, reconnected);
            resolve();
          } else {
            fail(new ConnectionError("handshake", `the gateway refused the handshake: ${text}`));
          }
          return;
        }
        if (this.socket === ws) this.receive(ws, event.data);
      });
      ws.addEventListener("error", () => {
        // A close event follows; it says what happened.
      });
      ws.addEventListener("close", (event: { code?: number; reason?: string }) => {
        if (!settled) {
          const code = event.code;
          const message =
            status !== undefined
              ? `the gateway refused the connection to ${redact(url)}: HTTP ${status}${statusText ? ` (${statusText})` : ""}`
              : `the connection to ${redact(url)} closed before the handshake (code ${code ?? "none"}${event.reason ? `: ${event.reason}` : ""})`;
          fail(
            new ConnectionError("refused", message, {
              closeCode: status === undefined ? code : undefined,
              closeReason: event.reason,
              status,
              retryAfterMs,
            }),
          );
          return;
        }
        if (this.socket === ws) this.dropped(event.code, event.reason);
      });
    });
  }

  /** The handshake was answered: the peer speaks on `ws` from now on. */
  private attach(ws: WebSocketLike, reconnected: boolean): void {
    this.socket = ws;
    this.attempt = 0;
    this.emit(reconnected ? { state: "connected", reconnected: true } : { state: "connected" });
  }

  /** The connection was lost (or closed by us): fail what was open, then reconnect or close. */
  private dropped(code: number | undefined, reason: string | undefined): void {
    this.socket = null;
    const error = this.userClosed
      ? new ConnectionError("closed", "the peer was closed", { closeCode: code, closeReason: reason })
      : new ConnectionError(
          "connection_lost",
          `the connection to the gateway was lost (close code ${code ?? "none"}${reason ? `: ${reason}` : ""})`,
          { closeCode: code, closeReason: reason },
        );
    this.failAll(error);
    if (this.userClosed || this.noReconnect || !this.reconnectEnabled) {
      this.finalClose({ code, reason, error: this.userClosed ? undefined : error });
    } else if (code !== undefined && this.stopCodes.includes(code)) {
      this.finalClose({ code, reason, error });
    } else {
      this.scheduleReconnect(error);
    }
  }

  private failAll(error: Error): void {
    const outgoing = [...this.outgoing.values()];
    this.outgoing.clear();
    for (const call of outgoing) call.onError(error);
    const incoming = [...this.incoming.values()];
    this.incoming.clear();
    for (const call of incoming) call.abort(error);
  }

  private scheduleReconnect(error: ConnectionError): void {
    const delayMs = reconnectDelay(this.attempt, error.retryAfterMs, this.reconnectOptions);
    const event: StatusEvent = { state: "disconnected", attempt: this.attempt, delayMs, error };
    if (error.closeCode !== undefined) event.code = error.closeCode;
    if (error.closeReason) event.reason = error.closeReason;
    if (error.retryAfterMs !== undefined) event.retryAfterMs = error.retryAfterMs;
    this.emit(event);
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.userClosed) return;
      this.emit({ state: "connecting", attempt: this.attempt });
      this.connectOnce(true).then(
        () => {},
        (failure: ConnectionError) => {
          if (this.userClosed || this._state === "closed") return;
          if (failure.closeCode !== undefined && this.stopCodes.includes(failure.closeCode)) {
            this.finalClose({ code: failure.closeCode, reason: failure.closeReason, error: failure });
            return;
          }
          // Credentials the gateway refuses stay refused: 401 and 403 are final (a 404 is not:
          // after a restart a client may come back before its backend has published again).
          if (failure.status === 401 || failure.status === 403) {
            this.finalClose({ error: failure });
            return;
          }
          this.attempt += 1;
          this.scheduleReconnect(failure instanceof ConnectionError ? failure : new ConnectionError("refused", String(failure)));
        },
      );
    }, delayMs);
  }

  private finalClose(info: CloseInfo): void {
    if (this._state === "closed") return;
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    const event: StatusEvent = { state: "closed" };
    if (info.code !== undefined) event.code = info.code;
    if (info.reason) event.reason = info.reason;
    if (info.error) event.error = info.error;
    this.emit(event);
    this.resolveClosed(info);
  }

  /**
   * Closes the peer for good (code 1000): open calls fail with a `ConnectionError` of kind
   * `closed`, no reconnect follows. Resolves once the socket is closed (or after 2 s).
   */
  close(code = 1000, reason = ""): Promise<CloseInfo> {
    if (!this.userClosed) {
      this.userClosed = true;
      if (this.timer) {
        clearTimeout(this.timer);
        this.timer = null;
      }
      const attempt = this.attemptSocket;
      this.attemptSocket = null;
      if (attempt) {
        try {
          attempt.close();
        } catch {
          // never opened
        }
      }
      const ws = this.socket;
      const error = new ConnectionError("closed", "the peer was closed");
      this.failAll(error);
      if (ws && (ws.readyState === OPEN || ws.readyState === CONNECTING)) {
        try {
          ws.close(code, reason);
        } catch {
          ws.close();
        }
        // The close event finishes the job; don't wait for a gateway that does not answer.
        const timer = setTimeout(() => {
          if (this.socket === ws) this.socket = null;
          this.finalClose({ code });
        }, 2000);
        this.closed.then(() => clearTimeout(timer));
      } else {
        this.socket = null;
        this.finalClose({ code });
      }
    }
    return this.closed;
  }

  // --- frames -------------------------------------------------------------------------------

  /** A frame from the gateway. */
  private receive(ws: WebSocketLike, data: unknown): void {
    const text = frameText(data);
    if (!text) return; // keepalive, or nothing we can read
    let msg: Message;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object" || Array.isArray(msg)) return;
    if (msg.type === "rep") this.onReply(msg);
    else if (msg.type === "req") this.onRequest(ws, msg);
  }

  private onReply(msg: Message): void {
    const id = frameId(msg);
    if (id === undefined) return; // e.g. the gateway's answer to a malformed frame without id
    const call = this.outgoing.get(id);
    if (!call) return;
    const payload = msg.payload === undefined ? null : msg.payload;
    if (msg.error) {
      this.outgoing.delete(id);
      call.onError(DuplexError.from(msg.error));
    } else if (msg.more === true) {
      call.onItem(payload);
    } else {
      this.outgoing.delete(id);
      call.onDone(payload);
    }
  }

  private onRequest(ws: WebSocketLike, msg: Message): void {
    const id = frameId(msg);
    if (id !== undefined) {
      const open = this.incoming.get(id);
      if (open) {
        open.pushInput(msg);
        return;
      }
    }
    const method = typeof msg.method === "string" ? msg.method : "";
    const handler = this.handlers.get(method);
    if (!handler) {
      if (id !== undefined && ws.readyState === OPEN) {
        const ext = msg.ext && typeof msg.ext === "object" ? (msg.ext as Ext) : undefined;
        ws.send(
          encodeReply(id, null, false, ext, {
            code: ErrorCode.MethodNotFound,
            message: `method not found: ${method}`,
          }),
        );
      }
      return;
    }
    const call = new IncomingCall(this, ws, msg);
    if (id !== undefined) this.incoming.set(id, call);
    let result: unknown;
    try {
      result = handler(call);
    } catch (error) {
      call.fail(error);
      return;
    }
    if (result && typeof (result as PromiseLike<unknown>).then === "function") {
      (result as PromiseLike<unknown>).then(
        (value) => call.finish(value),
        (error) => call.fail(error),
      );
    } else {
      call.finish(result);
    }
  }

  /** @internal */
  forgetIncoming(call: IncomingCall): void {
    if (call.id !== undefined && this.incoming.get(call.id) === call) this.incoming.delete(call.id);
  }

  /** @internal Waits while the socket has more than the high-water mark buffered. */
  async backpressure(ws: WebSocketLike): Promise<void> {
    while (ws.readyState === OPEN && ws.bufferedAmount > this.highWaterMark) {
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  // --- outgoing calls -----------------------------------------------------------------------

  private notConnected(method: string): ConnectionError {
    return new ConnectionError(
      "not_connected",
      `not connected to the gateway (${this._state}): ${method} was not sent`,
    );
  }

  /**
   * Sends the first frame of a call and registers its reply handling. Throws a
   * `ConnectionError` at once when not connected.
   */
  private begin(method: string, payload: unknown, more: boolean, options: CallOptions, out: Outgoing): number {
    const ws = this.socket;
    if (!ws || ws.readyState !== OPEN || this._state !== "connected") throw this.notConnected(method);
    const signal = options.signal;
    if (signal?.aborted) throw signal.reason ?? new Error("aborted");
    const id = this.nextId++;
    if (this.nextId > Number.MAX_SAFE_INTEGER) this.nextId = 1;
    let onAbort: (() => void) | undefined;
    const cleanup = () => {
      if (onAbort && signal) signal.removeEventListener("abort", onAbort);
    };
    const entry: Outgoing = {
      onItem: out.onItem,
      onDone: (p) => {
        cleanup();
        out.onDone(p);
      },
      onError: (e) => {
        cleanup();
        out.onError(e);
      },
    };
    if (signal) {
      onAbort = () => {
        if (this.outgoing.get(id) === entry) {
          this.outgoing.delete(id);
          out.onError(signal.reason ?? new Error("aborted"));
        }
      };
      signal.addEventListener("abort", onAbort, { once: true });
    }
    this.outgoing.set(id, entry);
    ws.send(encodeRequest(method, id, payload, more, options.ext));
    return id;
  }

  /** @internal A call: resolves with the final reply's payload (the last one of a stream). */
  protected request(method: string, payload: unknown, options: CallOptions = {}): Promise<unknown> {
    return new Promise((resolve, reject) => {
      this.begin(method, payload, false, options, { onItem: () => {}, onDone: resolve, onError: reject });
    });
  }

  /** @internal A call whose reply payloads are read one by one. */
  protected requestStream(method: string, payload: unknown, options: CallOptions = {}): ReplyStream {
    let id: number | undefined;
    const queue = new AsyncQueue<unknown>(() => {
      // The reader stopped: drop the rest of the replies.
      if (id !== undefined) this.outgoing.delete(id);
    });
    try {
      id = this.begin(method, payload, false, options, {
        onItem: (p) => queue.push(p),
        onDone: (p) => {
          queue.push(p);
          queue.end();
        },
        onError: (e) => queue.fail(e),
      });
    } catch (error) {
      queue.fail(error);
    }
    return new ReplyStream(queue);
  }

  /**
   * @internal A call whose input the caller writes frame by frame. The first `send`/`end`
   * sends the request; it throws at once when not connected.
   */
  protected requestInput(method: string, options: CallOptions = {}): InputCall {
    if (!this.connected) throw this.notConnected(method);
    const call = new InputCallImpl(this, method, options);
    void call.result.catch(() => {});
    return call;
  }

  /** @internal */
  beginInput(method: string, payload: unknown, more: boolean, options: CallOptions, out: Outgoing): number {
    return this.begin(method, payload, more, options, out);
  }

  /** @internal Forgets an outgoing call: its later replies are dropped. */
  forgetOutgoing(id: number): void {
    this.outgoing.delete(id);
  }

  /** @internal A further input frame of an open call; false when the call or connection is gone. */
  sendInput(id: number, method: string, payload: unknown, more: boolean, ext: Ext | undefined): WebSocketLike {
    const ws = this.socket;
    if (!ws || ws.readyState !== OPEN || !this.outgoing.has(id)) {
      throw new ConnectionError("connection_lost", `call ${method} (id ${id}) is no longer open`);
    }
    ws.send(encodeRequest(method, id, payload, more, ext));
    return ws;
  }

  /**
   * @internal Streamed input from an iterable. One item is read ahead, to know which frame is
   * the last (`more: false`): the first frame leaves when the second item is there (or the
   * input has ended). An empty input sends one frame with payload `null`. When the input
   * throws, the call fails locally with that error (the far side keeps waiting for the rest of
   * its input: the protocol has no way to cancel a call).
   */
  protected startWithInput(
    method: string,
    input: Iterable<unknown> | AsyncIterable<unknown>,
    options: CallOptions,
  ): InputCallImpl {
    if (!this.connected) throw this.notConnected(method);
    const iterator = toAsyncIterator(input);
    const call = new InputCallImpl(this, method, options);
    void call.result.catch(() => {});
    (async () => {
      let current = await iterator.next();
      if (current.done) {
        call.end(null);
        return;
      }
      for (;;) {
        const next = await iterator.next();
        if (call.finished) {
          await iterator.return?.();
          return;
        }
        if (next.done) {
          call.end(current.value);
          return;
        }
        await call.send(current.value);
        current = next;
      }
    })().catch((error) => call.abortLocal(error));
    return call;
  }

  /** @internal A notification: no id, no reply. Throws at once when not connected. */
  protected notification(method: string, payload: unknown, ext?: Ext): void {
    const ws = this.socket;
    if (!ws || ws.readyState !== OPEN || this._state !== "connected") throw this.notConnected(method);
    ws.send(encodeRequest(method, undefined, payload, false, ext));
  }

  /** For tests and diagnostics: calls open now in each direction. */
  get pendingCalls(): { outgoing: number; incoming: number } {
    return { outgoing: this.outgoing.size, incoming: this.incoming.size };
  }
}

/** @internal */
export class InputCallImpl implements InputCall {
  id = 0;
  private started = false;
  private ended = false;
  finished = false;
  readonly result: Promise<unknown>;
  readonly replies: ReplyStream;
  private resolveResult!: (v: unknown) => void;
  private rejectResult!: (e: unknown) => void;
  private readonly queue: AsyncQueue<unknown>;

  constructor(
    private readonly peer: Peer,
    private readonly method: string,
    private readonly options: CallOptions,
  ) {
    this.result = new Promise((resolve, reject) => {
      this.resolveResult = resolve;
      this.rejectResult = reject;
    });
    this.queue = new AsyncQueue<unknown>();
    this.replies = new ReplyStream(this.queue);
  }

  private out(): Outgoing {
    return {
      onItem: (p) => this.queue.push(p),
      onDone: (p) => {
        this.finished = true;
        this.queue.push(p);
        this.queue.end();
        this.resolveResult(p);
      },
      onError: (e) => {
        this.finished = true;
        this.queue.fail(e);
        this.rejectResult(e);
      },
    };
  }

  private write(payload: unknown, more: boolean): WebSocketLike | undefined {
    if (this.ended) throw new Error(`the input of ${this.method} has already ended`);
    if (!more) this.ended = true;
    if (!this.started) {
      this.started = true;
      try {
        this.id = this.peer.beginInput(this.method, payload, more, this.options, this.out());
      } catch (error) {
        this.finished = true;
        this.queue.fail(error);
        this.rejectResult(error);
        throw error;
      }
      return this.peer.socket ?? undefined;
    }
    if (this.finished) return undefined; // answered already: the rest of the input is not wanted
    return this.peer.sendInput(this.id, this.method, payload, more, this.options.ext);
  }

  /** The call fails here without a word to the far side (its input threw, or it was abandoned). */
  abortLocal(error: unknown): void {
    if (this.finished) return;
    this.finished = true;
    this.ended = true;
    if (this.started) this.peer.forgetOutgoing(this.id);
    this.queue.fail(error);
    this.rejectResult(error);
  }

  async send(payload: unknown): Promise<void> {
    const ws = this.write(payload, true);
    if (ws) await this.peer.backpressure(ws);
  }

  end(payload: unknown = null): void {
    this.write(payload, false);
  }
}

function toAsyncIterator(input: Iterable<unknown> | AsyncIterable<unknown>): AsyncIterator<unknown> {
  const a = input as AsyncIterable<unknown>;
  if (a && typeof a[Symbol.asyncIterator] === "function") return a[Symbol.asyncIterator]();
  const s = input as Iterable<unknown>;
  if (s && typeof s[Symbol.iterator] === "function") {
    const it = s[Symbol.iterator]();
    return {
      next: async () => it.next(),
      return: async () => it.return?.() ?? { value: undefined, done: true },
    };
  }
  throw new TypeError("streamed input must be an array, an iterable or an async iterable");
}

/** The text of a WebSocket message (the gateway always sends text). */
function frameText(data: unknown): string | undefined {
  if (typeof data === "string") return data;
  if (data instanceof ArrayBuffer) return new TextDecoder().decode(data);
  if (ArrayBuffer.isView(data)) return new TextDecoder().decode(data as ArrayBufferView);
  return undefined;
}

/** The `error.message` of a gateway refusal body, when it has one. */
function errorMessageOf(body: string): string | undefined {
  try {
    const parsed = JSON.parse(body);
    const message = parsed?.error?.message;
    return typeof message === "string" ? message : undefined;
  } catch {
    return undefined;
  }
}

/** A URL without its credentials, for error messages. */
export function redact(url: string): string {
  try {
    const u = new URL(url);
    for (const key of ["token", "secret", "access_token"]) {
      if (u.searchParams.has(key)) u.searchParams.set(key, "***");
    }
    return u.toString();
  } catch {
    return url.replace(/([?&](?:token|secret|access_token)=)[^&]*/g, "$1***");
  }
}
