//! A WebSocket client as the multiplexer's side: held to the request rates of its address and
//! its endpoint, and (on an endpoint that takes signed tokens) to its token ([`super::signed`]).

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::duplex::Message;
use crate::mux::{CloseReason, Outcome};
use crate::target::Client;

use super::signed::{self, Signed};
use super::Side;

/// The rates a WebSocket client's calls are held to: its address's
/// (`limits.requests_per_ip_per_second`) and its endpoint's (`endpoints[].calls_per_second`).
pub struct CallLimits {
    /// The edge's state.
    pub edge: Arc<crate::edge::Edge>,
    /// The client's address (None: unknown, no per-address limit).
    pub ip: Option<std::net::IpAddr>,
    /// The endpoint's bucket, if it has a rate.
    pub endpoint: Option<Arc<crate::edge::EndpointBucket>>,
}

/// A client whose requests are held to its [`CallLimits`]: a request over a rate is answered
/// `-32004` (with `data.retry_after_ms`) and never reaches the backend.
pub struct LimitedClient {
    client: Client,
    limits: CallLimits,
    /// Its token, on an endpoint that takes them.
    signed: Option<Box<Signed>>,
    /// Why it was closed, when its token ended it.
    lost: Option<CloseReason>,
    /// The `ext` of its open calls whose requests the gateway changed (`ext.traceparent`
    /// re-parented, `ext.auth` set), as the client sent it: its replies get it back as it was.
    own_ext: Vec<(u64, Option<Box<RawValue>>)>,
    /// Its calls' access lines (with `log.access`).
    access: Option<Box<crate::access::WsCalls>>,
}

impl LimitedClient {
    /// `client`, held to `limits` and (if given) to its token.
    pub fn new(client: Client, limits: CallLimits, signed: Option<Signed>) -> LimitedClient {
        LimitedClient {
            client,
            limits,
            signed: signed.map(Box::new),
            lost: None,
            own_ext: Vec::new(),
            access: None,
        }
    }

    /// Writes an access line for each call of the client as it ends.
    pub fn with_access_log(mut self, calls: crate::access::WsCalls) -> LimitedClient {
        self.access = Some(Box::new(calls));
        self
    }

    /// A frame for the client: a reply to a call whose request the gateway changed gets the
    /// client's own `ext` back (and the call is forgotten when it ends).
    fn restore(&mut self, msg: Message) -> String {
        let msg = self.restore_message(msg);
        let json = msg.to_json();
        if let Some(access) = &mut self.access {
            let client = &self.client;
            access.reply(&msg, json.len(), || client.backend());
        }
        json
    }

    fn restore_message(&mut self, mut msg: Message) -> Message {
        if self.own_ext.is_empty() || msg.kind() != crate::duplex::Kind::Reply {
            return msg;
        }
        let Some(id) = msg.id() else {
            return msg;
        };
        if let Some(at) = self.own_ext.iter().position(|(open, _)| *open == id) {
            let own = if msg.ends_call() {
                self.own_ext.swap_remove(at).1
            } else {
                self.own_ext[at].1.clone()
            };
            // The common case: the client sent no `ext`, and the backend copied back exactly
            // the stamp: the reply goes without one.
            let bare = own.is_none()
                && self
                    .signed
                    .as_ref()
                    .zip(msg.ext_raw())
                    .is_some_and(|(signed, ext)| signed.is_bare_stamp(ext));
            if bare {
                msg.set_ext(None);
                return msg;
            }
            // The keys the gateway changed go back to the client's; keys the backend added
            // stay (as the multiplexer does for `route`).
            let mut ext = msg.ext().unwrap_or_default();
            ext.remove("auth");
            ext.remove("traceparent");
            if let Some(own) = own.and_then(|raw| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw.get()).ok()
            }) {
                ext.extend(own);
            }
            msg.set_ext(if ext.is_empty() { None } else { Some(&ext) });
        }
        msg
    }

    fn admit(&self) -> Result<(), crate::edge::Limited> {
        if let Some(ip) = self.limits.ip {
            self.limits.edge.request(ip)?;
        }
        match &self.limits.endpoint {
            Some(bucket) => bucket.take(),
            None => Ok(()),
        }
    }
}

impl Side for LimitedClient {
    async fn on_frame(&mut self, msg: Message, bytes: usize) -> Outcome {
        if self.access.is_none() {
            return self.pass(msg, bytes).await;
        }
        let outcome = self.pass(msg, bytes).await;
        if let (Outcome::Answer(answer), Some(access)) = (&outcome, &mut self.access) {
            // The gateway answered the call itself (a rate, a limit, `$refresh`).
            access.reply(answer, answer.to_json().len(), || None);
        }
        outcome
    }
    fn on_malformed(&mut self, error: &crate::duplex::ParseError) {
        self.client.malformed(error);
    }
    async fn next_out(&mut self) -> Option<String> {
        let Some(signed) = &mut self.signed else {
            let msg = self.client.recv().await?;
            return Some(self.restore(msg));
        };
        let msg = tokio::select! {
            out = self.client.recv() => out?,
            reason = signed.lost() => {
                self.lost = Some(reason);
                return None;
            }
        };
        Some(self.restore(msg))
    }
    fn try_next_out(&mut self) -> Option<String> {
        let msg = self.client.try_recv()?;
        Some(self.restore(msg))
    }
    fn close_reason(&self) -> CloseReason {
        match &self.lost {
            Some(reason) => reason.clone(),
            None => self.client.close_reason(),
        }
    }
}

impl LimitedClient {
    /// A frame from the client: held to its rates, `$refresh` answered, its request's trace
    /// context re-parented and its identity stamped, then on to the backend.
    async fn pass(&mut self, mut msg: Message, bytes: usize) -> Outcome {
        if msg.kind() == crate::duplex::Kind::Request {
            if let Err(limited) = self.admit() {
                crate::metrics::metrics().reject(limited.reason);
                let Some(id) = msg.id() else {
                    return Outcome::Done;
                };
                let millis = u64::try_from(limited.retry_after.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1);
                let error =
                    crate::duplex::RpcError::new(crate::duplex::code::RATE_LIMITED, "rate limited")
                        .with_data(serde_json::json!({ "retry_after_ms": millis }));
                let mut reply = Message::error_reply(Some(id), &error);
                if let Some(ext) = msg.ext_raw() {
                    reply.set_raw("ext", ext.to_owned());
                }
                if let Some(access) = &mut self.access {
                    // Refused, but a call all the same: its line says -32004.
                    access.request(&msg, bytes, None);
                }
                return Outcome::Answer(reply);
            }
            if signed::is_refresh(&msg) {
                return Outcome::Answer(match &mut self.signed {
                    Some(signed) => signed.refresh(&msg),
                    None => signed::refresh_refused(&msg),
                });
            }
            // The client's own `ext`, kept only for a request the gateway is about to change.
            let own = if self.signed.is_some() || crate::trace::may_carry(&msg) {
                msg.ext_raw().map(|raw| raw.to_owned())
            } else {
                None
            };
            let hop = crate::trace::reparent(&mut msg);
            if let Some(access) = &mut self.access {
                access.request(&msg, bytes, hop);
            }
            let mut changed = hop.is_some();
            if let Some(signed) = &self.signed {
                signed.stamp(&mut msg);
                changed = true;
            }
            if let (true, Some(id)) = (changed, msg.id()) {
                self.own_ext.retain(|(open, _)| *open != id);
                self.own_ext.push((id, own));
                return match self.client.send(msg).await {
                    // The gateway answered it itself: the call is over.
                    Outcome::Answer(answer) => {
                        let answer = self.restore_message(answer);
                        self.own_ext.retain(|(open, _)| *open != id);
                        Outcome::Answer(answer)
                    }
                    Outcome::Done => Outcome::Done,
                };
            }
        } else if let Some(signed) = &self.signed {
            // A reply to a backend's call carries the gateway's `ext.auth` too, never one of
            // the client's making.
            signed.stamp(&mut msg);
        }
        self.client.send(msg).await
    }
}
