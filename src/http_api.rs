//! Plain HTTP calls: `POST <endpoint>/<method>` with a JSON body. Each call is a short-lived
//! client of the multiplexer with its own route key, so it shares the backend connection with
//! WebSocket clients without collisions.
//!
//! Answers: `200` with the reply payload (`application/json`); `200` with one payload per line
//! (`application/x-ndjson`, chunked) for a reply stream; `202` at once for `async=true`; errors as
//! `{"error": {...}}` with the statuses of `docs/http-api.md`.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde_json::value::RawValue;

use crate::auth::Digest;
use crate::config::Config;
use crate::duplex::{code, Kind, Message, RpcError};
use crate::identity::Identity;
use crate::metrics::{metrics, Rejection};
use crate::mux::Outcome;
use crate::refusal::{respond, Refusal};
use crate::target::Client;
use crate::target::Target;

/// The status recorded for a call whose caller hung up before the reply (nginx's 499).
const CLIENT_CLOSED: u16 = 499;

/// How long one write of a response may take.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An HTTP call the status table let through.
pub struct Call<'a> {
    /// The endpoint called.
    pub endpoint: &'a Target,
    /// The method segment of the path.
    pub method: &'a str,
    /// The digest of the caller's secret (checked).
    pub secret: Digest,
    /// Who the caller is (its signed token, checked), stamped on the call as `ext.auth`.
    pub identity: Option<&'a Identity>,
    /// The gateway's hop of the call's trace, carried to the backend as `ext.traceparent`.
    pub trace: crate::trace::TraceParent,
    /// Set to the backend that took the call (its id in the pool), when this node knows it.
    pub served_by: &'a mut Option<String>,
    /// `async=true`: answer 202 once sent.
    pub is_async: bool,
    /// When the request arrived (`call_timeout` counts from here).
    pub started: Instant,
    /// Headers every answer carries (CORS, for a browser's allowed origin).
    pub headers: &'a [(&'a str, &'a str)],
}

/// Serves one `POST` that the status table let through: reads the body, sends the call, writes
/// the answer. Returns the status answered (the caller counts it in the endpoint's series).
pub async fn serve(session: &mut Session, config: &Config, call: Call<'_>) -> pingora::Result<u16> {
    // A caller that stops reading its reply must not hold the call forever.
    session.set_write_timeout(Some(WRITE_TIMEOUT));
    // `call_timeout` covers the whole call, from its arrival to its reply.
    let deadline = config
        .limits
        .call_timeout
        .map(|t| tokio::time::Instant::from_std(call.started) + t);
    run(session, config, call, deadline).await
}

/// The call itself; returns the status answered.
async fn run(
    session: &mut Session,
    config: &Config,
    call: Call<'_>,
    deadline: Option<tokio::time::Instant>,
) -> pingora::Result<u16> {
    let Call {
        endpoint,
        method,
        secret,
        identity,
        trace,
        served_by,
        is_async,
        headers,
        ..
    } = call;
    let max = config.limits.max_http_body_bytes;
    // The body counts against the call's time too: a trickled body cannot hold a call.
    let body = match until(deadline, read_body(session, max, headers)).await {
        Ok(read) => match read? {
            Ok(body) => body,
            Err(status) => return Ok(status),
        },
        Err(_) => return timed_out(session, headers).await,
    };
    let payload: Box<RawValue> = if body.iter().all(u8::is_ascii_whitespace) {
        RawValue::from_string("null".into()).map_err(internal)?
    } else {
        match serde_json::from_slice::<&RawValue>(&body) {
            Ok(raw) => raw.to_owned(),
            Err(e) => {
                let refusal = Refusal::new(
                    400,
                    Some(Rejection::BadJson),
                    format!("the body is not JSON: {e}"),
                );
                return refusal.send(session, headers).await;
            }
        }
    };

    let mut conn = match endpoint.join(false, config.max_clients(endpoint.path()), secret) {
        Ok(conn) => conn,
        Err(e) => return Refusal::join(e).send(session, headers).await,
    };

    let request = |id| {
        let mut request = Message::request_raw(method, id, payload);
        // The stamp first: on a frame without `ext` it costs no decoding.
        if let Some(identity) = identity {
            identity.stamp(&mut request);
        }
        crate::trace::set(&mut request, &trace);
        request
    };
    if is_async {
        let request = request(None);
        match until(deadline, conn.send(request)).await {
            Ok(Outcome::Done) => *served_by = conn.backend(),
            Ok(Outcome::Answer(answer)) => {
                return respond_own_error(session, &answer, headers).await
            }
            Err(_) => return timed_out(session, headers).await,
        }
        respond(
            session,
            202,
            "application/json",
            Bytes::from_static(br#"{"accepted":true}"#),
            headers,
        )
        .await?;
        return Ok(202);
    }

    let request = request(Some(1));
    // The send may wait: for a backend in its grace, or for room in a backend's queue.
    match until(deadline, conn.send(request)).await {
        Ok(Outcome::Done) => *served_by = conn.backend(),
        Ok(Outcome::Answer(answer)) => return respond_own_error(session, &answer, headers).await,
        Err(_) => return timed_out(session, headers).await,
    }
    wait_for_reply(session, conn, config, deadline, headers).await
}

/// Runs `work` until `deadline` (None: no deadline).
async fn until<T>(
    deadline: Option<tokio::time::Instant>,
    work: impl std::future::Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at, work).await,
        None => Ok(work.await),
    }
}

/// 504: no reply in time.
async fn timed_out(session: &mut Session, headers: Headers<'_>) -> pingora::Result<u16> {
    let error = RpcError::new(code::CALL_TIMED_OUT, "no reply in time");
    finish_with_error(session, false, 504, &error, headers).await
}

/// Headers every answer of a call carries.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// Waits for the reply (or reply stream) of the call and writes it.
async fn wait_for_reply(
    session: &mut Session,
    mut conn: Client,
    config: &Config,
    deadline: Option<tokio::time::Instant>,
    headers: Headers<'_>,
) -> pingora::Result<u16> {
    let timeout = config.limits.call_timeout;
    let mut streaming = false;
    let mut watch_caller = true;
    loop {
        // The first reply is due by the call's deadline; once a reply stream runs, each next
        // line is due within `call_timeout` of the previous one.
        let due = match (streaming, timeout) {
            (false, _) => deadline,
            (true, Some(t)) => Some(tokio::time::Instant::now() + t),
            (true, None) => None,
        };
        let wait = until(due, next_reply(&mut conn));
        let next = tokio::select! {
            next = wait => next,
            // The caller hanging up ends the call at once: nothing is left waiting for it.
            idle = session.read_body_or_idle(true), if watch_caller => {
                match idle {
                    Err(e) if matches!(
                        e.etype(),
                        pingora::ErrorType::ConnectionClosed | pingora::ErrorType::ReadError
                    ) => return Ok(CLIENT_CLOSED),
                    // Anything else (say, a pipelined next request): stop watching, keep waiting
                    // for the reply.
                    _ => {
                        watch_caller = false;
                        continue;
                    }
                }
            }
        };
        let msg = match next {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                let reason = conn.close_reason();
                if reason.code == crate::mux::close::POLICY
                    && reason.reason == crate::cluster::served::SECRET_REFUSED
                {
                    // The node serving it across the cluster no longer takes its secret.
                    metrics().reject(Rejection::BadSecret);
                    let error = RpcError::new(401, "missing or wrong secret");
                    return finish_with_error(session, streaming, 401, &error, headers).await;
                }
                // The multiplexer closed this caller: the endpoint is gone.
                let error = RpcError::new(code::BACKEND_UNAVAILABLE, "backend unavailable");
                return finish_with_error(session, streaming, 503, &error, headers).await;
            }
            Err(_) => {
                let error = RpcError::new(code::CALL_TIMED_OUT, "no reply in time");
                return finish_with_error(session, streaming, 504, &error, headers).await;
            }
        };
        if msg.is_error() {
            if streaming {
                let line = error_body(&msg);
                write_chunk(session, line, true).await?;
                return Ok(200);
            }
            return respond_rpc_error(session, &msg, headers).await;
        }
        if !streaming && !msg.more() {
            let body = Bytes::from(msg.payload_raw().to_string());
            respond(session, 200, "application/json", body, headers).await?;
            return Ok(200);
        }
        if !streaming {
            streaming = true;
            let mut resp = ResponseHeader::build_no_case(200, Some(4))?;
            resp.insert_header("content-type", "application/x-ndjson")?;
            // HTTP/2 frames the body itself (and forbids this header).
            if session.req_header().version != http::Version::HTTP_2 {
                resp.insert_header("transfer-encoding", "chunked")?;
            }
            resp.insert_header("cache-control", "no-cache")?;
            for (name, value) in headers {
                resp.insert_header(name.to_string(), *value)?;
            }
            session.write_response_header(Box::new(resp), false).await?;
        }
        let mut line = BytesMut::with_capacity(msg.payload_raw().len() + 1);
        line.extend_from_slice(msg.payload_raw().as_bytes());
        line.extend_from_slice(b"\n");
        let last = !msg.more();
        write_chunk(session, line.freeze(), last).await?;
        if last {
            return Ok(200);
        }
    }
}

/// The next reply for this call. Calls the backend makes to an HTTP caller are answered with
/// `-32601`: an HTTP caller has no methods.
async fn next_reply(conn: &mut Client) -> Option<Message> {
    loop {
        let msg = conn.recv().await?;
        match msg.kind() {
            Kind::Reply => return Some(msg),
            Kind::Request => {
                if let Some(id) = msg.id() {
                    let method = msg.method().unwrap_or_default();
                    let reply =
                        Message::error_reply(Some(id), &RpcError::method_not_found(&method));
                    // The backend's call gets its -32601; the gateway has nothing to add.
                    let _ = conn.send(reply).await;
                }
            }
        }
    }
}

async fn write_chunk(session: &mut Session, data: Bytes, end: bool) -> pingora::Result<()> {
    session.write_response_body(Some(data), end).await
}

/// Ends the call with a gateway-made error: a status, or an error line in a stream.
async fn finish_with_error(
    session: &mut Session,
    streaming: bool,
    status: u16,
    error: &RpcError,
    headers: Headers<'_>,
) -> pingora::Result<u16> {
    let body = serde_json::json!({ "error": error }).to_string();
    if streaming {
        write_chunk(session, Bytes::from(body + "\n"), true).await?;
        return Ok(200);
    }
    respond(
        session,
        status,
        "application/json",
        Bytes::from(body),
        headers,
    )
    .await?;
    Ok(status)
}

/// `{"error": <the reply's error object as the backend sent it>}`.
fn error_body(msg: &Message) -> Bytes {
    let raw = msg.raw_field("error").map_or("null", RawValue::get);
    let mut body = String::with_capacity(raw.len() + 12);
    body.push_str(r#"{"error":"#);
    body.push_str(raw);
    body.push_str("}\n");
    Bytes::from(body)
}

/// The HTTP status for an error reply.
pub fn status_for(error_code: i64) -> u16 {
    match error_code {
        code::METHOD_NOT_FOUND => 501,
        code::INVALID_PARAMS => 400,
        code::BACKEND_UNAVAILABLE => 503,
        _ => 500,
    }
}

async fn respond_rpc_error(
    session: &mut Session,
    msg: &Message,
    headers: Headers<'_>,
) -> pingora::Result<u16> {
    respond_error_with(
        session,
        msg,
        headers,
        status_for(msg.error().map_or(0, |e| e.code)),
    )
    .await
}

/// The gateway's own answer to a call it did not send on (no backend, or its queues full): as
/// a backend's error, but `-32003` (an HTTP call is one call: the gateway's queues are what is
/// full) is a 503.
async fn respond_own_error(
    session: &mut Session,
    msg: &Message,
    headers: Headers<'_>,
) -> pingora::Result<u16> {
    let status = match msg.error().map_or(0, |e| e.code) {
        code::TOO_MANY_PENDING_CALLS => 503,
        other => status_for(other),
    };
    respond_error_with(session, msg, headers, status).await
}

async fn respond_error_with(
    session: &mut Session,
    msg: &Message,
    headers: Headers<'_>,
    status: u16,
) -> pingora::Result<u16> {
    respond(
        session,
        status,
        "application/json",
        error_body(msg),
        headers,
    )
    .await?;
    Ok(status)
}

/// Reads the request body up to `max` bytes. `Err(status)` when it has already been answered
/// (413). A `Content-Length` over the limit is refused before reading anything.
async fn read_body(
    session: &mut Session,
    max: usize,
    headers: Headers<'_>,
) -> pingora::Result<Result<Bytes, u16>> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let too_large = || {
        Refusal::new(
            413,
            Some(Rejection::TooLarge),
            format!("the body is over the limit of {max} bytes"),
        )
    };
    if declared.is_some_and(|len| len > max as u64) {
        return Ok(Err(too_large().send(session, headers).await?));
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    // Pingora turns keep-alive off when any response header, the interim 100 included, is
    // written before the body is read; it is turned back on once the body has been read whole.
    let keepalive = session.get_keepalive();
    if expects_continue {
        session.write_continue_response().await?;
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > max {
            return Ok(Err(too_large().send(session, headers).await?));
        }
        body.extend_from_slice(&chunk);
    }
    if expects_continue {
        session.set_keepalive(keepalive);
    }
    Ok(Ok(body.freeze()))
}

fn internal(e: serde_json::Error) -> Box<pingora::Error> {
    pingora::Error::because(pingora::ErrorType::InternalError, "payload", e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_statuses() {
        assert_eq!(status_for(code::METHOD_NOT_FOUND), 501);
        assert_eq!(status_for(code::INVALID_PARAMS), 400);
        assert_eq!(status_for(code::BACKEND_UNAVAILABLE), 503);
        // A backend's own -32002 or -32003 is "any other error".
        assert_eq!(status_for(code::CALL_TIMED_OUT), 500);
        assert_eq!(status_for(code::TOO_MANY_PENDING_CALLS), 500);
        assert_eq!(status_for(-1), 500);
        assert_eq!(status_for(code::INVALID_MESSAGE), 500);
    }
}
