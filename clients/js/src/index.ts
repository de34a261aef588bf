/**
 * duplex-gateway-client: Duplex RPC over WebSocket and HTTP for duplex-gateway, in browsers and
 * Node.js 20+. No dependencies: the platform's WebSocket (or one passed in) and fetch.
 */
export { DuplexClient, toWebSocketUrl } from "./client.js";
export type { ClientOptions, RefreshResult, TokenSource } from "./client.js";
export { DuplexBackend, BackendBuilder } from "./backend.js";
export type { BackendOptions } from "./backend.js";
export { Peer, ReplyStream, redact } from "./peer.js";
export type {
  Call,
  CallOptions,
  CloseInfo,
  Handler,
  InputCall,
  PeerOptions,
  State,
  StatusEvent,
  WebSocketConstructor,
  WebSocketLike,
} from "./peer.js";
export { DuplexError, ConnectionError, ErrorCode } from "./errors.js";
export type { ConnectionErrorKind, ErrorObject } from "./errors.js";
export { httpCall, httpStream, httpNotify, callUrl } from "./http.js";
export type { FetchLike, HttpOptions } from "./http.js";
export {
  backoffCap,
  backoffDelay,
  reconnectDelay,
  parseRetryAfter,
  DEFAULT_INITIAL_MS,
  DEFAULT_MAX_MS,
} from "./backoff.js";
export type { ReconnectOptions } from "./backoff.js";
export { HANDSHAKE, encodeRequest, encodeReply } from "./protocol.js";
export type { Ext, Message } from "./protocol.js";

/** This package's version. */
export const VERSION = "0.1.0";
