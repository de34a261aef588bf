/**
 * Plain HTTP calls (docs/http-api.md): `POST <endpoint>/<method>` with a JSON body; the answer
 * is the reply's payload as JSON, or an NDJSON reply stream (one payload per line).
 */

import { parseRetryAfter } from "./backoff.js";
import { DuplexError, ErrorCode } from "./errors.js";

/** The part of `fetch` this library uses. */
export type FetchLike = (
  input: string,
  init: { method: string; headers: Record<string, string>; body: string; signal?: AbortSignal },
) => Promise<Response>;

export interface HttpOptions {
  /** The endpoint's client secret, sent as `X-Duplex-Secret` (kept out of URLs). */
  secret?: string;
  /** A signed client token (JWT), sent as `Authorization: Bearer`. */
  token?: string;
  /** More request headers (e.g. `traceparent`). */
  headers?: Record<string, string>;
  /** Gives up on the call. */
  signal?: AbortSignal;
  /** The `fetch` to use (default: the global one). */
  fetch?: FetchLike;
}

/** The URL of a call: `base` + `endpoint` + `/` + `method` (`ws(s)://` is taken as `http(s)://`). */
export function callUrl(baseUrl: string, endpoint: string, method: string): string {
  const base = baseUrl.replace(/^ws(s?):\/\//i, (_m, s: string) => `http${s}://`).replace(/\/+$/, "");
  let path = endpoint.trim();
  if (path !== "" && !path.startsWith("/")) path = `/${path}`;
  path = path.replace(/\/+$/, "");
  return `${base}${path}/${method}`;
}

async function post(
  baseUrl: string,
  endpoint: string,
  method: string,
  payload: unknown,
  options: HttpOptions,
  query = "",
): Promise<Response> {
  const fetchImpl = options.fetch ?? (globalThis.fetch as unknown as FetchLike | undefined);
  if (!fetchImpl) throw new TypeError("duplex-gateway-client: no global fetch: pass options.fetch");
  const headers: Record<string, string> = { "content-type": "application/json", ...(options.headers ?? {}) };
  if (options.secret) headers["x-duplex-secret"] = options.secret;
  if (options.token) headers["authorization"] = `Bearer ${options.token}`;
  const init: { method: string; headers: Record<string, string>; body: string; signal?: AbortSignal } = {
    method: "POST",
    headers,
    body: payload === undefined ? "null" : JSON.stringify(payload),
  };
  if (options.signal) init.signal = options.signal;
  const response = await fetchImpl(callUrl(baseUrl, endpoint, method) + query, init);
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** The `DuplexError` of an error answer (4xx/5xx), with `status` and `retryAfterMs`. */
async function errorOf(response: Response): Promise<DuplexError> {
  const retryAfterMs = parseRetryAfter(response.headers.get("retry-after"));
  const extra: { status: number; retryAfterMs?: number } = { status: response.status };
  if (retryAfterMs !== undefined) extra.retryAfterMs = retryAfterMs;
  let text = "";
  try {
    text = await response.text();
  } catch {
    // no body
  }
  try {
    const body = JSON.parse(text);
    if (body && typeof body === "object" && body.error && typeof body.error === "object") {
      return DuplexError.from(body.error, extra);
    }
  } catch {
    // not JSON
  }
  return new DuplexError(response.status, text.trim() || `HTTP ${response.status}`, undefined, extra);
}

function isNdjson(response: Response): boolean {
  return (response.headers.get("content-type") ?? "").toLowerCase().includes("ndjson");
}

/** A line `{"error": {code, message, ...}}`: how the gateway ends a reply stream that failed. */
function streamError(value: unknown): DuplexError | undefined {
  if (!value || typeof value !== "object" || Array.isArray(value)) return undefined;
  const keys = Object.keys(value);
  if (keys.length !== 1 || keys[0] !== "error") return undefined;
  const error = (value as { error: unknown }).error as Record<string, unknown> | null;
  if (!error || typeof error !== "object" || typeof error.code !== "number" || typeof error.message !== "string") {
    return undefined;
  }
  return DuplexError.from(error, { status: 200 });
}

async function* lines(response: Response): AsyncGenerator<string> {
  if (!response.body) {
    for (const line of (await response.text()).split("\n")) if (line.trim()) yield line.trim();
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finished = false;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline: number;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (line) yield line;
      }
    }
    buffer += decoder.decode();
    if (buffer.trim()) yield buffer.trim();
    finished = true;
  } finally {
    if (!finished) await reader.cancel().catch(() => {});
  }
}

function parse(text: string): unknown {
  const t = text.trim();
  if (t === "") return null;
  try {
    return JSON.parse(t);
  } catch {
    throw new DuplexError(ErrorCode.ParseError, `the gateway's answer is not JSON: ${t.slice(0, 200)}`);
  }
}

/** Every payload of an answer: one for a plain reply, one per line for a reply stream. */
async function* payloadsOf(response: Response): AsyncGenerator<unknown> {
  if (!isNdjson(response)) {
    yield parse(await response.text());
    return;
  }
  for await (const line of lines(response)) {
    const value = parse(line);
    const error = streamError(value);
    if (error) throw error;
    yield value;
  }
}

/**
 * One HTTP call: `POST <baseUrl><endpoint>/<method>` with `payload` as the JSON body. Resolves
 * with the reply's payload (for a reply stream: the last one). Rejects with a `DuplexError`
 * (`status` set; `retryAfterMs` on 429/503 with `Retry-After`).
 *
 * ```js
 * await httpCall("http://127.0.0.1:8080", "/demo", "echo", { hi: 1 }, { secret: "s3cret" });
 * ```
 */
export async function httpCall(
  baseUrl: string,
  endpoint: string,
  method: string,
  payload: unknown = null,
  options: HttpOptions = {},
): Promise<unknown> {
  const response = await post(baseUrl, endpoint, method, payload, options);
  let last: unknown = null;
  for await (const value of payloadsOf(response)) last = value;
  return last;
}

/**
 * One HTTP call whose reply payloads are read as they arrive: each line of an NDJSON reply
 * stream (the last one included), or the one payload of a plain reply. A stream that fails
 * midway throws the `DuplexError` of its last line.
 */
export async function* httpStream(
  baseUrl: string,
  endpoint: string,
  method: string,
  payload: unknown = null,
  options: HttpOptions = {},
): AsyncGenerator<unknown, void, undefined> {
  const response = await post(baseUrl, endpoint, method, payload, options);
  yield* payloadsOf(response);
}

/** Fire-and-forget over HTTP (`?async=true`): resolves once the gateway has sent it (202). */
export async function httpNotify(
  baseUrl: string,
  endpoint: string,
  method: string,
  payload: unknown = null,
  options: HttpOptions = {},
): Promise<void> {
  const response = await post(baseUrl, endpoint, method, payload, options, "?async=true");
  await response.text().catch(() => "");
}
