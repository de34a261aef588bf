/** The Duplex protocol's wire format (JSON codec), as duplex-gateway speaks it. */

import type { ErrorObject } from "./errors.js";

/** The handshake the connecting side sends. The gateway answers `+OK` or `-ERR ...`. */
export const HANDSHAKE = "SIMPLEX/1.0;json";

/** Extension metadata: copied from a request onto every reply sent for it. */
export type Ext = Record<string, unknown>;

/** One frame: a request (`type: "req"`) or a reply (`type: "rep"`). */
export interface Message {
  type: "req" | "rep";
  method?: string;
  /** 1 to 2^64-1; absent, null or 0: no reply wanted (fire-and-forget). */
  id?: number | null;
  payload?: unknown;
  /** More frames follow on this id (streamed input, or a reply stream). */
  more?: boolean | null;
  error?: ErrorObject;
  ext?: Ext | null;
  [other: string]: unknown;
}

/** Encodes a request frame. `more` and `ext` are left out when false or absent. */
export function encodeRequest(
  method: string,
  id: number | undefined,
  payload: unknown,
  more: boolean,
  ext: Ext | undefined,
): string {
  const m: Message = { type: "req", method };
  if (id !== undefined) m.id = id;
  m.payload = payload === undefined ? null : payload;
  if (more) m.more = true;
  if (ext !== undefined) m.ext = ext;
  return JSON.stringify(m);
}

/** Encodes a reply frame. */
export function encodeReply(
  id: number,
  payload: unknown,
  more: boolean,
  ext: Ext | undefined,
  error?: ErrorObject,
): string {
  const m: Message = { type: "rep", id };
  if (error) m.error = error;
  else m.payload = payload === undefined ? null : payload;
  if (more) m.more = true;
  if (ext !== undefined) m.ext = ext;
  return JSON.stringify(m);
}

/** A frame's id, when it carries one (absent, null, 0 or not a positive integer: none). */
export function frameId(m: Message): number | undefined {
  return typeof m.id === "number" && Number.isInteger(m.id) && m.id > 0 ? m.id : undefined;
}
