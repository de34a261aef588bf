//! A WebSocket client as the multiplexer's side: held to the request rates of its address and
//! its endpoint, and (on an endpoint that takes signed tokens) to its token ([`super::signed`]).

use std::sync::Arc;

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
}

impl LimitedClient {
    /// `client`, held to `limits` and (if given) to its token.
    pub fn new(client: Client, limits: CallLimits, signed: Option<Signed>) -> LimitedClient {
        LimitedClient {
            client,
            limits,
            signed: signed.map(Box::new),
            lost: None,
        }
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
    async fn on_frame(&mut self, mut msg: Message) -> Outcome {
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
                return Outcome::Answer(reply);
            }
            if signed::is_refresh(&msg) {
                return Outcome::Answer(match &mut self.signed {
                    Some(signed) => signed.refresh(&msg),
                    None => signed::refresh_refused(&msg),
                });
            }
            if let Some(signed) = &self.signed {
                signed.stamp(&mut msg);
            }
        }
        self.client.send(msg).await
    }
    fn on_malformed(&mut self, error: &crate::duplex::ParseError) {
        self.client.malformed(error);
    }
    async fn next_out(&mut self) -> Option<String> {
        let Some(signed) = &mut self.signed else {
            return self.client.recv().await.map(|m| m.to_json());
        };
        tokio::select! {
            out = self.client.recv() => out.map(|m| m.to_json()),
            reason = signed.lost() => {
                self.lost = Some(reason);
                None
            }
        }
    }
    fn try_next_out(&mut self) -> Option<String> {
        self.client.try_recv().map(|m| m.to_json())
    }
    fn close_reason(&self) -> CloseReason {
        match &self.lost {
            Some(reason) => reason.clone(),
            None => self.client.close_reason(),
        }
    }
}
