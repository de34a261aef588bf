/**
 * Reconnect without storms (SPEC 17): exponential backoff with FULL jitter, from 0.5 s up to
 * 30 s, honouring the gateway's `Retry-After`.
 */

/** How a peer reconnects after a lost connection. Every field is optional. */
export interface ReconnectOptions {
  /** The first attempt's cap, in ms (default 500). */
  initialMs?: number;
  /** The largest cap, in ms (default 30 000). */
  maxMs?: number;
  /**
   * Close codes after which the peer never reconnects. Default: `[1008]` for a client,
   * `[1008, 1012]` for a backend (1012: a newer backend replaced it; publishing again would
   * replace that one in turn).
   */
  stopCodes?: number[];
  /** A source of randomness in [0, 1) (default `Math.random`); for tests. */
  random?: () => number;
}

export const DEFAULT_INITIAL_MS = 500;
export const DEFAULT_MAX_MS = 30_000;

/** The cap of attempt `attempt` (0 for the first): `min(maxMs, initialMs * 2^attempt)`. */
export function backoffCap(
  attempt: number,
  initialMs: number = DEFAULT_INITIAL_MS,
  maxMs: number = DEFAULT_MAX_MS,
): number {
  const a = Math.max(0, Math.floor(attempt));
  return Math.min(maxMs, initialMs * 2 ** a);
}

/** Full jitter: a random delay in `[0, backoffCap(attempt)]`. */
export function backoffDelay(attempt: number, options: ReconnectOptions = {}): number {
  const random = options.random ?? Math.random;
  const cap = backoffCap(attempt, options.initialMs ?? DEFAULT_INITIAL_MS, options.maxMs ?? DEFAULT_MAX_MS);
  const r = Math.min(1, Math.max(0, random()));
  return Math.round(r * cap);
}

/**
 * The delay before reconnect attempt `attempt`: the full-jitter backoff, added to the gateway's
 * `Retry-After` when it sent one. Waiting at least `Retry-After` honours it; adding the jitter
 * keeps the clients that were all refused at the same moment from all coming back at once.
 */
export function reconnectDelay(
  attempt: number,
  retryAfterMs: number | undefined,
  options: ReconnectOptions = {},
): number {
  const jitter = backoffDelay(attempt, options);
  return retryAfterMs !== undefined && retryAfterMs > 0 ? retryAfterMs + jitter : jitter;
}

/**
 * Parses a `Retry-After` header value: whole seconds, or an HTTP date. Returns milliseconds
 * (at least 0), or `undefined` when there is none or it does not parse.
 */
export function parseRetryAfter(
  value: string | string[] | null | undefined,
  now: number = Date.now(),
): number | undefined {
  if (Array.isArray(value)) value = value[0];
  if (value === null || value === undefined) return undefined;
  const text = String(value).trim();
  if (text === "") return undefined;
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  if (/^\d+\.\d+$/.test(text)) return Math.round(Number(text) * 1000);
  const date = Date.parse(text);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, date - now);
}
