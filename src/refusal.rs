//! The gateway's own answers: a [`Refusal`] (status, reason, message and headers, counted and
//! logged once, answered as `{"error": {...}}`), and responses written whole.

use std::borrow::Cow;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::edge::Limited;
use crate::metrics::{metrics, Rejection};
use crate::mux::JoinError;

/// A request that goes no further: everything its answer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// The `reason` it is counted under in `duplex_gateway_rejected_requests_total`, if any.
    pub reason: Option<Rejection>,
    /// What went wrong, for the error body and the log.
    pub message: Cow<'static, str>,
    /// Headers of its own (`Allow`, `Upgrade`).
    pub headers: &'static [(&'static str, &'static str)],
    /// `Retry-After`, in seconds (a 429).
    pub retry_after: Option<u64>,
    /// The publishing token's name, when known (for the log line).
    pub token: Option<String>,
}

impl Refusal {
    /// A refusal with `status`, counted under `reason` (if any).
    pub fn new(
        status: u16,
        reason: Option<Rejection>,
        message: impl Into<Cow<'static, str>>,
    ) -> Refusal {
        Refusal {
            status,
            reason,
            message: message.into(),
            headers: &[],
            retry_after: None,
            token: None,
        }
    }

    /// With headers of its own.
    pub fn with_headers(self, headers: &'static [(&'static str, &'static str)]) -> Refusal {
        Refusal { headers, ..self }
    }

    /// Naming the publishing token in the log line.
    pub fn with_token(self, name: &str) -> Refusal {
        Refusal {
            token: Some(name.to_string()),
            ..self
        }
    }

    /// 429 for a client over one of the edge's limits, with `Retry-After`.
    pub fn limited(limited: Limited) -> Refusal {
        Refusal {
            retry_after: Some(limited.retry_after_secs()),
            ..Refusal::new(429, Some(limited.reason), limited.message())
        }
    }

    /// A client that could not join its endpoint: 404, 401 or 503.
    pub fn join(e: JoinError) -> Refusal {
        match e {
            JoinError::NotFound => Refusal::new(
                404,
                Some(Rejection::NotFound),
                "no backend is published at this endpoint",
            ),
            JoinError::BadSecret => {
                Refusal::new(401, Some(Rejection::BadSecret), "missing or wrong secret")
            }
            JoinError::Full => Refusal::new(
                503,
                Some(Rejection::Full),
                "this endpoint has all the clients it may have",
            ),
        }
    }

    /// Whether it tells of a failed authentication (the edge counts those per address).
    pub fn is_auth_failure(&self) -> bool {
        matches!(self.status, 401 | 403)
    }

    /// Counts it (when it has a reason), logs one line (with the publishing token's name when
    /// known; never a credential, never the query string), and answers `{"error": {...}}` with
    /// its headers and `extra` (CORS). Returns the status.
    pub async fn send(
        &self,
        session: &mut Session,
        extra: &[(&str, &str)],
    ) -> pingora::Result<u16> {
        if let Some(reason) = self.reason {
            metrics().reject(reason);
        }
        let req = session.req_header();
        tracing::info!(
            status = self.status,
            reason = self.reason.map_or("-", Rejection::as_str),
            token = %self.token.as_deref().unwrap_or("-"),
            method = %req.method,
            path = ?crate::auth::logged(req.uri.path()),
            // A message may quote the path: cut like one.
            "refused: {}",
            crate::auth::logged(&self.message)
        );
        let retry_after = self.retry_after.map(|secs| secs.to_string());
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .copied()
            .chain(retry_after.as_deref().map(|secs| ("retry-after", secs)))
            .chain(extra.iter().copied())
            .collect();
        respond_error(session, self.status, &self.message, &headers).await?;
        Ok(self.status)
    }
}

/// Writes a whole response. A request whose body was not read to the end closes the connection
/// afterwards, so unread bytes are never taken for the next request.
pub async fn respond(
    session: &mut Session,
    status: u16,
    content_type: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> pingora::Result<()> {
    // No header-name case map: the names are ours, written in lower case (as HTTP/2 would).
    let mut resp = ResponseHeader::build_no_case(status, Some(4 + headers.len()))?;
    resp.insert_header("content-type", content_type)?;
    resp.insert_header("content-length", body.len().to_string())?;
    for (name, value) in headers {
        resp.insert_header(name.to_string(), *value)?;
    }
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Answers with `status`, no body, and `headers` (a CORS preflight's 204).
pub async fn respond_empty(
    session: &mut Session,
    status: u16,
    headers: &[(&str, &str)],
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build_no_case(status, Some(1 + headers.len()))?;
    for (name, value) in headers {
        resp.insert_header(name.to_string(), *value)?;
    }
    resp.insert_header("content-length", "0")?;
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), true).await
}

/// Writes `{"error": {"code": status, "message": message}}` with `status`.
pub async fn respond_error(
    session: &mut Session,
    status: u16,
    message: &str,
    headers: &[(&str, &str)],
) -> pingora::Result<()> {
    let body = serde_json::json!({ "error": { "code": status, "message": message } }).to_string();
    respond(
        session,
        status,
        "application/json",
        Bytes::from(body),
        headers,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_owns_its_status_reason_and_headers() {
        let r = Refusal::join(JoinError::Full);
        assert_eq!((r.status, r.reason), (503, Some(Rejection::Full)));
        assert_eq!(Refusal::join(JoinError::BadSecret).status, 401);
        assert!(Refusal::join(JoinError::BadSecret).is_auth_failure());
        assert_eq!(Refusal::join(JoinError::NotFound).status, 404);
        let allow = Refusal::new(405, None, "no").with_headers(&[("allow", "GET, POST")]);
        assert_eq!(allow.headers, &[("allow", "GET, POST")]);
        let named = Refusal::new(403, Some(Rejection::TokenScope), "scope").with_token("ci");
        assert_eq!(named.token.as_deref(), Some("ci"));
    }
}
