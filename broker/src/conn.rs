//! One RSocket connection to the broker, and the relay between connections.
//!
//! Every peer is a TCP client, so peers open streams with odd ids and the broker opens streams to
//! instances with even ids. A request that arrives on stream `a` of connection A and is routed to instance
//! connection B gets a fresh stream `b` on B; each side's stream table maps its id to the other side
//! (`Link`), and every later frame of the stream (REQUEST_N, CANCEL, PAYLOAD, ERROR) is forwarded with its
//! stream id rewritten. Data is never copied: frames hold slices of the read buffer and are written out
//! with vectored writes. A request that finds no ready instance waits in the hub's queue (`Entry::Queued`)
//! and its later frames are held until it is linked or refused.
//!
//! The HTTP trigger uses the same relay through a local connection (`Conn::local`) with no socket.
//!
//! A [`Target`] is what the hub picks for a request: an instance's connection here, or an HTTP endpoint
//! the relay POSTs to. The hub holds targets as [`Upstream`]s, without knowing connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;
use tokio_util::codec::FramedRead;
use vigil_auth as auth;

use crate::hub::{self, Admission, Refusal};
use crate::outcome::RequestOutcome;
use crate::rsocket::fragment::{Reassembler, fragment};
use crate::rsocket::frame::{Body, CodecError, ErrorCode, Frame, FrameCodec, Payload, encode_head};
use crate::rsocket::metadata::{self, Registration, Route, TraceParent};
use crate::trace::RequestTrace;
use crate::upstream::{self, Upstream};

/// The hub over the broker's targets: the one the relay, the HTTP trigger and the broker share. The hub is
/// generic only so that it need not know this module; every user names this one.
pub type Hub = hub::Hub<Target>;
/// A request's claim on one of the broker's targets.
pub type Lease = hub::Lease<Target>;

/// Where a picked request goes.
#[derive(Clone)]
pub enum Target {
    /// An RSocket connection that registered as an instance.
    Rsocket(Arc<Conn>),
    /// A plain HTTP server (managed by Vigil, or an upstream address).
    Http(SocketAddr),
}

impl Upstream for Target {
    fn http(address: SocketAddr) -> Self {
        Target::Http(address)
    }

    fn connection_id(&self) -> Option<u64> {
        match self {
            Target::Rsocket(c) => Some(c.id),
            Target::Http(_) => None,
        }
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Rsocket(c) => write!(f, "Rsocket(conn {})", c.id),
            Target::Http(a) => write!(f, "Http({a})"),
        }
    }
}

/// Connection settings from the broker config.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    pub max_frame_bytes: usize,
    pub max_reassembly_per_stream: usize,
    pub max_reassembly_per_connection: usize,
    pub max_pending_write_bytes: usize,
    pub setup_timeout: Duration,
    pub http_timeout: Duration,
    /// When set, every RSocket connection presents it in SETUP and every HTTP request as a bearer token.
    pub token: Option<Arc<str>>,
}

/// What the writer task is asked to do.
pub enum Out {
    Frame(Frame),
    /// Flush and close the connection.
    Close,
}

/// The kind of interaction a stream carries; it decides when the stream ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    RequestResponse,
    Stream,
    Channel,
}

/// Which party sits on this connection's end of a linked stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Requester,
    Responder,
}

/// State both ends of a linked stream share.
struct LinkShared {
    kind: Kind,
    lease: Mutex<Option<Lease>>,
    trace: Mutex<Option<RequestTrace>>,
    requester_done: AtomicBool,
    responder_done: AtomicBool,
}

impl LinkShared {
    fn finish(&self, outcome: RequestOutcome) {
        if let Some(lease) = lock(&self.lease).take() {
            lease.finish(outcome);
        }
        if let Some(trace) = lock(&self.trace).take() {
            trace.end(outcome.as_str());
        }
    }
}

#[derive(Clone)]
struct Link {
    peer: Arc<Conn>,
    peer_stream: u32,
    shared: Arc<LinkShared>,
    side: Side,
}

enum Entry {
    Linked(Link),
    /// Waiting in the hub's queue; frames that arrive meanwhile are held.
    Queued {
        backlog: Vec<Frame>,
        backlog_bytes: usize,
        task: AbortHandle,
    },
    /// Relayed to an HTTP instance by a task.
    Http {
        task: AbortHandle,
    },
}

struct Streams {
    entries: HashMap<u32, Entry>,
    /// Set (under this lock) when the connection is torn down: no entry may be added after.
    closed: bool,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Conn {
    pub id: u64,
    hub: Arc<Hub>,
    settings: Arc<ConnSettings>,
    tx: mpsc::UnboundedSender<Out>,
    pending_bytes: AtomicUsize,
    streams: Mutex<Streams>,
    next_stream: AtomicU32,
    /// The SETUP's metadata MIME type, which says how request metadata is encoded.
    metadata_mime: std::sync::OnceLock<String>,
    closing: Notify,
    closed: AtomicBool,
}

impl Conn {
    fn new(hub: Arc<Hub>, settings: Arc<ConnSettings>) -> (Arc<Conn>, mpsc::UnboundedReceiver<Out>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            hub,
            settings,
            tx,
            pending_bytes: AtomicUsize::new(0),
            streams: Mutex::new(Streams { entries: HashMap::new(), closed: false }),
            next_stream: AtomicU32::new(2),
            metadata_mime: std::sync::OnceLock::new(),
            closing: Notify::new(),
            closed: AtomicBool::new(false),
        });
        (conn, rx)
    }

    /// A connection without a socket for an in-process requester (the HTTP trigger): frames the broker
    /// sends it arrive on the receiver. Requests go in through [`Conn::on_frame`].
    pub fn local(hub: Arc<Hub>, settings: Arc<ConnSettings>) -> (Arc<Conn>, mpsc::UnboundedReceiver<Out>) {
        Self::new(hub, settings)
    }

    /// Queues a frame for the peer. A peer that does not read is cut off once too much waits for it.
    pub fn send(&self, frame: Frame) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let len = frame.encoded_len();
        let pending = self.pending_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if pending > self.settings.max_pending_write_bytes {
            tracing::warn!(conn = self.id, pending, "peer does not read; closing its connection");
            self.close_with(ErrorCode::CONNECTION_ERROR, "the peer did not read its frames");
            return;
        }
        let _ = self.tx.send(Out::Frame(frame));
    }

    fn close_with(&self, code: ErrorCode, message: &str) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            let _ = self.tx.send(Out::Frame(Frame::error(0, code, message)));
            let _ = self.tx.send(Out::Close);
            self.closing.notify_one();
        }
    }

    fn stream_error(&self, stream_id: u32, code: ErrorCode, message: impl Into<String>) {
        self.send(Frame::error(stream_id, code, message));
    }

    /// A free even stream id for a request the broker opens towards this connection's peer.
    fn alloc_stream(&self, streams: &Streams) -> u32 {
        loop {
            let id = self.next_stream.fetch_add(2, Ordering::Relaxed) & 0x7FFF_FFFE;
            if id != 0 && !streams.entries.contains_key(&id) {
                return id;
            }
        }
    }

    fn remove(&self, stream_id: u32) -> Option<Entry> {
        lock(&self.streams).entries.remove(&stream_id)
    }

    /// Handles one whole (reassembled) frame from this connection's peer on a stream other than 0.
    pub fn on_frame(self: &Arc<Self>, frame: Frame) {
        let stream_id = frame.stream_id;
        match &frame.body {
            Body::RequestResponse { .. }
            | Body::RequestFnf { .. }
            | Body::RequestStream { .. }
            | Body::RequestChannel { .. } => self.on_request(frame),
            _ => {
                let mut streams = lock(&self.streams);
                let ending = matches!(frame.body, Body::Cancel | Body::Error { .. });
                // Frames for a stream that already ended (a late REQUEST_N, a CANCEL crossing the
                // response) are ignored, as the spec allows.
                let Some(entry) = streams.entries.get_mut(&stream_id) else { return };
                match entry {
                    Entry::Linked(link) => {
                        let link = link.clone();
                        drop(streams);
                        self.relay(stream_id, link, frame);
                    }
                    Entry::Queued { backlog, backlog_bytes, task } => {
                        if ending {
                            task.abort();
                            streams.entries.remove(&stream_id);
                            return;
                        }
                        *backlog_bytes += frame.encoded_len();
                        if *backlog_bytes > self.settings.max_reassembly_per_stream {
                            task.abort();
                            streams.entries.remove(&stream_id);
                            drop(streams);
                            self.stream_error(
                                stream_id,
                                ErrorCode::REJECTED,
                                "too much sent while the request waits for an instance",
                            );
                            return;
                        }
                        backlog.push(frame);
                    }
                    Entry::Http { task } => {
                        if ending {
                            task.abort();
                            streams.entries.remove(&stream_id);
                        }
                    }
                }
            }
        }
    }

    /// Forwards a frame of a linked stream to the other side and ends the stream when this frame ends it.
    fn relay(self: &Arc<Self>, stream_id: u32, link: Link, mut frame: Frame) {
        let shared = &link.shared;
        let end = match (link.side, &frame.body) {
            (_, Body::Error { code, .. }) => Some(match (*code, link.side) {
                (ErrorCode::APPLICATION_ERROR | ErrorCode::REJECTED, Side::Responder) => {
                    RequestOutcome::AppError
                }
                (ErrorCode::CANCELED, _) | (_, Side::Requester) => RequestOutcome::Cancelled,
                _ => RequestOutcome::Failure,
            }),
            (Side::Requester, Body::Cancel) => Some(RequestOutcome::Cancelled),
            (Side::Responder, Body::Cancel) => {
                // The responder of a channel wants no more of the requester's payloads.
                shared.requester_done.store(true, Ordering::Relaxed);
                shared.responder_done.load(Ordering::Relaxed).then_some(RequestOutcome::Ok)
            }
            (Side::Responder, Body::Payload { complete, .. }) => match shared.kind {
                Kind::RequestResponse => Some(RequestOutcome::Ok),
                Kind::Stream => complete.then_some(RequestOutcome::Ok),
                Kind::Channel => {
                    if *complete {
                        shared.responder_done.store(true, Ordering::Relaxed);
                    }
                    (*complete && shared.requester_done.load(Ordering::Relaxed)).then_some(RequestOutcome::Ok)
                }
            },
            (Side::Requester, Body::Payload { complete, .. }) => {
                if *complete {
                    shared.requester_done.store(true, Ordering::Relaxed);
                }
                (*complete && shared.responder_done.load(Ordering::Relaxed)).then_some(RequestOutcome::Ok)
            }
            _ => None,
        };
        frame.stream_id = link.peer_stream;
        if let Some(outcome) = end {
            self.remove(stream_id);
            link.peer.remove(link.peer_stream);
            shared.finish(outcome);
        }
        link.peer.send(frame);
    }

    fn on_request(self: &Arc<Self>, frame: Frame) {
        let stream_id = frame.stream_id;
        if stream_id.is_multiple_of(2) {
            self.close_with(ErrorCode::CONNECTION_ERROR, "requests from a client must use odd stream ids");
            return;
        }
        if lock(&self.streams).entries.contains_key(&stream_id) {
            self.close_with(ErrorCode::CONNECTION_ERROR, &format!("stream {stream_id} is already in use"));
            return;
        }
        let fnf = matches!(frame.body, Body::RequestFnf { .. });
        let payload = frame.payload().cloned().unwrap_or_default();
        // Set once by SETUP; local connections (the HTTP trigger) speak composite metadata.
        let mime = self.metadata_mime.get().map_or(metadata::mime::COMPOSITE, String::as_str);
        let (route, parent) = match metadata::request_meta(mime, payload.metadata.as_ref()) {
            Ok(meta) => (meta.route, meta.traceparent.or_else(|| meta.zipkin.and_then(zipkin_parent))),
            Err(e) => {
                if !fnf {
                    self.stream_error(stream_id, ErrorCode::INVALID, format!("bad request metadata: {e}"));
                }
                return;
            }
        };
        let Some(route) = route else {
            if !fnf {
                self.stream_error(
                    stream_id,
                    ErrorCode::INVALID,
                    "no routing metadata: add a message/x.rsocket.routing.v0 entry whose first tag names the service",
                );
            }
            return;
        };
        let bytes = payload.data.len() + payload.metadata.as_ref().map_or(0, Bytes::len);
        let mut trace = self.hub.begin_trace(parent, &route.service, interaction(&frame.body));
        match self.hub.admit(&route, bytes) {
            Ok(Admission::Ready(lease)) => {
                self.link(stream_id, frame, lease, Vec::new(), &route, trace, false)
            }
            Ok(Admission::Queued(ticket)) => {
                if let Some(t) = &mut trace {
                    t.queued();
                }
                // Insert the entry before the task can finish, so its result always finds it.
                let mut streams = lock(&self.streams);
                let me = self.clone();
                let task = tokio::spawn(async move {
                    let result = ticket.wait().await;
                    me.on_admitted(frame, result, route, trace);
                });
                streams.entries.insert(
                    stream_id,
                    Entry::Queued { backlog: Vec::new(), backlog_bytes: 0, task: task.abort_handle() },
                );
            }
            Err(refusal) => {
                if let Some(t) = trace {
                    t.end(refusal.outcome().as_str());
                }
                if !fnf {
                    self.refuse(stream_id, &refusal);
                }
            }
        }
    }

    /// Sends a request that was already admitted (the HTTP trigger holds the lease) on `frame.stream_id`
    /// of this connection to the leased instance, and relays its answer back here. `woken`: the request
    /// waited for the instance to wake or start.
    pub fn forward(self: &Arc<Self>, frame: Frame, lease: Lease, trace: Option<RequestTrace>, woken: bool) {
        let route = Route { service: lease.service().to_string(), ..Route::default() };
        self.link(frame.stream_id, frame, lease, Vec::new(), &route, trace, woken);
    }

    /// Gives up on a linked stream of this connection's requester (a timeout): the instance gets CANCEL and
    /// the request ends with `outcome`.
    pub fn abandon(self: &Arc<Self>, stream_id: u32, outcome: RequestOutcome) {
        match self.remove(stream_id) {
            Some(Entry::Linked(link)) => {
                link.peer.remove(link.peer_stream);
                link.peer.send(Frame::new(link.peer_stream, Body::Cancel));
                link.shared.finish(outcome);
            }
            Some(Entry::Queued { task, .. } | Entry::Http { task }) => task.abort(),
            None => {}
        }
    }

    fn refuse(&self, stream_id: u32, refusal: &Refusal) {
        let code = if refusal.retryable() { ErrorCode::REJECTED } else { ErrorCode::INVALID };
        self.stream_error(stream_id, code, refusal.to_string());
    }

    /// The queue gave the request an instance, or refused it.
    fn on_admitted(
        self: &Arc<Self>,
        frame: Frame,
        result: Result<Lease, Refusal>,
        route: Route,
        trace: Option<RequestTrace>,
    ) {
        let stream_id = frame.stream_id;
        let fnf = matches!(frame.body, Body::RequestFnf { .. });
        let backlog = match self.remove(stream_id) {
            Some(Entry::Queued { backlog, .. }) => backlog,
            // Cancelled meanwhile: dropping the lease releases the instance.
            _ => return,
        };
        match result {
            Ok(lease) => self.link(stream_id, frame, lease, backlog, &route, trace, true),
            Err(refusal) => {
                if let Some(t) = trace {
                    t.end(refusal.outcome().as_str());
                }
                if !fnf {
                    self.refuse(stream_id, &refusal);
                }
            }
        }
    }

    /// Sends the request (and what arrived for it meanwhile) to the leased instance and links the streams.
    #[allow(clippy::too_many_arguments)]
    fn link(
        self: &Arc<Self>,
        stream_id: u32,
        mut frame: Frame,
        lease: Lease,
        backlog: Vec<Frame>,
        route: &Route,
        mut trace: Option<RequestTrace>,
        woken: bool,
    ) {
        let kind = match frame.body {
            Body::RequestFnf { .. } => None,
            Body::RequestResponse { .. } => Some(Kind::RequestResponse),
            Body::RequestStream { .. } => Some(Kind::Stream),
            _ => Some(Kind::Channel),
        };
        // The instance's own spans join the trace under the broker's client span.
        let traceparent = trace.as_mut().map(|t| {
            let state = if woken { "woken" } else { self.hub.instance_state(lease.instance_id()) };
            t.routed(lease.instance_id(), lease.version(), state)
        });
        match lease.target().clone() {
            Target::Rsocket(instance) => {
                if let (Some(tp), Some(p)) = (&traceparent, frame.payload_mut())
                    && let Ok(m) = metadata::with_traceparent(p.metadata.as_ref(), tp)
                {
                    p.metadata = Some(m);
                }
                let Some(kind) = kind else {
                    // Fire-and-forget ends when it is handed over.
                    let mut streams = lock(&instance.streams);
                    let id = instance.alloc_stream(&streams);
                    let alive = !streams.closed;
                    streams.entries.remove(&id);
                    drop(streams);
                    frame.stream_id = id;
                    instance.send(frame);
                    let outcome = if alive { RequestOutcome::Ok } else { RequestOutcome::Failure };
                    lease.finish(outcome);
                    if let Some(t) = trace {
                        t.end(outcome.as_str());
                    }
                    return;
                };
                // A channel whose request frame already completes the requester's half (a one-item channel).
                let requester_done = matches!(frame.body, Body::RequestChannel { complete: true, .. });
                let shared = Arc::new(LinkShared {
                    kind,
                    lease: Mutex::new(Some(lease)),
                    trace: Mutex::new(trace),
                    requester_done: AtomicBool::new(requester_done),
                    responder_done: AtomicBool::new(false),
                });
                // The responder's entry first: its answer can only come after the request is sent below.
                let out_id = {
                    let mut streams = lock(&instance.streams);
                    if streams.closed {
                        None
                    } else {
                        let id = instance.alloc_stream(&streams);
                        let link = Link {
                            peer: self.clone(),
                            peer_stream: stream_id,
                            shared: shared.clone(),
                            side: Side::Responder,
                        };
                        streams.entries.insert(id, Entry::Linked(link));
                        Some(id)
                    }
                };
                let Some(out_id) = out_id else {
                    shared.finish(RequestOutcome::Failure);
                    self.stream_error(stream_id, ErrorCode::REJECTED, "the instance went away; retry");
                    return;
                };
                {
                    let mut streams = lock(&self.streams);
                    if streams.closed {
                        drop(streams);
                        instance.remove(out_id);
                        shared.finish(RequestOutcome::Cancelled);
                        return;
                    }
                    let link =
                        Link { peer: instance.clone(), peer_stream: out_id, shared, side: Side::Requester };
                    streams.entries.insert(stream_id, Entry::Linked(link));
                }
                frame.stream_id = out_id;
                instance.send(frame);
                for f in backlog {
                    // Through the relay, so a held CANCEL or completion is accounted for.
                    self.on_frame(f);
                }
            }
            Target::Http(addr) => {
                if kind.is_some_and(|k| k != Kind::RequestResponse) {
                    let service = lease.service().to_string();
                    lease.finish(RequestOutcome::AppError);
                    self.stream_error(
                        stream_id,
                        ErrorCode::INVALID,
                        format!("`{service}` is an HTTP service: it takes request-response and fire-and-forget only"),
                    );
                    return;
                }
                let payload = frame.payload().cloned().unwrap_or_default();
                let me = self.clone();
                let timeout = self.settings.http_timeout;
                let path = http_path(route);
                let mut streams = lock(&self.streams);
                let traceparent = traceparent.map(|tp| tp.to_string());
                let task = tokio::spawn(async move {
                    let result =
                        upstream::call_instance(addr, &path, payload.data, timeout, traceparent.as_deref())
                            .await;
                    let (outcome, reply) = match result {
                        Ok((status, body)) if status < 400 => (
                            RequestOutcome::Ok,
                            Body::Payload {
                                follows: false,
                                complete: true,
                                next: true,
                                payload: Payload { metadata: None, data: body },
                            },
                        ),
                        Ok((status, body)) => (
                            upstream::status_outcome(
                                http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY),
                            ),
                            Body::Error {
                                code: ErrorCode::APPLICATION_ERROR,
                                message: format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                            },
                        ),
                        Err(e) => (
                            RequestOutcome::Failure,
                            Body::Error {
                                code: ErrorCode::REJECTED,
                                message: format!("the instance failed: {e}"),
                            },
                        ),
                    };
                    lease.finish(outcome);
                    if let Some(t) = trace {
                        t.end(outcome.as_str());
                    }
                    if me.remove(stream_id).is_some() && kind.is_some() {
                        me.send(Frame::new(stream_id, reply));
                    }
                });
                if kind.is_some() {
                    streams.entries.insert(stream_id, Entry::Http { task: task.abort_handle() });
                }
            }
        }
    }

    /// Ends every stream of this connection: requesters' streams towards instances are cancelled, and
    /// requesters waiting on this instance get an error they may retry.
    fn teardown(self: &Arc<Self>) {
        self.closed.store(true, Ordering::Relaxed);
        let entries: Vec<(u32, Entry)> = {
            let mut streams = lock(&self.streams);
            streams.closed = true;
            streams.entries.drain().collect()
        };
        for (_, entry) in entries {
            match entry {
                Entry::Linked(link) => {
                    link.peer.remove(link.peer_stream);
                    match link.side {
                        Side::Requester => {
                            link.shared.finish(RequestOutcome::Cancelled);
                            link.peer.send(Frame::new(link.peer_stream, Body::Cancel));
                        }
                        Side::Responder => {
                            link.shared.finish(RequestOutcome::Failure);
                            link.peer.stream_error(
                                link.peer_stream,
                                ErrorCode::REJECTED,
                                "the instance's connection closed; retry",
                            );
                        }
                    }
                }
                Entry::Queued { task, .. } | Entry::Http { task } => task.abort(),
            }
        }
        self.closing.notify_one();
    }
}

/// The RSocket interaction a request frame opens, as traces name it.
fn interaction(body: &Body) -> &'static str {
    match body {
        Body::RequestFnf { .. } => "fire_and_forget",
        Body::RequestStream { .. } => "request_stream",
        Body::RequestChannel { .. } => "request_channel",
        _ => "request_response",
    }
}

/// A zipkin context as the parent of the broker's spans (when no W3C traceparent came along).
fn zipkin_parent(z: metadata::Zipkin) -> Option<TraceParent> {
    z.has_ids().then(|| TraceParent {
        trace_id: z.trace_id,
        parent_id: z.span_id,
        flags: u8::from(z.sampled.unwrap_or(true) || z.debug),
    })
}

/// The path an RSocket request takes on an HTTP instance: the routing tags after the service that are
/// not `key=value` options, joined (`["echo", "users", "42"]` → `/users/42`), or `/`.
fn http_path(route: &Route) -> String {
    let mut path = String::new();
    for t in &route.extra {
        path.push('/');
        path.push_str(t.trim_matches('/'));
    }
    if path.is_empty() { "/".to_string() } else { path }
}

/// Writes what the broker sends this connection: small frames are gathered into one write, large data
/// goes out from the buffer it arrived in.
async fn write_loop(
    conn: Arc<Conn>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    mut wr: OwnedWriteHalf,
    mtu: usize,
) {
    const GATHER: usize = 64 << 10;
    const INLINE_DATA: usize = 16 << 10;
    const IDLE_BUFFER: usize = 4 << 10;
    // Allocated on demand and released after a burst: an idle connection holds no write buffer.
    let mut buf = BytesMut::new();
    let mut close = false;
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                Out::Close => {
                    close = true;
                    break;
                }
                Out::Frame(frame) => {
                    let len = frame.encoded_len();
                    conn.pending_bytes
                        .fetch_sub(len.min(conn.pending_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
                    let parts = if len > mtu { fragment(frame, mtu) } else { vec![frame] };
                    for f in parts {
                        let data = encode_head(&f, &mut buf);
                        if data.len() <= INLINE_DATA {
                            buf.extend_from_slice(&data);
                        } else if write_parts(&mut wr, &mut buf, data).await.is_err() {
                            break 'outer;
                        }
                    }
                }
            }
            if buf.len() < GATHER {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() && wr.write_all_buf(&mut buf).await.is_err() {
            break;
        }
        if buf.capacity() > IDLE_BUFFER {
            buf = BytesMut::new();
        }
        if close {
            break;
        }
    }
    let _ = wr.shutdown().await;
    conn.closed.store(true, Ordering::Relaxed);
    conn.closing.notify_one();
}

async fn write_parts(wr: &mut OwnedWriteHalf, head: &mut BytesMut, mut data: Bytes) -> std::io::Result<()> {
    while !head.is_empty() || !data.is_empty() {
        let slices = [std::io::IoSlice::new(head), std::io::IoSlice::new(&data)];
        let n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        let _ = head.split_to(from_head);
        let _ = data.split_to(n - from_head);
    }
    Ok(())
}

/// Serves one TCP connection until it closes.
pub async fn serve(hub: Arc<Hub>, settings: Arc<ConnSettings>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let (rd, wr) = stream.into_split();
    let (conn, rx) = Conn::new(hub.clone(), settings.clone());
    let writer = tokio::spawn(write_loop(conn.clone(), rx, wr, settings.max_frame_bytes));
    // A small read buffer to start with: most connections are idle most of the time, and it grows for
    // larger frames.
    let mut frames = FramedRead::with_capacity(rd, FrameCodec::new(settings.max_frame_bytes), 1024);

    let (registration, lifetime) = match setup(&conn, &mut frames, &peer).await {
        Some(r) => r,
        None => {
            conn.teardown();
            let _ = writer.await;
            return;
        }
    };
    let role = if registration.is_some() { "instance" } else { "requester" };
    hub.metrics.connection(role, 1);
    if let Some(reg) = &registration {
        hub.add_instance(
            &reg.service,
            &reg.version,
            &reg.instance_id,
            reg.capacity.max(1),
            true,
            Target::Rsocket(conn.clone()),
        );
    }
    read_loop(&conn, &mut frames, lifetime).await;
    if let Some(reg) = &registration {
        hub.remove_instance_if(&reg.instance_id, conn.id);
    }
    conn.teardown();
    hub.metrics.connection(role, -1);
    // Let the writer flush a final ERROR; it ends when every sender is gone or on Close.
    conn.close_with(ErrorCode::CONNECTION_CLOSE, "closing");
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    tracing::debug!(conn = conn.id, peer, "connection closed");
}

type Frames = FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>;

/// Reads and checks the SETUP frame. `None` when the connection must close (the peer was told why).
async fn setup(
    conn: &Arc<Conn>,
    frames: &mut Frames,
    peer: &str,
) -> Option<(Option<Registration>, Duration)> {
    let first = match tokio::time::timeout(conn.settings.setup_timeout, frames.next()).await {
        Ok(Some(Ok(f))) => f,
        Ok(Some(Err(e))) => {
            conn.close_with(ErrorCode::INVALID_SETUP, &format!("malformed first frame: {e}"));
            return None;
        }
        Ok(None) => return None,
        Err(_) => {
            conn.close_with(ErrorCode::INVALID_SETUP, "no SETUP frame in time");
            return None;
        }
    };
    let setup = match first.body {
        Body::Setup(s) => s,
        Body::Resume { .. } => {
            conn.close_with(ErrorCode::REJECTED_RESUME, "resumption is not supported by this broker");
            return None;
        }
        _ => {
            conn.close_with(
                ErrorCode::INVALID_SETUP,
                &format!("the first frame must be SETUP, not {}", first.kind()),
            );
            return None;
        }
    };
    if setup.major != 1 {
        conn.close_with(
            ErrorCode::UNSUPPORTED_SETUP,
            &format!(
                "protocol version {}.{} is not supported; this broker speaks 1.0",
                setup.major, setup.minor
            ),
        );
        return None;
    }
    if setup.lease {
        conn.close_with(
            ErrorCode::UNSUPPORTED_SETUP,
            "leasing is not supported; connect without the lease flag",
        );
        return None;
    }
    if setup.resume_token.is_some() {
        tracing::debug!(peer, "SETUP asks for resumability; this broker does not resume");
    }
    if let Some(expected) = &conn.settings.token {
        let presented = metadata::token(&setup.metadata_mime, setup.payload.metadata.as_ref()).ok().flatten();
        if !presented.is_some_and(|p| auth::same_secret(&p, expected.as_bytes())) {
            conn.close_with(
                ErrorCode::REJECTED_SETUP,
                "this broker needs its token: a message/x.vigil.token.v0 entry in SETUP's composite metadata",
            );
            return None;
        }
    }
    let registration = match metadata::registration(&setup.metadata_mime, setup.payload.metadata.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            conn.close_with(ErrorCode::INVALID_SETUP, &format!("bad registration: {e}"));
            return None;
        }
    };
    let _ = conn.metadata_mime.set(setup.metadata_mime.clone());
    let lifetime = Duration::from_millis(u64::from(setup.lifetime_ms.max(1)));
    tracing::debug!(conn = conn.id, peer, ?registration, ?lifetime, "SETUP");
    Some((registration, lifetime))
}

async fn read_loop(conn: &Arc<Conn>, frames: &mut Frames, lifetime: Duration) {
    let settings = conn.settings.clone();
    let mut reassembler =
        Reassembler::new(settings.max_reassembly_per_stream, settings.max_reassembly_per_connection);
    let mut deadline = tokio::time::Instant::now() + lifetime;
    loop {
        let next = tokio::select! {
            f = frames.next() => f,
            () = tokio::time::sleep_until(deadline) => {
                conn.close_with(ErrorCode::CONNECTION_ERROR, "no KEEPALIVE within the connection's lifetime");
                return;
            }
            () = conn.closing.notified() => return,
        };
        let frame = match next {
            None => return,
            Some(Err(e)) => {
                let code = match &e {
                    CodecError::Decode(d) => d.code(),
                    CodecError::Io(_) => return,
                };
                conn.close_with(code, &e.to_string());
                return;
            }
            Some(Ok(f)) => f,
        };
        deadline = tokio::time::Instant::now() + lifetime;
        if frame.stream_id == 0 {
            match frame.body {
                Body::Keepalive { respond: true, data, .. } => {
                    conn.send(Frame::new(0, Body::Keepalive { respond: false, last_position: 0, data }));
                }
                Body::Keepalive { .. } | Body::MetadataPush { .. } | Body::Ext { .. } => {}
                Body::Lease { .. } => {
                    tracing::debug!(conn = conn.id, "LEASE ignored: leasing was not agreed in SETUP");
                }
                Body::Error { code, message } => {
                    tracing::info!(conn = conn.id, code = code.name(), %message, "peer closed the connection");
                    return;
                }
                Body::Resume { .. } => {
                    conn.close_with(ErrorCode::REJECTED_RESUME, "resumption is not supported by this broker");
                    return;
                }
                _ => {
                    conn.close_with(
                        ErrorCode::CONNECTION_ERROR,
                        &format!("unexpected {} on stream 0", frame.kind()),
                    );
                    return;
                }
            }
            continue;
        }
        if matches!(frame.body, Body::Cancel | Body::Error { .. }) {
            reassembler.cancel(frame.stream_id);
        }
        match reassembler.feed(frame) {
            Ok(Some(f)) => conn.on_frame(f),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(conn = conn.id, error = %e, "fragments over the limit");
                conn.close_with(ErrorCode::CONNECTION_ERROR, &e.to_string());
                return;
            }
        }
    }
}
