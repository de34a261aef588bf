//! The multiplexer stands on its own: its sources compile here with nothing of the gateway but
//! the two modules it uses (`auth` for secret digests, `metrics` for its series), with no
//! cluster, no Pingora front and no config, and its unit tests run in this binary.
//!
//! If a change makes `src/mux` reach into another module of the gateway (the cluster, say),
//! this target stops compiling.

#![allow(dead_code, unused_imports)]

#[path = "../src/auth.rs"]
mod auth;
#[path = "../src/metrics.rs"]
mod metrics;
#[path = "../src/mux/mod.rs"]
mod mux;

use duplex_gateway::duplex;

#[test]
fn a_single_node_multiplexer_answers_a_call() {
    use std::sync::Arc;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let registry = mux::Registry::new(mux::Limits::default());
        let secret = auth::Digest::of(b"s");
        let mut backend = registry
            .publish("/alone", secret, ("t", auth::Digest::of(b"t")), 1, false)
            .expect("publish");
        let endpoint: Arc<mux::Endpoint> = registry.lookup("/alone").expect("endpoint");
        let mut client = endpoint.join(true, 10, &secret).expect("join");
        let call = duplex::Message::parse(br#"{"type":"req","method":"m","id":1}"#).expect("call");
        assert!(client.send(call).await.is_done());
        let to_backend = backend.recv().await.expect("the call reaches the backend");
        let sent: serde_json::Value = serde_json::from_str(&to_backend).expect("json");
        let reply =
            serde_json::json!({"type":"rep","id":sent["id"],"payload":"ok","ext":sent["ext"]});
        let reply = duplex::Message::parse(reply.to_string().as_bytes()).expect("reply");
        assert!(backend.handle(reply).is_done());
        let got = client.recv().await.expect("the reply");
        assert_eq!(
            (got.id(), got.payload()),
            (Some(1), serde_json::json!("ok"))
        );
    });
}
