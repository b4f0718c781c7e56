//! One delivery attempt over HTTP/1.1 (hyper's pooled client, kept-alive connections; TLS by rustls with
//! the ring provider for `https://`) and what its answer means for the notification: delivered, try
//! again, or never (dropped). A TLS failure (an unknown CA, a wrong name) is a connection error and is
//! retried: it is fixed on the receiver's side, like a receiver that is down.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// How much of a refusal's body is kept for the log.
const KEEP_BODY: usize = 4096;

/// What became of one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// 2xx.
    Delivered { status: u16 },
    /// Worth another attempt: no connection, a timeout, 408, 429 or 5xx.
    Retry { reason: String },
    /// Any other answer: the receiver will not take this notification, however often it is sent
    /// (redirects are not followed: a receiver's URL is configured, not discovered).
    Rejected { status: u16, body: String },
}

/// What a status code means for a notification.
pub fn classify(status: u16) -> Class {
    match status {
        200..=299 => Class::Delivered,
        408 | 429 | 500..=599 => Class::Retry,
        _ => Class::Rejected,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Delivered,
    Retry,
    Rejected,
}

/// Which certificate authorities an `https://` receiver's certificate must chain to.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The web's public roots (Mozilla's, built in: no dependency on the host's store).
    WebRoots,
    /// Only the CAs in this PEM file.
    CaFile(std::path::PathBuf),
}

/// A pooled HTTP/1.1 client (http and https) with a deadline per attempt.
#[derive(Clone)]
pub struct Poster {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

/// Reads the CA certificates of a PEM file.
fn roots_from(path: &Path) -> Result<rustls::RootCertStore, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs =
        CertificateDer::pem_file_iter(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("reading {}: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("a certificate in {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(roots)
}

impl Poster {
    /// A client that trusts `trust` for https; the error says what is wrong with a CA file.
    pub fn new(timeout: Duration, trust: &Trust) -> Result<Poster, String> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        // The TLS layer wraps it, so the TCP layer must take https URLs too.
        connector.enforce_http(false);
        // One provider named here, so nothing depends on a process-wide default.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = HttpsConnectorBuilder::new();
        let builder = match trust {
            Trust::WebRoots => builder.with_provider_and_webpki_roots(provider).map_err(|e| e.to_string())?,
            Trust::CaFile(path) => {
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots_from(path)?)
                    .with_no_client_auth();
                builder.with_tls_config(config)
            }
        };
        let https = builder.https_or_http().enable_http1().wrap_connector(connector);
        let client =
            Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(https);
        Ok(Poster { client, timeout })
    }

    /// POSTs `body` (JSON) to `uri` with `headers`; the whole exchange, the answer's body included, must end
    /// within the timeout.
    pub async fn post(&self, uri: &Uri, headers: &[(HeaderName, HeaderValue)], body: Bytes) -> Answer {
        let mut request = Request::post(uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("vigil/", env!("CARGO_PKG_VERSION")));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = match request.body(Full::new(body)) {
            Ok(r) => r,
            // Names and values were checked when the receiver was opened; nothing else can fail here.
            Err(e) => return Answer::Rejected { status: 0, body: format!("building the request: {e}") },
        };
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                // The legacy client's error says "client error (Connect)"; its source says why.
                let why = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
                format!("{e}{why}")
            })?;
            let status = response.status().as_u16();
            // Read the body to the end (within a bound), so the connection can be reused.
            let body = Limited::new(response.into_body(), KEEP_BODY)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            Ok::<_, String>((status, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Answer::Retry { reason: format!("no answer within {:?}", self.timeout) },
            Ok(Err(reason)) => Answer::Retry { reason },
            Ok(Ok((status, body))) => match classify(status) {
                Class::Delivered => Answer::Delivered { status },
                Class::Retry => Answer::Retry { reason: format!("HTTP {status}: {}", body.trim()) },
                Class::Rejected => Answer::Rejected { status, body },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("vigil-poster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let timeout = Duration::from_secs(1);
        let err = Poster::new(timeout, &Trust::CaFile(empty.clone())).err().unwrap();
        assert_eq!(err, format!("{} holds no certificate", empty.display()));
        let missing = dir.join("missing.pem");
        assert!(
            Poster::new(timeout, &Trust::CaFile(missing.clone()))
                .err()
                .unwrap()
                .starts_with(&format!("reading {}", missing.display()))
        );
        assert!(Poster::new(timeout, &Trust::WebRoots).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn statuses_are_classified() {
        for s in [200, 202, 204, 299] {
            assert_eq!(classify(s), Class::Delivered, "{s}");
        }
        for s in [408, 429, 500, 502, 503, 599] {
            assert_eq!(classify(s), Class::Retry, "{s}");
        }
        for s in [100, 301, 302, 400, 401, 403, 404, 409, 410, 413, 422, 600] {
            assert_eq!(classify(s), Class::Rejected, "{s}");
        }
    }
}
