//! The HTTP trigger: the broker's door for plain HTTP clients, and its client towards plain HTTP instances.
//!
//! [`serve`] accepts HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on one port. Each request is mapped to
//! a service by its host and path prefix ([`HttpRoute`]), its body is read into memory (bounded by
//! `max_body_bytes`, because the request may wait in the hub's queue while an instance wakes), and it is
//! admitted by the hub like any RSocket request. An HTTP instance gets the request proxied unchanged over a
//! pooled HTTP/1.1 connection; an RSocket instance gets it as a request-response through a local,
//! socketless connection ([`Conn::local`]), so the relay's accounting and cancellation apply to it too.
//! The client towards HTTP instances is shared with the relay and lives in [`crate::upstream`].
//!
//! Every error the trigger answers itself is JSON `{"error": {"code": "...", "message": "..."}}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use vigil_auth as auth;

use crate::balance::NoTarget;
use crate::config::{HttpRoute, HttpTriggerConfig};
use crate::conn::{Conn, ConnSettings, Hub, Lease, Out, Target};
use crate::hub::{Admission, Refusal};
use crate::outcome::RequestOutcome;
use crate::rsocket::frame::{Body, ErrorCode, Frame, Payload};
use crate::rsocket::metadata::{self, Route};
use crate::trace::RequestTrace;
use crate::upstream::{InstanceClient, error_chain, instance_client, status_outcome};

/// The request headers that pick a version, a traffic-split alias or a sticky key, like the routing
/// metadata's `version=`, `alias=` and `key=` tags.
pub const VERSION_HEADER: &str = "x-vigil-version";
pub const ALIAS_HEADER: &str = "x-vigil-alias";
pub const KEY_HEADER: &str = "x-vigil-key";

/// Bodies the trigger answers with: an instance's streamed body, or one the trigger made.
pub type ResponseBody = BoxBody<Bytes, hyper::Error>;

/// Maps HTTP requests to services and carries them to instances.
pub struct Trigger {
    hub: Arc<Hub>,
    settings: Arc<ConnSettings>,
    routes: Vec<HttpRoute>,
    max_body_bytes: usize,
    request_timeout: Duration,
    client: InstanceClient,
}

impl Trigger {
    pub fn new(
        hub: Arc<Hub>,
        settings: Arc<ConnSettings>,
        routes: Vec<HttpRoute>,
        config: &HttpTriggerConfig,
    ) -> Trigger {
        Trigger {
            hub,
            settings,
            routes,
            max_body_bytes: config.max_body_bytes,
            request_timeout: config.request_timeout.0,
            client: instance_client(),
        }
    }

    async fn handle(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<ResponseBody> {
        if let Some(expected) = &self.settings.token {
            if !auth::bearer_matches(req.headers(), expected) {
                let mut response = error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this broker needs its token: Authorization: Bearer <broker.token>".to_string(),
                );
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
            // The broker's own credential goes no further.
            req.headers_mut().remove(header::AUTHORIZATION);
        }
        let authority = request_authority(&req);
        let host = authority.as_deref().map(host_name);
        let Some(route) = pick_route(&self.routes, host, req.uri().path()) else {
            let message = format!(
                "no service is routed for host {:?} and path {:?}",
                host.unwrap_or(""),
                req.uri().path()
            );
            return error(StatusCode::NOT_FOUND, "no_route", message);
        };
        let service = route.service.clone();
        let (parts, body) = req.into_parts();
        let body = match read_body(body, &parts.headers, self.max_body_bytes).await {
            Ok(b) => b,
            Err(refusal) => return refusal.response(),
        };
        let route = match request_route(service, &parts.headers) {
            Ok(r) => r,
            Err(refusal) => return refusal.response(),
        };
        let parent = parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| metadata::TraceParent::parse(v.trim()).ok());
        let mut trace = self.hub.begin_trace(parent, &route.service, "http");
        let (lease, woken) = match self.hub.admit(&route, body.len()) {
            Ok(Admission::Ready(lease)) => (lease, false),
            // A client that goes away drops this future, and the ticket leaves the queue with it.
            Ok(Admission::Queued(ticket)) => {
                if let Some(t) = &mut trace {
                    t.queued();
                }
                match ticket.wait().await {
                    Ok(lease) => (lease, true),
                    Err(refusal) => return end_refused(trace, &refusal),
                }
            }
            Err(refusal) => return end_refused(trace, &refusal),
        };
        match lease.target().clone() {
            Target::Http(addr) => {
                let mut parts = parts;
                if let Some(t) = &mut trace {
                    let state = if woken { "woken" } else { self.hub.instance_state(lease.instance_id()) };
                    let tp = t.routed(lease.instance_id(), lease.version(), state);
                    if let Ok(v) = HeaderValue::from_str(&tp.to_string()) {
                        parts.headers.insert("traceparent", v);
                    }
                }
                let (response, outcome) = self.proxy(parts, body, authority, peer, addr, lease).await;
                if let Some(t) = trace {
                    t.end(outcome.as_str());
                }
                response
            }
            Target::Rsocket(_) => self.relay(&parts.headers, body, &route, lease, trace, woken).await,
        }
    }

    /// Proxies the request to an HTTP instance and streams its answer back.
    ///
    /// The lease is finished when the answer's head arrives: the time to first byte is the instance's
    /// latency, and a long streamed body is not held against it. Outcomes: no answer (connect error,
    /// reset, timeout) and 502/503/504 from the instance (it is a gateway, overloaded or stuck) count as
    /// failures of the instance; other 5xx and every 4xx as application errors (the instance is alive
    /// and answered); 1xx/2xx/3xx as ok.
    async fn proxy(
        &self,
        parts: http::request::Parts,
        body: Bytes,
        authority: Option<String>,
        peer: SocketAddr,
        addr: SocketAddr,
        lease: Lease,
    ) -> (Response<ResponseBody>, RequestOutcome) {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = match Uri::try_from(format!("http://{addr}{path}")) {
            Ok(u) => u,
            Err(e) => {
                lease.finish(RequestOutcome::AppError);
                let response = error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("bad request target {path:?}: {e}"),
                );
                return (response, RequestOutcome::AppError);
            }
        };
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        // The body was read already (and the client got its 100 Continue then); the instance gets it whole.
        headers.remove(header::EXPECT);
        forwarded_headers(&mut headers, authority.as_deref(), peer, parts.version);
        let mut out = Request::new(Full::new(body));
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.version_mut() = Version::HTTP_11;
        *out.headers_mut() = headers;

        let answer = tokio::time::timeout(self.request_timeout, self.client.request(out)).await;
        match answer {
            Err(_) => {
                lease.finish(RequestOutcome::Failure);
                let response = error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("instance {addr} did not answer within {:?}", self.request_timeout),
                );
                (response, RequestOutcome::Failure)
            }
            Ok(Err(e)) => {
                lease.finish(RequestOutcome::Failure);
                let response = error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    format!("instance {addr} failed: {}", error_chain(&e)),
                );
                (response, RequestOutcome::Failure)
            }
            Ok(Ok(response)) => {
                let outcome = status_outcome(response.status());
                lease.finish(outcome);
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                (Response::from_parts(parts, body.boxed()), outcome)
            }
        }
    }

    /// Carries the request to an RSocket instance as a request-response on stream 1 of a local connection.
    async fn relay(
        &self,
        headers: &HeaderMap,
        body: Bytes,
        route: &Route,
        lease: Lease,
        trace: Option<RequestTrace>,
        woken: bool,
    ) -> Response<ResponseBody> {
        let metadata = match request_metadata(route, headers) {
            Ok(m) => m,
            Err(message) => {
                lease.finish(RequestOutcome::AppError);
                if let Some(t) = trace {
                    t.end(RequestOutcome::AppError.as_str());
                }
                return error(StatusCode::BAD_REQUEST, "invalid_request", message);
            }
        };
        let (conn, mut rx) = Conn::local(self.hub.clone(), self.settings.clone());
        // Dropped before the answer (the client went away, or the timeout below): the instance is told.
        let mut cancel = CancelOnDrop { conn: conn.clone(), armed: true };
        let request = Body::RequestResponse {
            follows: false,
            payload: Payload { metadata: Some(metadata), data: body },
        };
        conn.forward(Frame::new(1, request), lease, trace, woken);
        let answer = match tokio::time::timeout(self.request_timeout, rx.recv()).await {
            Ok(a) => a,
            Err(_) => {
                // The instance is told (CANCEL) and the request counts as its timeout.
                cancel.armed = false;
                conn.abandon(1, RequestOutcome::Timeout);
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("`{}` did not answer within {:?}", route.service, self.request_timeout),
                );
            }
        };
        cancel.armed = false;
        let frame = match answer {
            Some(Out::Frame(f)) => f,
            Some(Out::Close) | None => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "the relay to the instance closed".to_string(),
                );
            }
        };
        let kind = frame.kind();
        match frame.body {
            Body::Payload { payload, .. } => Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(full(payload.data))
                .unwrap_or_else(|_| internal()),
            Body::Error { code, message } => rsocket_error(code, message),
            _ => error(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                format!("unexpected {kind} frame in answer to a request-response"),
            ),
        }
    }
}

/// Sends CANCEL for the local stream unless disarmed; a CANCEL after the answer would be ignored anyway.
struct CancelOnDrop {
    conn: Arc<Conn>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.conn.on_frame(Frame::new(1, Body::Cancel));
        }
    }
}

/// Runs the trigger on `workers` threads, each with its own single-threaded runtime, its own listening
/// socket on `listener`'s address (SO_REUSEPORT: the kernel spreads connections over them) and its own
/// connection pool towards instances. A request is served start to end on one thread, as nginx's workers
/// do: no hand-over between threads, no cross-thread wake-ups (measured: 22 µs of CPU per proxied request
/// on one thread against 27 µs on a two-thread work-stealing runtime). Returns the threads; they end when
/// `stop` changes.
pub fn spawn_workers(
    make: impl Fn() -> Trigger,
    listener: std::net::TcpListener,
    workers: usize,
    stop: watch::Receiver<bool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let addr = listener.local_addr()?;
    let mut first = Some(listener);
    let mut threads = Vec::new();
    for i in 0..workers.max(1) {
        let trigger = make();
        let stop = stop.clone();
        let inherited = first.take();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = match inherited {
            Some(l) => l,
            None => {
                let _context = runtime.enter();
                reuseport_listener(addr)?
            }
        };
        let thread = std::thread::Builder::new().name(format!("vigil-http-{i}")).spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => serve(trigger, l, stop).await,
                    Err(e) => tracing::error!(error = %e, "HTTP trigger worker cannot listen"),
                }
            });
        })?;
        threads.push(thread);
    }
    Ok(threads)
}

/// A listening socket on `addr` that shares its port with the trigger's other workers.
pub fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    bind_listener(addr, true)
}

/// The trigger's first listening socket. The address is first bound without SO_REUSEPORT, so a port that
/// anything else holds (another Vigil included) is an error rather than silently shared; that probe also
/// fixes the port when `addr` asks for any (port 0).
pub fn trigger_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let probe = bind_listener(addr, false)?;
    let addr = probe.local_addr()?;
    drop(probe);
    reuseport_listener(addr)
}

/// A listening socket with a deep backlog, so a burst of new connections does not wait for SYN retries.
/// Call within a tokio runtime.
pub fn bind_listener(addr: SocketAddr, reuseport: bool) -> std::io::Result<std::net::TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if reuseport {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge, h2c) on `listener` until `stop` changes. One task per
/// connection; open connections are shut down gracefully (in-flight requests finish) when `stop` changes.
pub async fn serve(trigger: Trigger, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let trigger = Arc::new(trigger);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "HTTP trigger: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let trigger = trigger.clone();
        let builder = builder.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let trigger = trigger.clone();
                async move { Ok::<_, Infallible>(trigger.handle(req, peer).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP trigger connection ended with an error");
            }
        });
    }
}

/// The route for a request to `host` (port stripped, or `None`) and `path`: the longest matching prefix (`/`
/// counts as none), then a route naming the host before one that does not.
fn pick_route<'a>(routes: &'a [HttpRoute], host: Option<&str>, path: &str) -> Option<&'a HttpRoute> {
    routes
        .iter()
        .filter(|r| {
            let host_ok = match (&r.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                (Some(_), None) => false,
            };
            host_ok && r.prefix.as_deref().is_none_or(|p| prefix_matches(p, path))
        })
        .max_by_key(|r| (r.prefix.as_deref().map_or(0, |p| p.trim_end_matches('/').len()), r.host.is_some()))
}

/// `prefix` matches `path` at a segment boundary: `/echo` matches `/echo` and `/echo/x`, not `/echoes`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The request's authority as the client sent it: the URI's (HTTP/2 `:authority`, or an absolute-form
/// HTTP/1 target), else the Host header.
fn request_authority<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)
}

/// The host name of an authority, without its port (`[::1]:80` → `[::1]`, `a.b:8080` → `a.b`).
fn host_name(authority: &str) -> &str {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |end| &authority[..=end]);
    }
    authority.split_once(':').map_or(authority, |(name, _)| name)
}

/// A request the trigger answers itself, with a JSON error.
struct BadRequest {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl BadRequest {
    fn response(self) -> Response<ResponseBody> {
        error(self.status, self.code, self.message)
    }
}

/// Reads the whole body, at most `limit` bytes (413 beyond; a declared Content-Length over the limit is
/// refused before anything is read).
async fn read_body(body: Incoming, headers: &HeaderMap, limit: usize) -> Result<Bytes, BadRequest> {
    let too_large = || BadRequest {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: "body_too_large",
        message: format!("the request body is over the trigger's limit of {limit} bytes"),
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(BadRequest {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: format!("cannot read the request body: {e}"),
        }),
    }
}

/// The routing of the request: its service, and the optional version, alias and sticky key headers.
fn request_route(service: String, headers: &HeaderMap) -> Result<Route, BadRequest> {
    let get = |name: &str| -> Result<Option<String>, BadRequest> {
        match headers.get(name).map(HeaderValue::to_str) {
            None => Ok(None),
            Some(Ok(v)) if v.trim().is_empty() => Ok(None),
            Some(Ok(v)) => Ok(Some(v.trim().to_string())),
            Some(Err(_)) => Err(BadRequest {
                status: StatusCode::BAD_REQUEST,
                code: "invalid_header",
                message: format!("header {name} must be visible ASCII"),
            }),
        }
    };
    Ok(Route {
        service,
        version: get(VERSION_HEADER)?,
        alias: get(ALIAS_HEADER)?,
        key: get(KEY_HEADER)?,
        ..Route::default()
    })
}

/// Composite metadata for an RSocket instance: the routing entry (service, then `alias=`, `version=`,
/// `key=` tags) and the request's W3C trace context entries if its traceparent is valid (an invalid one is
/// ignored, as W3C says).
fn request_metadata(route: &Route, headers: &HeaderMap) -> Result<Bytes, String> {
    let tags = route.tags();
    if let Some(tag) = tags.iter().find(|t| t.is_empty() || t.len() > 255) {
        return Err(format!("routing tag {tag:?} must be 1 to 255 bytes"));
    }
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    let mut entries = vec![metadata::Entry::new(metadata::mime::ROUTING, metadata::routing(&tags))];
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(tp) = text("traceparent").filter(|tp| metadata::TraceParent::parse(tp).is_ok()) {
        entries
            .push(metadata::Entry::new(metadata::mime::TRACEPARENT, Bytes::copy_from_slice(tp.as_bytes())));
        if let Some(ts) = text("tracestate").filter(|ts| !ts.is_empty()) {
            entries.push(metadata::Entry::new(
                metadata::mime::TRACESTATE,
                Bytes::copy_from_slice(ts.as_bytes()),
            ));
        }
    }
    if let Some(e) = entries.iter().find_map(|e| metadata::check_entry(e).err()) {
        return Err(format!("the request's metadata cannot be encoded: {e}"));
    }
    Ok(metadata::composite(&entries))
}

/// Removes the headers that describe one hop only, including those the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Adds `x-forwarded-for` (appended to a previous hop's), `x-forwarded-host`, `x-forwarded-proto` and
/// `via`; keeps the client's Host (set from HTTP/2's `:authority` when the request had no Host header).
fn forwarded_headers(headers: &mut HeaderMap, authority: Option<&str>, peer: SocketAddr, version: Version) {
    let ip = peer.ip().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(before) if !before.trim().is_empty() => format!("{before}, {ip}"),
        _ => ip.clone(),
    };
    let forwarded_for = HeaderValue::from_str(&forwarded_for).or_else(|_| HeaderValue::from_str(&ip));
    if let Ok(v) = forwarded_for {
        headers.insert("x-forwarded-for", v);
    }
    if let Some(host) = authority.and_then(|a| HeaderValue::from_str(a).ok()) {
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, host.clone());
        }
        headers.insert("x-forwarded-host", host);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    let hop = match version {
        Version::HTTP_10 => "1.0 vigil",
        Version::HTTP_2 => "2 vigil",
        _ => "1.1 vigil",
    };
    let via = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(before) => format!("{before}, {hop}"),
        None => hop.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&via) {
        headers.insert(header::VIA, v);
    }
}

/// The answer to a request the hub did not admit: 503 with Retry-After when it may work later, else 404.
/// Ends the request's trace with the refusal's outcome and answers it.
fn end_refused(trace: Option<RequestTrace>, refusal: &Refusal) -> Response<ResponseBody> {
    if let Some(t) = trace {
        t.end(refusal.outcome().as_str());
    }
    refused(refusal)
}

fn refused(refusal: &Refusal) -> Response<ResponseBody> {
    let (code, retry_after) = match refusal {
        Refusal::QueueFull { .. } => ("queue_full", 1),
        Refusal::Timeout { .. } => ("timeout", 2),
        Refusal::NoTarget(NoTarget::CircuitOpen { .. }) => ("circuit_open", 1),
        Refusal::NoTarget(NoTarget::UnknownService(_)) => ("unknown_service", 0),
        Refusal::NoTarget(NoTarget::UnknownAlias { .. }) => ("unknown_alias", 0),
        Refusal::NoTarget(NoTarget::UnknownVersion { .. }) => ("unknown_version", 0),
        Refusal::NoTarget(_) => ("unavailable", 1),
    };
    if refusal.retryable() {
        with_retry_after(
            error(StatusCode::SERVICE_UNAVAILABLE, code, refusal.to_string()),
            retry_after.max(1),
        )
    } else {
        error(StatusCode::NOT_FOUND, code, refusal.to_string())
    }
}

/// The answer to an RSocket ERROR from the instance (or from the relay on its behalf).
fn rsocket_error(code: ErrorCode, message: String) -> Response<ResponseBody> {
    match code {
        ErrorCode::APPLICATION_ERROR => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "application_error", message)
        }
        ErrorCode::REJECTED => {
            with_retry_after(error(StatusCode::SERVICE_UNAVAILABLE, "rejected", message), 1)
        }
        ErrorCode::INVALID => error(StatusCode::BAD_REQUEST, "invalid", message),
        other => error(StatusCode::BAD_GATEWAY, "bad_gateway", format!("{}: {message}", other.name())),
    }
}

fn with_retry_after(mut response: Response<ResponseBody>, seconds: u32) -> Response<ResponseBody> {
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// A JSON error answer, `{"error": {"code": ..., "message": ...}}`.
fn error(status: StatusCode, code: &str, message: String) -> Response<ResponseBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(Bytes::from(body)))
        .unwrap_or_else(|_| internal())
}

/// Only reached if a response could not be built from valid parts, which cannot happen.
fn internal() -> Response<ResponseBody> {
    let mut response = Response::new(full(Bytes::from_static(
        br#"{"error":{"code":"internal","message":"the trigger could not build its answer"}}"#,
    )));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
}

fn full(data: Bytes) -> ResponseBody {
    Full::new(data).map_err(|never: Infallible| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: Option<&str>, host: Option<&str>, service: &str) -> HttpRoute {
        HttpRoute { prefix: prefix.map(String::from), host: host.map(String::from), service: service.into() }
    }

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        assert!(prefix_matches("/echo", "/echo"));
        assert!(prefix_matches("/echo", "/echo/x"));
        assert!(prefix_matches("/echo/", "/echo/x"));
        assert!(prefix_matches("/echo/", "/echo"));
        assert!(!prefix_matches("/echo", "/echoes"));
        assert!(!prefix_matches("/echo", "/"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/", "/"));
    }

    #[test]
    fn host_names_lose_their_port() {
        assert_eq!(host_name("Example.com:8080"), "Example.com");
        assert_eq!(host_name("example.com"), "example.com");
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("user@h:1"), "h");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_headers_chain() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        forwarded_headers(&mut h, Some("svc.local:8080"), "127.0.0.2:5555".parse().unwrap(), Version::HTTP_2);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(h["x-forwarded-host"], "svc.local:8080");
        assert_eq!(h[header::HOST], "svc.local:8080");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h[header::VIA], "2 vigil");
    }

    #[test]
    fn composite_metadata_carries_routing_and_trace() {
        let r = Route {
            service: "echo".into(),
            version: Some("v2".into()),
            key: Some("u1".into()),
            ..Route::default()
        };
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static(tp));
        h.insert("tracestate", HeaderValue::from_static("a=1"));
        let m = request_metadata(&r, &h).unwrap();
        let meta = metadata::request_meta(metadata::mime::COMPOSITE, Some(&m)).unwrap();
        assert_eq!(meta.route, Some(r.clone()));
        assert_eq!(meta.traceparent.map(|t| t.to_string()).as_deref(), Some(tp));
        assert_eq!(meta.tracestate.as_deref(), Some("a=1"));

        // A broken traceparent is left out, and its tracestate with it.
        h.insert("traceparent", HeaderValue::from_static("00-nonsense"));
        let meta =
            metadata::request_meta(metadata::mime::COMPOSITE, Some(&request_metadata(&r, &h).unwrap()))
                .unwrap();
        assert_eq!(meta.route, Some(r));
        assert_eq!(meta.traceparent, None);
        assert_eq!(meta.tracestate, None);
    }

    #[test]
    fn long_tags_are_refused() {
        let r = Route { service: "echo".into(), key: Some("k".repeat(300)), ..Route::default() };
        assert!(request_metadata(&r, &HeaderMap::new()).is_err());
    }

    #[test]
    fn routes_prefer_the_longest_prefix_then_a_named_host() {
        let routes = [
            route(Some("/"), None, "root"),
            route(Some("/echo"), None, "echo"),
            route(Some("/echo"), Some("special.local"), "special"),
            route(None, Some("only-host.local"), "host"),
        ];
        let pick = |host, path| pick_route(&routes, host, path).map(|r| r.service.as_str());
        assert_eq!(pick(None, "/echo/x"), Some("echo"));
        assert_eq!(pick(Some("SPECIAL.local"), "/echo"), Some("special"));
        assert_eq!(pick(None, "/echoes"), Some("root"));
        assert_eq!(pick(Some("only-host.local"), "/x"), Some("host"));
        assert_eq!(pick(Some("only-host.local"), "/echo"), Some("echo"));
    }
}
