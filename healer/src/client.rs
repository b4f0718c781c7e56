//! The client side of the REST API, for `vigil ctl`: one blocking HTTP/1.1 request per call over a plain
//! TCP connection (the API is loopback by default; a token is sent as a bearer header when given).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the Vigil API at {addr} (is `vigil up` running?): {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("talking to {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("{addr} answered something that is not HTTP")]
    NotHttp { addr: SocketAddr },
    /// The API's own error: `{"error": {"code", "message"}}`.
    #[error("{message} ({code}, HTTP {status})")]
    Api { status: u16, code: String, message: String },
}

pub struct Client {
    addr: SocketAddr,
    token: Option<String>,
    timeout: Duration,
}

impl Client {
    pub fn new(addr: SocketAddr, token: Option<String>) -> Self {
        // Hibernate and wake of large instances take seconds.
        Self { addr, token, timeout: Duration::from_secs(120) }
    }

    /// `method path` and the JSON answer; API errors come back as [`ClientError::Api`].
    pub fn call(&self, method: &str, path: &str) -> Result<Value, ClientError> {
        self.call_with(method, path, "")
    }

    /// [`Client::call`] with a JSON `body`.
    pub fn call_with(&self, method: &str, path: &str, body: &str) -> Result<Value, ClientError> {
        let addr = self.addr;
        let io = |source| ClientError::Io { addr, source };
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|source| ClientError::Connect { addr, source })?;
        s.set_read_timeout(Some(self.timeout)).map_err(io)?;
        let auth = self.token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let length = body.len();
        let kind = if body.is_empty() { "" } else { "Content-Type: application/json\r\n" };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{kind}Content-Length: {length}\r\nConnection: close\r\n\r\n{body}"
        )
        .map_err(io)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(io)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or(ClientError::NotHttp { addr })?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or(ClientError::NotHttp { addr })?;
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_string()
        };
        let json: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        if (200..300).contains(&status) {
            Ok(json)
        } else {
            let field = |k: &str| json["error"][k].as_str().unwrap_or("").to_string();
            Err(ClientError::Api { status, code: field("code"), message: field("message") })
        }
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(dechunk("4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"), "Wikipedia");
        assert_eq!(dechunk("zz\r\n"), "");
    }

    #[test]
    fn unreachable_api_says_so() {
        // Port 9 (discard) on loopback is closed here.
        let err =
            Client::new("127.0.0.1:9".parse().unwrap(), None).call("GET", "/api/v1/instances").unwrap_err();
        assert!(err.to_string().starts_with("cannot reach the Vigil API at 127.0.0.1:9"), "{err}");
    }
}
