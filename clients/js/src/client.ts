import { ConnectionError } from "./errors.js";
import { AsyncQueue } from "./queue.js";
import {
  type CallOptions,
  type InputCall,
  type PeerOptions,
  type Target,
  Peer,
  ReplyStream,
} from "./peer.js";

/** A signed client token, or a function that gives the current one (called before each connection). */
export type TokenSource = string | (() => string | Promise<string>);

export interface ClientOptions extends PeerOptions {
  /** The endpoint's client secret. */
  secret?: string;
  /** A signed client token (JWT), for endpoints with `auth.jwt`. */
  token?: TokenSource;
  /**
   * Where the credentials go: `"query"` (default: `?secret=`, `?access_token=`, what browsers
   * can do) or `"headers"` (`X-Duplex-Secret`, `Authorization: Bearer`: Node only, keeps them
   * out of access logs).
   */
  credentials?: "query" | "headers";
}

/** The answer to `$refresh`. */
export interface RefreshResult {
  /** The new token's expiry (seconds since the epoch). */
  exp: number;
  [other: string]: unknown;
}

/**
 * A client of a published endpoint: calls the backend through the gateway, and answers the
 * calls the backend makes to it with the handlers registered with `handle`.
 *
 * ```js
 * const client = await DuplexClient.connect("ws://127.0.0.1:8080/demo", { secret: "s3cret" });
 * await client.call("echo", { hello: "world" });
 * for await (const n of client.stream("count", 3)) console.log(n);
 * client.close();
 * ```
 */
export class DuplexClient extends Peer {
  /** The endpoint's URL, without credentials. */
  readonly url: string;
  private readonly secret: string | undefined;
  private token: TokenSource | undefined;
  private readonly credentials: "query" | "headers";

  private constructor(url: string, options: ClientOptions) {
    super(options, [1008]);
    this.url = toWebSocketUrl(url);
    this.secret = options.secret;
    this.token = options.token;
    this.credentials = options.credentials ?? "query";
  }

  /**
   * Connects to `url` (`ws://HOST/<endpoint>` or `wss://`; `http(s)://` is taken as `ws(s)://`)
   * and does the handshake. Rejects with a `ConnectionError` when that fails; once connected,
   * a lost connection is opened again (unless `reconnect: false`).
   */
  static async connect(url: string, options: ClientOptions = {}): Promise<DuplexClient> {
    const client = new DuplexClient(url, options);
    await client.start();
    return client;
  }

  protected async target(): Promise<Target> {
    const url = new URL(this.url);
    const headers: Record<string, string> = {};
    const token = typeof this.token === "function" ? await this.token() : this.token;
    if (this.credentials === "headers") {
      if (this.secret) headers["x-duplex-secret"] = this.secret;
      if (token) headers["authorization"] = `Bearer ${token}`;
    } else {
      if (this.secret) url.searchParams.set("secret", this.secret);
      if (token) url.searchParams.set("access_token", token);
    }
    return { url: url.toString(), headers };
  }

  /**
   * Calls `method`; resolves with the reply's payload (for a reply stream: the last one).
   * Rejects with a `DuplexError` for an error reply, with a `ConnectionError` at once when not
   * connected, or when the connection drops before the reply.
   */
  call(method: string, payload: unknown = null, options: CallOptions = {}): Promise<unknown> {
    return this.request(method, payload, options);
  }

  /** Calls `method` and yields every payload of its reply stream, the last one included. */
  stream(method: string, payload: unknown = null, options: CallOptions = {}): ReplyStream {
    return this.requestStream(method, payload, options);
  }

  /**
   * Calls `method` with streamed input: one request frame per item of `input` (an array, an
   * iterable or an async iterable), `more: true` on all but the last. Resolves with the final
   * reply's payload.
   */
  callWithInput(
    method: string,
    input: Iterable<unknown> | AsyncIterable<unknown>,
    options: CallOptions = {},
  ): Promise<unknown> {
    try {
      return this.startWithInput(method, input, options).result;
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** Streamed input and a reply stream: yields every reply payload, the last one included. */
  streamWithInput(
    method: string,
    input: Iterable<unknown> | AsyncIterable<unknown>,
    options: CallOptions = {},
  ): ReplyStream {
    try {
      return this.startWithInput(method, input, options).replies;
    } catch (error) {
      return failedStream(error);
    }
  }

  /**
   * A call whose input is written frame by frame: `await c.send(x)` (`more: true`), then
   * `c.end(last)`; read `await c.result` or `c.replies`. Throws at once when not connected.
   */
  openInput(method: string, options: CallOptions = {}): InputCall {
    return this.requestInput(method, options);
  }

  /** Sends `method` without an id: no reply comes. Throws a `ConnectionError` when not connected. */
  notify(method: string, payload: unknown = null, options: { ext?: Record<string, unknown> } = {}): void {
    this.notification(method, payload, options.ext);
  }

  /**
   * Renews the connection's signed token (`$refresh`), before it expires: the gateway checks
   * it (same `sub`) and answers `{exp}`. The new token is also the one used to reconnect.
   * Rejects with a `DuplexError` (`-32602`: refused, the old token stays; `-32601`: the endpoint
   * has no signed tokens).
   */
  async refresh(token: string): Promise<RefreshResult> {
    const reply = (await this.request("$refresh", token)) as RefreshResult;
    this.token = token;
    return reply;
  }

  /** Sets the token the next connection attempts use (without `$refresh`). */
  setToken(token: TokenSource | undefined): void {
    this.token = token;
  }
}

/** `http(s)://` becomes `ws(s)://`. */
export function toWebSocketUrl(url: string): string {
  return url.replace(/^http(s?):\/\//i, (_m, s: string) => `ws${s}://`);
}

function failedStream(error: unknown): ReplyStream {
  const queue = new AsyncQueue<unknown>();
  queue.fail(error instanceof Error ? error : new ConnectionError("not_connected", String(error)));
  return new ReplyStream(queue);
}
