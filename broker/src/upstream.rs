//! Where the broker sends a request: an upstream, which is either an RSocket instance's connection or a
//! plain HTTP endpoint (an instance Vigil manages, or a configured upstream address).
//!
//! [`Upstream`] is all the hub needs of one: it keeps upstreams in its balancer and hands them out in
//! leases, but never sends anything itself. So the hub depends on this trait and not on the relay (`conn`)
//! that owns the connections and implements it, and the relay and the HTTP trigger build on the hub.
//!
//! The client towards HTTP endpoints lives here too, because both the relay and the trigger send to them:
//! the relay POSTs an RSocket request routed to an HTTP instance with [`call_instance`], and the trigger
//! proxies HTTP requests over its own [`instance_client`]; both count the answer with [`status_outcome`].
//! Pooled connections idle out after [`POOL_IDLE`]: the healer counts open connections to an instance as
//! traffic, and a long-lived idle pool would keep a quiet instance from hibernating.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::outcome::RequestOutcome;

/// What the hub needs of the place a picked request goes.
pub trait Upstream: Clone + Send + Sync + 'static {
    /// The upstream for the HTTP endpoint at `address` (a managed instance, or a configured upstream).
    fn http(address: SocketAddr) -> Self;

    /// The id of the RSocket connection this upstream is, if it is one: an instance registered over a
    /// connection is deregistered when that connection ends, unless it registered again on another.
    fn connection_id(&self) -> Option<u64>;
}

/// How long a pooled connection to an instance may sit idle before it is closed.
pub const POOL_IDLE: Duration = Duration::from_secs(2);

/// Largest answer [`call_instance`] reads from an HTTP instance.
pub const MAX_INSTANCE_ANSWER: usize = 16 << 20;

/// A pooled HTTP/1.1 client towards instances.
pub type InstanceClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled HTTP/1.1 client towards instances, with a short idle time (see the module docs).
pub fn instance_client() -> InstanceClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// RSocket request → HTTP instance: POSTs `body` to `path` on `addr` and returns the status and the
/// answer's body (at most [`MAX_INSTANCE_ANSWER`] bytes), within `timeout` for the whole exchange.
pub async fn call_instance(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    timeout: Duration,
    traceparent: Option<&str>,
) -> Result<(u16, Bytes), String> {
    static CLIENT: OnceLock<InstanceClient> = OnceLock::new();
    let client = CLIENT.get_or_init(instance_client);
    let uri = Uri::try_from(format!("http://{addr}{path}")).map_err(|e| format!("bad path {path:?}: {e}"))?;
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    request.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Some(tp) = traceparent.and_then(|tp| HeaderValue::from_str(tp).ok()) {
        request.headers_mut().insert("traceparent", tp);
    }
    let exchange = async {
        let response = client.request(request).await.map_err(|e| format!("{addr}: {}", error_chain(&e)))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_INSTANCE_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("{addr}: reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{addr} did not answer within {timeout:?}"))?
}

/// How an HTTP instance's status counts: 502/503/504 say the instance (or what it fronts) is failing, other
/// 4xx/5xx are the application's answers from a live instance, the rest is ok. Also fits the answers of
/// [`call_instance`].
pub fn status_outcome(status: StatusCode) -> RequestOutcome {
    match status.as_u16() {
        502..=504 => RequestOutcome::Failure,
        400..=599 => RequestOutcome::AppError,
        _ => RequestOutcome::Ok,
    }
}

/// An error and its causes, `a: b: c` (hyper's own messages are terse, the cause says what happened).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(status_outcome(StatusCode::OK), RequestOutcome::Ok);
        assert_eq!(status_outcome(StatusCode::FOUND), RequestOutcome::Ok);
        assert_eq!(status_outcome(StatusCode::NOT_FOUND), RequestOutcome::AppError);
        assert_eq!(status_outcome(StatusCode::INTERNAL_SERVER_ERROR), RequestOutcome::AppError);
        assert_eq!(status_outcome(StatusCode::BAD_GATEWAY), RequestOutcome::Failure);
        assert_eq!(status_outcome(StatusCode::GATEWAY_TIMEOUT), RequestOutcome::Failure);
    }
}
