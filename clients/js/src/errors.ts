/** The error codes of duplex-gateway (docs/protocol.md, "Errors"); they follow JSON-RPC. */
export const ErrorCode = {
  /** The gateway: a frame that is not JSON. */
  ParseError: -32700,
  /** The gateway: JSON that is not a valid message. */
  InvalidMessage: -32600,
  /** Backends and clients, for unknown methods. */
  MethodNotFound: -32601,
  /** Backends and clients, for arguments they refuse. */
  InvalidParams: -32602,
  /** A handler that threw something other than a `DuplexError`. */
  InternalError: -32603,
  /** The gateway: the backend left or was replaced with the call open, or did not come back. */
  BackendUnavailable: -32000,
  /** The gateway, to a backend: the client it calls is not there, or left before replying. */
  ClientNotConnected: -32001,
  /** The gateway, for HTTP calls: no reply within `limits.call_timeout`. */
  Timeout: -32002,
  /** The gateway: too many pending calls (or the gateway holds too much). */
  TooManyPending: -32003,
  /** The gateway: rate limited; `data.retry_after_ms` says when to try again. */
  RateLimited: -32004,
} as const;

/** The `error` object of a reply frame. */
export interface ErrorObject {
  code: number;
  message: string;
  data?: unknown;
}

/**
 * An error reply: the far side (or the gateway) answered the call with `error`.
 * Over HTTP, `status` is the HTTP status and `retryAfterMs` comes from `Retry-After`
 * (or from `data.retry_after_ms` of a `-32004`).
 */
export class DuplexError extends Error {
  readonly code: number;
  readonly data?: unknown;
  /** The HTTP status, for errors of HTTP calls. */
  readonly status?: number;
  /** When to try again, in milliseconds, when the gateway said so. */
  readonly retryAfterMs?: number;

  constructor(
    code: number,
    message: string,
    data?: unknown,
    extra: { status?: number; retryAfterMs?: number } = {},
  ) {
    super(message);
    this.name = "DuplexError";
    this.code = code;
    if (data !== undefined) this.data = data;
    if (extra.status !== undefined) this.status = extra.status;
    let retryAfterMs = extra.retryAfterMs;
    if (retryAfterMs === undefined && data && typeof data === "object") {
      const ms = (data as Record<string, unknown>).retry_after_ms;
      if (typeof ms === "number" && Number.isFinite(ms)) retryAfterMs = ms;
    }
    if (retryAfterMs !== undefined) this.retryAfterMs = retryAfterMs;
  }

  /** Builds one from a reply's `error` object (tolerating a malformed one). */
  static from(error: unknown, extra: { status?: number; retryAfterMs?: number } = {}): DuplexError {
    if (error && typeof error === "object") {
      const e = error as Record<string, unknown>;
      const code = typeof e.code === "number" ? e.code : ErrorCode.InternalError;
      const message = typeof e.message === "string" ? e.message : JSON.stringify(error);
      return new DuplexError(code, message, e.data, extra);
    }
    return new DuplexError(ErrorCode.InternalError, String(error), undefined, extra);
  }

  /** The `error` object to put on a reply frame. */
  toErrorObject(): ErrorObject {
    const o: ErrorObject = { code: this.code, message: this.message };
    if (this.data !== undefined) o.data = this.data;
    return o;
  }
}

/**
 * What went wrong with the connection itself, never an answer of the far side:
 * - `not_connected`: the call was made while the peer was not connected; it was not sent
 *   (calls are never buffered);
 * - `connection_lost`: the connection dropped while the call was open: it may or may not have run;
 * - `closed`: the peer was closed by `close()` (or for good, after a close code that forbids a
 *   reconnect, such as 1008);
 * - `refused`: the gateway refused the WebSocket upgrade (`status` and `retryAfterMs` when the
 *   WebSocket implementation lets them be seen), or the connection could not be opened;
 * - `handshake`: the gateway answered the Duplex handshake with a refusal (`-ERR ...`);
 * - `timeout`: no handshake answer in time.
 */
export type ConnectionErrorKind =
  | "not_connected"
  | "connection_lost"
  | "closed"
  | "refused"
  | "handshake"
  | "timeout";

export class ConnectionError extends Error {
  readonly kind: ConnectionErrorKind;
  /** The WebSocket close code, when the connection was closed. */
  readonly closeCode?: number;
  readonly closeReason?: string;
  /** The HTTP status of a refused upgrade, when it could be seen. */
  readonly status?: number;
  /** The gateway's `Retry-After` of a refused upgrade (429/503), in milliseconds. */
  readonly retryAfterMs?: number;

  constructor(
    kind: ConnectionErrorKind,
    message: string,
    extra: { closeCode?: number; closeReason?: string; status?: number; retryAfterMs?: number } = {},
  ) {
    super(message);
    this.name = "ConnectionError";
    this.kind = kind;
    if (extra.closeCode !== undefined) this.closeCode = extra.closeCode;
    if (extra.closeReason) this.closeReason = extra.closeReason;
    if (extra.status !== undefined) this.status = extra.status;
    if (extra.retryAfterMs !== undefined) this.retryAfterMs = extra.retryAfterMs;
  }
}
