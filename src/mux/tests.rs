//! The multiplexer end to end, without a socket: a registry, backends and clients.

use super::*;
use crate::duplex::{Kind, Message};
use serde_json::{json, Value};

fn setup(limits: Limits) -> (Arc<Registry>, BackendConn, Arc<Endpoint>) {
    let registry = Registry::new(limits);
    let backend = registry
        .publish("/t", Digest::of(b"s"), ("t", Digest::of(b"tok")), 1, false)
        .expect("publish");
    let endpoint = registry.lookup("/t").expect("endpoint");
    (registry, backend, endpoint)
}

fn join(endpoint: &Arc<Endpoint>) -> ClientConn {
    endpoint.join(true, 100, &Digest::of(b"s")).expect("join")
}

fn parse(text: &str) -> Message {
    Message::parse(text.as_bytes()).expect("message")
}

async fn to_backend(backend: &mut BackendConn) -> Value {
    let text = backend.recv().await.expect("frame for the backend");
    serde_json::from_str(&text).expect("json")
}

#[tokio::test]
async fn clients_using_the_same_id_get_distinct_backend_ids_and_their_own_replies() {
    let (_r, mut backend, endpoint) = setup(Limits::default());
    let (mut a, mut b) = (join(&endpoint), join(&endpoint));
    for c in [&a, &b] {
        let req = parse(r#"{"type":"req","method":"m","id":1}"#);
        assert!(c.send(req).await.is_done());
    }
    let (fa, fb) = (
        to_backend(&mut backend).await,
        to_backend(&mut backend).await,
    );
    assert_ne!(fa["id"], fb["id"]);
    assert_ne!(fa["ext"]["route"], fb["ext"]["route"]);
    for (f, payload) in [(&fb, "for b"), (&fa, "for a")] {
        let reply = json!({"type":"rep","id":f["id"],"payload":payload,"ext":f["ext"]});
        assert!(backend.handle(parse(&reply.to_string())).is_done());
    }
    let (ra, rb) = (a.recv().await.expect("a"), b.recv().await.expect("b"));
    assert_eq!((ra.id(), ra.payload()), (Some(1), json!("for a")));
    assert_eq!((rb.id(), rb.payload()), (Some(1), json!("for b")));
    assert!(ra.ext_raw().is_none(), "the route does not leak back");
    assert_eq!(endpoint.stats().pending_calls, 0);
}

#[tokio::test]
async fn streamed_input_reuses_one_backend_id_until_the_call_ends() {
    let (_r, mut backend, endpoint) = setup(Limits::default());
    let a = join(&endpoint);
    for more in [true, true, false] {
        let req = Message::request("add", Some(5), &json!(1), more);
        assert!(a.send(req).await.is_done());
    }
    let ids: Vec<Value> = vec![
        to_backend(&mut backend).await["id"].clone(),
        to_backend(&mut backend).await["id"].clone(),
        to_backend(&mut backend).await["id"].clone(),
    ];
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert!(backend
        .handle(parse(
            &json!({"type":"rep","id":ids[0],"payload":3}).to_string(),
        ))
        .is_done());
    assert!(a
        .send(Message::request("add", Some(5), &json!(1), false))
        .await
        .is_done());
    assert_ne!(
        to_backend(&mut backend).await["id"],
        ids[0],
        "a new call, a new id"
    );
}

#[tokio::test]
async fn a_client_over_its_byte_budget_is_closed_and_its_calls_forgotten() {
    let limits = Limits {
        client_queue_bytes: 500,
        ..Limits::default()
    };
    let (_r, mut backend, endpoint) = setup(limits);
    let mut a = join(&endpoint);
    assert!(a
        .send(parse(r#"{"type":"req","method":"count","id":1}"#))
        .await
        .is_done());
    let f = to_backend(&mut backend).await;
    for i in 0..20 {
        let rep = json!({"type":"rep","id":f["id"],"payload":i,"more":true,"ext":f["ext"]});
        assert!(backend.handle(parse(&rep.to_string())).is_done());
    }
    assert_eq!(endpoint.stats().clients, 0);
    assert_eq!(endpoint.stats().pending_calls, 0);
    assert!(a.recv().await.is_none(), "the backlog is not delivered");
    assert_eq!(a.close_reason().code, close::POLICY);
}

#[tokio::test]
async fn a_backend_leaving_fails_pending_calls_then_the_grace_ends_the_endpoint() {
    let limits = Limits {
        backend_grace: Duration::ZERO,
        ..Limits::default()
    };
    let (registry, mut backend, endpoint) = setup(limits);
    let mut a = join(&endpoint);
    assert!(a
        .send(parse(r#"{"type":"req","method":"m","id":9,"ext":{"k":1}}"#))
        .await
        .is_done());
    to_backend(&mut backend).await;
    drop(backend);
    let failed = a.recv().await.expect("the -32000 reply");
    assert_eq!(failed.kind(), Kind::Reply);
    assert_eq!(failed.id(), Some(9));
    assert_eq!(failed.error().map(|e| e.code), Some(-32000));
    assert_eq!(failed.ext(), json!({"k": 1}).as_object().cloned());
    assert!(a.recv().await.is_none());
    assert_eq!(a.close_reason().code, close::TRY_AGAIN_LATER);
    assert!(registry.lookup("/t").is_none());
}

#[tokio::test]
async fn a_client_cannot_answer_a_call_the_backend_made_to_another_client() {
    let (_r, mut backend, endpoint) = setup(Limits::default());
    let (mut a, b) = (join(&endpoint), join(&endpoint));
    let call = json!({"type":"req","method":"hi","id":77,"ext":{"route":a.route()}});
    assert!(backend.handle(parse(&call.to_string())).is_done());
    let got = a.recv().await.expect("the call");
    assert!(
        got.ext_raw().is_none(),
        "the route is not shown to the client"
    );
    // b forges an answer to a's call: dropped.
    assert!(b
        .send(parse(r#"{"type":"rep","id":77,"payload":"forged"}"#))
        .await
        .is_done());
    assert!(a
        .send(parse(r#"{"type":"rep","id":77,"payload":"real"}"#))
        .await
        .is_done());
    let answer = to_backend(&mut backend).await;
    assert_eq!(answer["payload"], "real");
    assert_eq!(answer["ext"]["route"], json!(a.route()));
}

fn call_to(route: &str, id: u64) -> Message {
    parse(&json!({"type":"req","method":"hi","id":id,"ext":{"route":route}}).to_string())
}

#[tokio::test]
async fn a_replaced_backend_is_silent_from_that_moment() {
    let (registry, mut old, endpoint) = setup(Limits::default());
    let mut a = join(&endpoint);
    let mut new = registry
        .publish("/t", Digest::of(b"s"), ("t", Digest::of(b"tok")), 1, false)
        .expect("publish");
    assert!(a
        .send(parse(r#"{"type":"req","method":"m","id":1}"#))
        .await
        .is_done());
    let f = to_backend(&mut new).await;
    // The old backend answers the new one's call, and calls the client by its route.
    let forged = json!({"type":"rep","id":f["id"],"payload":"forged","ext":f["ext"]});
    assert!(old.handle(parse(&forged.to_string())).is_done());
    assert!(
        old.handle(call_to(a.route(), 5)).is_done(),
        "not even -32001"
    );
    assert!(
        a.try_recv().is_none(),
        "nothing from the old backend reached the client"
    );
    assert!(old.recv().await.is_none());
    assert_eq!(old.close_reason().code, close::SERVICE_RESTART);
    let real = json!({"type":"rep","id":f["id"],"payload":"real","ext":f["ext"]});
    assert!(new.handle(parse(&real.to_string())).is_done());
    assert_eq!(a.recv().await.expect("the reply").payload(), json!("real"));
}

#[tokio::test]
async fn a_revoked_backend_is_silent_from_that_moment() {
    let (_r, mut backend, endpoint) = setup(Limits::default());
    let mut a = join(&endpoint);
    assert!(a
        .send(parse(r#"{"type":"req","method":"m","id":1}"#))
        .await
        .is_done());
    let f = to_backend(&mut backend).await;
    assert!(!endpoint
        .close_backends(CloseReason::new(close::POLICY, "revoked"), |_| true)
        .is_empty());
    // Its pending call failed with -32000; nothing it sends afterwards arrives.
    let failed = a.recv().await.expect("-32000");
    assert_eq!(failed.error().map(|e| e.code), Some(-32000));
    let late = json!({"type":"rep","id":f["id"],"payload":"late","ext":f["ext"]});
    assert!(backend.handle(parse(&late.to_string())).is_done());
    assert!(backend.handle(call_to(a.route(), 5)).is_done());
    assert!(a.try_recv().is_none());
    assert!(backend.recv().await.is_none());
}

#[tokio::test]
async fn calls_from_the_backend_to_one_client_count_against_its_limit() {
    let limits = Limits {
        max_pending_calls_per_client: 2,
        ..Limits::default()
    };
    let (_r, backend, endpoint) = setup(limits);
    let mut a = join(&endpoint);
    let route = a.route().to_string();
    assert!(backend.handle(call_to(&route, 1)).is_done());
    assert!(backend.handle(call_to(&route, 2)).is_done());
    // The next frame of an open call is no new call.
    assert!(backend.handle(call_to(&route, 2)).is_done());
    let refused = backend
        .handle(call_to(&route, 3))
        .into_answer()
        .expect("-32003");
    assert_eq!(refused.error().map(|e| e.code), Some(-32003));
    assert_eq!(refused.id(), Some(3));
    assert_eq!(endpoint.stats().backend_calls, 2);
    // The client answers one: room for another.
    a.recv().await.expect("call 1");
    assert!(a
        .send(parse(r#"{"type":"rep","id":1,"payload":0}"#))
        .await
        .is_done());
    assert!(backend.handle(call_to(&route, 4)).is_done());
    assert_eq!(endpoint.stats().backend_calls, 2);
}

#[tokio::test]
async fn the_ext_kept_for_open_calls_is_bounded_per_client() {
    let limits = Limits {
        client_queue_bytes: 1000,
        ..Limits::default()
    };
    let (_r, _backend, endpoint) = setup(limits);
    let a = join(&endpoint);
    let big = "x".repeat(400);
    for id in 1..=2 {
        let req = json!({"type":"req","method":"m","id":id,"ext":{"k":big}});
        assert!(a.send(parse(&req.to_string())).await.is_done());
    }
    let req = json!({"type":"req","method":"m","id":3,"ext":{"k":big}});
    let refused = a
        .send(parse(&req.to_string()))
        .await
        .into_answer()
        .expect("-32003");
    assert_eq!(refused.error().map(|e| e.code), Some(-32003));
    // A call without ext still goes through.
    assert!(a
        .send(parse(r#"{"type":"req","method":"m","id":4}"#))
        .await
        .is_done());
}

#[tokio::test]
async fn a_backend_queue_is_bounded_in_bytes_and_its_senders_wait() {
    let limits = Limits {
        backend_queue_bytes: 1000,
        ..Limits::default()
    };
    let (_r, mut backend, endpoint) = setup(limits);
    let a = join(&endpoint);
    let req = |id: u64| {
        let payload = "x".repeat(300);
        parse(&json!({"type":"req","method":"m","id":id,"payload":payload}).to_string())
    };
    let room = Duration::from_secs(5);
    for id in 1..=2 {
        let sent = tokio::time::timeout(room, a.send(req(id))).await;
        assert!(sent.is_ok_and(|answer| answer.is_done()), "call {id}");
    }
    // About 380 bytes each: a third does not fit in 1000, so its sender waits.
    let waiting = tokio::time::timeout(Duration::from_millis(200), a.send(req(3))).await;
    assert!(waiting.is_err(), "the sender waits for room");
    // The backend reads one: room again.
    to_backend(&mut backend).await;
    let sent = tokio::time::timeout(room, a.send(req(4))).await;
    assert!(sent.is_ok(), "room after the backend read");
}
