//! TLS certificates: loaded and checked before a listener starts (Pingora would panic inside the
//! service on a bad file), served through a resolver so a reload can swap them in place.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{Config, TlsFiles};

/// Serves the current certificate of one TLS listener.
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertResolver")
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertResolver {
    /// A resolver serving `key`.
    pub fn new(key: CertifiedKey) -> Arc<CertResolver> {
        Arc::new(CertResolver {
            current: ArcSwap::from_pointee(key),
        })
    }

    /// Serves `key` from now on (new handshakes; open connections keep theirs).
    pub fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }
}

/// Loads a certificate chain and its private key, and checks that they belong together.
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let cert = files.cert.display().to_string();
    let key = files.key.display().to_string();
    let loaded = pingora::tls::load_certs_and_key_files(&cert, &key)
        .map_err(|e| format!("cannot read TLS files {cert} / {key}: {e}"))?;
    let Some((certs, private_key)) = loaded else {
        return Err(format!(
            "no certificate in {cert} or no private key (PKCS#1, PKCS#8 or SEC1 PEM) in {key}"
        ));
    };
    CertifiedKey::from_der(
        certs,
        private_key,
        &rustls::crypto::ring::default_provider(),
    )
    .map_err(|e| format!("TLS certificate {cert} with key {key}: {e}"))
}

/// Loads the certificate of every TLS listener of `config`.
pub fn load_all(config: &Config) -> Result<Vec<(SocketAddr, CertifiedKey)>, String> {
    config
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref().map(|files| (l.address, files)))
        .map(|(addr, files)| load(files).map(|key| (addr, key)))
        .collect()
}
