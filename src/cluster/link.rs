//! The link to NATS: server URLs, credentials and TLS from `cluster.nats`, `cluster.auth` and
//! `cluster.tls`, read and checked at start-up (and by `--check`), and turned into the NATS
//! client's options.
//!
//! async-nats does not use the `user:password@` of a URL by itself, so a URL's credentials are
//! taken out of it here and handed over as `auth` would be; the URL the client (and every log
//! line) sees has none. A URL is only ever shown with its password as `***`.

use std::path::{Path, PathBuf};

use crate::config::{ClusterConfig, NatsAuth};

/// Why the link's settings cannot be used: each names the setting or the file, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A server URL does not parse (shown with its password as `***`).
    #[error("cluster.nats: {url}: {reason}")]
    Url {
        /// The URL, redacted.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// Two URLs carry different credentials.
    #[error("cluster.nats: the URLs name different credentials; give one `cluster.auth` instead")]
    UrlsDisagree,
    /// Credentials both in a URL and in `cluster.auth`.
    #[error("cluster: credentials in a NATS URL and in `cluster.auth`: give them once")]
    CredentialsTwice,
    /// A file could not be read.
    #[error("{setting}: cannot read {}: {source}", path.display())]
    Read {
        /// The setting naming the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What reading said.
        source: std::io::Error,
    },
    /// The NKey seed file holds no seed.
    #[error("cluster.auth.nkey_seed_file: {} holds no NKey seed (a line starting with S)", .0.display())]
    NoSeed(PathBuf),
    /// The credentials file is not one.
    #[error("cluster.auth.credentials_file: {} is not a NATS credentials file (a user JWT and an NKey seed)", .0.display())]
    NotCredentials(PathBuf),
    /// The CA file is not PEM, or holds no certificate.
    #[error("cluster.tls.ca: {}: {reason}", path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The client certificate or its key.
    #[error("cluster.tls: {0}")]
    ClientCertificate(#[from] crate::tls::TlsError),
}

/// What the NATS client needs to connect, read from the config and the files it names.
pub struct Link {
    /// The servers, without credentials.
    pub servers: Vec<async_nats::ServerAddr>,
    /// The servers as they may be shown (passwords as `***`).
    pub shown: Vec<String>,
    /// The client's options: credentials and TLS (the caller adds the rest).
    pub options: async_nats::ConnectOptions,
}

/// Reads `config`'s servers, credentials and TLS files. Every error names the setting or the
/// file, never a secret.
pub fn load(config: &ClusterConfig) -> Result<Link, LinkError> {
    let mut options = async_nats::ConnectOptions::new();
    let mut servers = Vec::new();
    let mut shown = Vec::new();
    let mut from_url: Option<(String, String)> = None;
    for url in &config.nats {
        let (bare, credentials) = split_credentials(url);
        let addr = bare
            .parse::<async_nats::ServerAddr>()
            .map_err(|e| LinkError::Url {
                url: redact(url),
                reason: e.to_string(),
            })?;
        if let Some(credentials) = credentials {
            if from_url.as_ref().is_some_and(|c| *c != credentials) {
                return Err(LinkError::UrlsDisagree);
            }
            from_url = Some(credentials);
        }
        servers.push(addr);
        shown.push(redact(url));
    }
    match (&config.auth, from_url) {
        (Some(_), Some(_)) => return Err(LinkError::CredentialsTwice),
        (None, Some((user, password))) => {
            options = options.user_and_password(user, password);
        }
        (Some(auth), None) => options = with_auth(options, auth)?,
        (None, None) => {}
    }
    if let Some(tls) = &config.tls {
        options = options.require_tls(true);
        if let Some(ca) = &tls.ca {
            check_ca(ca)?;
            options = options.add_root_certificates(ca.clone());
        }
        if let Some(client) = &tls.client {
            // Read and matched now, so a wrong file stops the start (and `--check`).
            crate::tls::load(client)?;
            options = options.add_client_certificate(client.cert.clone(), client.key.clone());
        }
    }
    Ok(Link {
        servers,
        shown,
        options,
    })
}

/// Checks the files `config` names (for `--check`): the same reading as at start-up.
pub fn check(config: &ClusterConfig) -> Result<(), LinkError> {
    load(config).map(drop)
}

fn with_auth(
    options: async_nats::ConnectOptions,
    auth: &NatsAuth,
) -> Result<async_nats::ConnectOptions, LinkError> {
    Ok(match auth {
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(token) => options.token(token.clone()),
        NatsAuth::NkeySeedFile(path) => {
            let seed = read(path, "cluster.auth.nkey_seed_file")?;
            let seed = seed.trim().to_string();
            // The file may hold comments; the seed is the line that starts with `S`.
            let seed = seed
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with('S'))
                .unwrap_or(&seed)
                .to_string();
            if nkeys::KeyPair::from_seed(&seed).is_err() {
                return Err(LinkError::NoSeed(path.clone()));
            }
            options.nkey(seed)
        }
        NatsAuth::CredentialsFile(path) => {
            let text = read(path, "cluster.auth.credentials_file")?;
            options
                .credentials(&text)
                .map_err(|_| LinkError::NotCredentials(path.clone()))?
        }
    })
}

fn read(path: &Path, setting: &'static str) -> Result<String, LinkError> {
    std::fs::read_to_string(path).map_err(|source| LinkError::Read {
        setting,
        path: path.to_path_buf(),
        source,
    })
}

fn check_ca(path: &Path) -> Result<(), LinkError> {
    use rustls::pki_types::pem::PemObject;
    let ca = |reason: String| LinkError::Ca {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| ca(format!("cannot read it: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| ca(e.to_string()))?;
    if certs.is_empty() {
        return Err(ca("no PEM certificate in it".into()));
    }
    Ok(())
}

/// Splits `scheme://user:password@host:port` into the URL without its credentials and the
/// credentials (percent-decoded). A URL without `@` has none.
pub fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return (url.to_string(), None);
    };
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let bare = match scheme {
        Some(scheme) => format!("{scheme}://{host}"),
        None => host.to_string(),
    };
    (bare, Some((percent_decode(user), percent_decode(password))))
}

/// A URL as it may be shown: its password (if any) as `***`.
pub fn redact(url: &str) -> String {
    let (bare, credentials) = split_credentials(url);
    match credentials {
        None => url.to_string(),
        Some((user, _)) => match bare.split_once("://") {
            Some((scheme, host)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{user}:***@{bare}"),
        },
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit()
        {
            let hex = [bytes[i + 1], bytes[i + 2]];
            if let Some(b) = std::str::from_utf8(&hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_out_of_a_url_and_its_password_is_never_shown() {
        let (bare, creds) = split_credentials("nats://gw:p%40ss@127.0.0.1:4222");
        assert_eq!(bare, "nats://127.0.0.1:4222");
        assert_eq!(creds, Some(("gw".into(), "p@ss".into())));
        assert_eq!(
            redact("nats://gw:p%40ss@127.0.0.1:4222"),
            "nats://gw:***@127.0.0.1:4222"
        );
        assert_eq!(redact("tls://n1:4222"), "tls://n1:4222");
        assert_eq!(split_credentials("n1:4222"), ("n1:4222".into(), None));
        assert_eq!(redact("gw:pw@n1:4222"), "gw:***@n1:4222");
    }

    /// A cluster section on `url` with `auth`.
    fn cluster(url: &str, auth: NatsAuth) -> ClusterConfig {
        ClusterConfig {
            nats: vec![url.into()],
            auth: Some(auth),
            tls: None,
            key: None,
            node: None,
            subject_prefix: "p".into(),
            node_timeout: std::time::Duration::from_secs(5),
        }
    }

    #[test]
    fn credentials_in_a_url_and_in_auth_are_refused() {
        let config = cluster("nats://a:b@127.0.0.1:4222", NatsAuth::Token("t".into()));
        let e = load(&config).err().expect("refused").to_string();
        assert!(!e.contains("a:b@"), "{e}");
        assert!(e.contains("once"), "{e}");
    }

    #[test]
    fn a_seed_file_that_holds_no_seed_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("dg-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("bad.nk");
        std::fs::write(&file, "not a seed\n").expect("write");
        let config = cluster(
            "nats://127.0.0.1:4222",
            NatsAuth::NkeySeedFile(file.clone()),
        );
        let e = load(&config).err().expect("refused").to_string();
        assert!(e.contains("bad.nk"), "{e}");
        let missing = ClusterConfig {
            auth: Some(NatsAuth::CredentialsFile(dir.join("missing.creds"))),
            ..config
        };
        let e = load(&missing).err().expect("refused").to_string();
        assert!(e.contains("missing.creds"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
