import {
  type CallOptions,
  type Handler,
  type PeerOptions,
  type StatusEvent,
  type Target,
  type WebSocketConstructor,
  Peer,
  ReplyStream,
} from "./peer.js";
import type { ReconnectOptions } from "./backoff.js";
import { toWebSocketUrl } from "./client.js";

export interface BackendOptions extends PeerOptions {
  /** The publish token (a `tokens[].token` of the gateway's config). */
  token: string;
  /** The secret the endpoint's clients must present (optional when the endpoint's secret is fixed). */
  secret?: string;
  /**
   * Where the credentials go: `"query"` (default: `?token=&secret=`) or `"headers"`
   * (`Authorization: Bearer`, `X-Duplex-Secret`: Node only, keeps them out of access logs).
   */
  credentials?: "query" | "headers";
}

/**
 * A backend: publishes an endpoint on the gateway (it dials out) and serves the calls of all
 * of the endpoint's clients over that one connection. After a lost connection it publishes again
 * (backoff with full jitter), except after close code 1008 (token revoked) or 1012 (a newer
 * backend replaced it).
 *
 * ```js
 * const backend = await DuplexBackend.publish("ws://127.0.0.1:8080", "/demo", {
 *   token: "my-long-publish-token-123",
 *   secret: "s3cret",
 *   handlers: { echo: (call) => call.payload },
 * });
 * ```
 */
export class DuplexBackend extends Peer {
  /** The endpoint's URL, without credentials. */
  readonly url: string;
  /** The endpoint path. */
  readonly path: string;
  private readonly token: string;
  private readonly secret: string | undefined;
  private readonly credentials: "query" | "headers";

  private constructor(url: string, path: string, options: BackendOptions) {
    super(options, [1008, 1012]);
    if (!options || typeof options.token !== "string" || options.token === "") {
      throw new TypeError("DuplexBackend: a publish token is required (options.token)");
    }
    const p = path.startsWith("/") ? path : `/${path}`;
    this.path = p;
    this.url = toWebSocketUrl(url).replace(/\/+$/, "") + p;
    this.token = options.token;
    this.secret = options.secret;
    this.credentials = options.credentials ?? "query";
  }

  /**
   * Publishes `path` on the gateway at `url` (`ws://HOST:PORT`; `http(s)://` is taken as
   * `ws(s)://`). Resolves once the gateway answered `+OK`: clients can reach the backend from
   * then on. Rejects with a `ConnectionError` when the first publish fails.
   */
  static async publish(url: string, path: string, options: BackendOptions): Promise<DuplexBackend> {
    const backend = new DuplexBackend(url, path, options);
    await backend.start();
    return backend;
  }

  /** A builder: `DuplexBackend.builder(url, path).token(t).secret(s).handle("echo", fn).publish()`. */
  static builder(url: string, path: string): BackendBuilder {
    return new BackendBuilder(url, path);
  }

  protected target(): Target {
    const url = new URL(this.url);
    const headers: Record<string, string> = {};
    if (this.credentials === "headers") {
      headers["authorization"] = `Bearer ${this.token}`;
      if (this.secret) headers["x-duplex-secret"] = this.secret;
    } else {
      url.searchParams.set("token", this.token);
      if (this.secret) url.searchParams.set("secret", this.secret);
    }
    return { url: url.toString(), headers };
  }

  /**
   * Calls `method` on the client whose route key is `route` (`call.route` of one of its
   * calls). Rejects with `DuplexError` -32001 when that client is not connected (or leaves),
   * -32601 when it has no such method (HTTP callers have none).
   */
  callClient(route: string, method: string, payload: unknown = null, options: CallOptions = {}): Promise<unknown> {
    return this.request(method, payload, { ...options, ext: { ...(options.ext ?? {}), route } });
  }

  /** Calls `method` on a client and yields every payload of its reply stream. */
  streamClient(route: string, method: string, payload: unknown = null, options: CallOptions = {}): ReplyStream {
    return this.requestStream(method, payload, { ...options, ext: { ...(options.ext ?? {}), route } });
  }

  /** Sends a client a notification (no id, no reply). Throws a `ConnectionError` when not connected. */
  notifyClient(route: string, method: string, payload: unknown = null, options: { ext?: Record<string, unknown> } = {}): void {
    this.notification(method, payload, { ...(options.ext ?? {}), route });
  }

  /**
   * Drains the backend (`$drain`): the gateway sends it no new clients or calls, the running
   * calls finish, then the gateway answers and the backend closes (no re-publish). Resolves
   * with the number of calls still running when the gateway answered (0, unless
   * `limits.drain_timeout` ran out).
   */
  async drain(): Promise<number> {
    this.noReconnect = true;
    if (!this.connected) {
      await this.close();
      return 0;
    }
    try {
      const reply = (await this.request("$drain", null)) as { pending?: unknown } | null;
      return typeof reply?.pending === "number" ? reply.pending : 0;
    } finally {
      await this.close();
    }
  }
}

/** Builds and publishes a `DuplexBackend`. */
export class BackendBuilder {
  private readonly options: BackendOptions = { token: "", handlers: {} };

  constructor(
    private readonly url: string,
    private readonly path: string,
  ) {}

  token(token: string): this {
    this.options.token = token;
    return this;
  }

  secret(secret: string): this {
    this.options.secret = secret;
    return this;
  }

  handle(method: string, handler: Handler): this {
    this.options.handlers![method] = handler;
    return this;
  }

  reconnect(reconnect: boolean | ReconnectOptions): this {
    this.options.reconnect = reconnect;
    return this;
  }

  webSocket(impl: WebSocketConstructor): this {
    this.options.WebSocket = impl;
    return this;
  }

  credentials(where: "query" | "headers"): this {
    this.options.credentials = where;
    return this;
  }

  header(name: string, value: string): this {
    this.options.headers = { ...(this.options.headers ?? {}), [name]: value };
    return this;
  }

  onStatus(listener: (event: StatusEvent) => void): this {
    this.options.onStatus = listener;
    return this;
  }

  publish(): Promise<DuplexBackend> {
    return DuplexBackend.publish(this.url, this.path, this.options);
  }
}
