//! A WebSocket client's signed token for as long as it is connected: the identity stamped on
//! its requests (`ext.auth`), `$refresh`, and the close at expiry or when a reload's keys no
//! longer verify it.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::duplex::{code, Message};
use crate::identity::{Identity, JwtAuth};
use crate::mux::{close, local_error, CloseReason};

/// The endpoint's token keys in force (read again after every reload; None once the endpoint
/// no longer takes tokens).
pub type Keys = Box<dyn Fn() -> Option<Arc<JwtAuth>> + Send + Sync>;

/// A connected client's token.
pub struct Signed {
    identity: Arc<Identity>,
    /// Kept to check again when the keys change (never logged).
    token: String,
    keys: Keys,
    reloads: watch::Receiver<()>,
    /// Expiry, leeway included: one timer for the connection's life, moved when a refresh or
    /// a reload changes it (a timer made on each wait would cost every reply its registration).
    expiry: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Signed {
    /// A client admitted with `token` (verified as `identity`); `keys` gives the endpoint's keys
    /// in force, `reloads` changes after each reload.
    pub fn new(
        identity: Arc<Identity>,
        token: String,
        keys: Keys,
        mut reloads: watch::Receiver<()>,
    ) -> Signed {
        // Checked again against the keys in force as soon as it is served: a reload between
        // the upgrade's check and this subscription is not missed (a token seen before costs a
        // look-up).
        reloads.mark_changed();
        let leeway = keys().map_or_else(Default::default, |k| k.leeway());
        Signed {
            expiry: Box::pin(tokio::time::sleep_until(
                Instant::now() + identity.remaining(leeway),
            )),
            identity,
            token,
            keys,
            reloads,
        }
    }

    /// Sets `ext.auth` on a request of the client.
    pub fn stamp(&self, msg: &mut Message) {
        self.identity.stamp(msg);
    }

    /// Whether `ext` is exactly what a stamp gives a frame that had none.
    pub fn is_bare_stamp(&self, ext: &serde_json::value::RawValue) -> bool {
        ext.get() == self.identity.ext_alone().get()
    }

    /// Answers `$refresh`: a valid token for the same `sub` replaces the one in force (and its
    /// expiry); anything else is refused with `-32602` and changes nothing.
    pub fn refresh(&mut self, msg: &Message) -> Message {
        match self.renew(msg) {
            Ok(exp) => {
                let mut answer = Message::reply(msg.id(), &json!({ "exp": exp }), false);
                if let Some(ext) = msg.ext_raw() {
                    answer.set_raw("ext", ext.to_owned());
                }
                answer
            }
            Err(why) => local_error(msg, code::INVALID_PARAMS, &why),
        }
    }

    fn renew(&mut self, msg: &Message) -> Result<u64, String> {
        let serde_json::Value::String(token) = msg.payload() else {
            return Err("$refresh takes the new token (a string) as its payload".into());
        };
        let keys = (self.keys)().ok_or("this endpoint no longer takes tokens")?;
        let identity = keys.verify(&token).map_err(|e| e.to_string())?;
        if identity.sub != self.identity.sub {
            return Err("the new token is for another `sub`".into());
        }
        self.expiry
            .as_mut()
            .reset(Instant::now() + identity.remaining(keys.leeway()));
        let exp = identity.exp;
        self.identity = identity;
        self.token = token;
        Ok(exp)
    }

    /// Resolves when the client must go: its token expired, or the keys of a reload no longer
    /// verify it. Cancel-safe: the caller selects on it with the client's traffic.
    pub async fn lost(&mut self) -> CloseReason {
        loop {
            tokio::select! {
                _ = &mut self.expiry => {
                    return CloseReason::new(close::POLICY, "token expired");
                }
                changed = self.reloads.changed() => {
                    if changed.is_err() {
                        // No more reloads (the gateway is stopping): only the expiry is left.
                        (&mut self.expiry).await;
                        return CloseReason::new(close::POLICY, "token expired");
                    }
                    let Some(keys) = (self.keys)() else {
                        // The endpoint no longer takes tokens: nothing to check.
                        continue;
                    };
                    match keys.verify(&self.token) {
                        Ok(identity) => {
                            self.expiry
                                .as_mut()
                                .reset(Instant::now() + identity.remaining(keys.leeway()));
                            self.identity = identity;
                        }
                        Err(_) => {
                            return CloseReason::new(close::POLICY, "token no longer valid");
                        }
                    }
                }
            }
        }
    }
}

/// `$refresh` on an endpoint that takes no tokens.
pub fn refresh_refused(msg: &Message) -> Message {
    local_error(
        msg,
        code::METHOD_NOT_FOUND,
        "$refresh: this endpoint takes no tokens",
    )
}

/// Whether `msg` calls `$refresh` (read without decoding the method).
pub fn is_refresh(msg: &Message) -> bool {
    msg.raw_field("method").map(|m| m.get()) == Some("\"$refresh\"")
}
