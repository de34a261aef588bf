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

/// Why a certificate could not be loaded: each names the files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read TLS files {cert} / {key}: {source}")]
    Read {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// What reading said.
        source: Box<pingora::Error>,
    },
    /// The files hold no certificate, or no key.
    #[error("no certificate in {cert} or no private key (PKCS#1, PKCS#8 or SEC1 PEM) in {key}")]
    Missing {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
    },
    /// The key is not the certificate's, or is of a kind rustls does not take.
    #[error("TLS certificate {cert} with key {key}: {source}")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// What rustls said.
        source: rustls::Error,
    },
}

/// Loads a certificate chain and its private key, and checks that they belong together.
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let cert = files.cert.display().to_string();
    let key = files.key.display().to_string();
    let loaded = match pingora::tls::load_certs_and_key_files(&cert, &key) {
        Ok(loaded) => loaded,
        Err(source) => return Err(TlsError::Read { cert, key, source }),
    };
    let Some((certs, private_key)) = loaded else {
        return Err(TlsError::Missing { cert, key });
    };
    CertifiedKey::from_der(
        certs,
        private_key,
        &rustls::crypto::ring::default_provider(),
    )
    .map_err(|source| TlsError::Mismatch { cert, key, source })
}

/// Loads the certificate of every TLS listener of `config`.
pub fn load_all(config: &Config) -> Result<Vec<(SocketAddr, CertifiedKey)>, TlsError> {
    config
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref().map(|files| (l.address, files)))
        .map(|(addr, files)| load(files).map(|key| (addr, key)))
        .collect()
}
