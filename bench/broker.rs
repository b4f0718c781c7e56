//! Broker benchmarks (the broker issue's performance targets), all measured in one run on loopback and
//! printed as a table of measured value, target and ratio with a "met"/"missed" verdict per target:
//!
//! 1. request-response latency the broker adds: a Rust RSocket responder (our codec, tokio) answers
//!    REQUEST_RESPONSE with a 64-byte PAYLOAD, both on its own listener (direct) and registered at the
//!    broker as service `bench`. The maximum throughput of each path is found first (closed loop, 32 in
//!    flight on one connection); then both paths are driven open loop at half the broker path's maximum
//!    with a fixed inter-arrival time, and the per-request latency (send → answer) is compared at p50, p99
//!    and p99.9. Targets: added p50 ≤ 100 µs, added p99 ≤ 1 ms. This broker exports no traces: the target
//!    is the relay's own cost, and an exporting broker would share the cores with the OTLP receiver;
//! 2. HTTP trigger throughput vs nginx: `wrk -t1 -c64` against the broker's HTTP trigger (traces exported
//!    over OTLP to `collector/tests/otlp_receiver.py`) and against nginx, both proxying to the same
//!    keep-alive hyper instance. Target: broker / nginx ≥ 1.0 with tracing on. The targets alternate, each
//!    run twice, and each keeps its best run (on a shared machine a slower run is interference). A broker
//!    without trace export runs beside them for reference, and every run reports the proxy's CPU time
//!    per request, from /proc;
//! 3. memory of 10,000 idle RSocket connections (each sent a SETUP): growth of the broker's VmRSS per
//!    connection. Target: ≤ 20 KiB.
//!
//! The broker runs as its own process (`vigil broker --config FILE`, built with `cargo build --release
//! --bin vigil` unless `VIGIL_BIN` names a binary), as in production: its two tokio workers are then not
//! shared with the load generator's threads, its RSS is its own, and nginx runs as a process too. The
//! machine has two cores, so the load generator, the instance and the proxy still compete for them; both
//! proxies are measured under the same competition, one right after the other. nginx gets two worker
//! processes, as the broker gets two tokio workers.
//!
//! Run: `cargo bench -p vigil-broker --bench broker` (needs /usr/sbin/nginx and /usr/bin/wrk, from
//! `scripts/setup`, and python3 with `opentelemetry-proto` and `grpcio`). A short run: `-- --quick` or
//! `VIGIL_BENCH_QUICK=1`. Every child process is stopped on exit, also on an error or a panic.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio_util::codec::{Decoder, Encoder, Framed};
use vigil_broker::rsocket::frame::{Body, Frame, FrameCodec, Payload, Setup};
use vigil_broker::rsocket::metadata::{Entry, composite, mime, routing};

/// Bytes of every request and answer body, RSocket and HTTP.
const BODY_BYTES: usize = 64;
const SERVICE: &str = "bench";
/// Requests in flight while looking for a path's maximum throughput.
const MAX_IN_FLIGHT: usize = 32;
const IDLE_CONNECTIONS: usize = 10_000;
/// Idle connections opened before waiting for the broker to count them.
const IDLE_CHUNK: usize = 100;
const OTEL_VARS: [&str; 3] =
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"];

/// How long each phase runs; `--quick` shortens everything.
struct Plan {
    max_run: Duration,
    paced_run: Duration,
    wrk_run: Duration,
    wrk_rounds: usize,
    idle_connections: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                max_run: Duration::from_secs(1),
                paced_run: Duration::from_secs(2),
                wrk_run: Duration::from_secs(2),
                wrk_rounds: 1,
                idle_connections: 2_000,
            }
        } else {
            Plan {
                max_run: Duration::from_secs(3),
                paced_run: Duration::from_secs(5),
                wrk_run: Duration::from_secs(8),
                wrk_rounds: 2,
                idle_connections: IDLE_CONNECTIONS,
            }
        }
    }
}

// --- Child processes ---------------------------------------------------------------------------------------

/// A child process stopped on drop: SIGTERM (nginx's master then stops its workers, the broker flushes its
/// traces), SIGKILL if it is still there after 3 s.
struct Proc {
    name: &'static str,
    child: Child,
    /// Held open for children that exit when their stdin closes (the OTLP receiver).
    _stdin: Option<ChildStdin>,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status})", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A directory for configs and logs, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("vigil-bench-broker-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The `vigil` binary: `VIGIL_BIN`, or the workspace's release build, brought up to date first.
fn vigil_binary() -> Result<PathBuf> {
    if let Ok(bin) = std::env::var("VIGIL_BIN") {
        let bin = PathBuf::from(bin);
        ensure!(bin.is_file(), "VIGIL_BIN={} is not a file", bin.display());
        return Ok(bin);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--quiet", "--release", "--bin", "vigil"])
        .current_dir(workspace)
        .status()
        .with_context(|| format!("run {cargo} build --release --bin vigil"))?;
    ensure!(status.success(), "cargo build --release --bin vigil failed ({status})");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let bin = target.join("release/vigil");
    ensure!(bin.is_file(), "{} missing after the build", bin.display());
    Ok(bin)
}

/// A broker process and the addresses it serves.
struct BrokerProc {
    proc: Proc,
    rsocket: SocketAddr,
    trigger: SocketAddr,
    api: SocketAddr,
}

/// Starts `vigil broker` with `upstream` as the HTTP upstream `up` on route `/`, OTLP trace export to
/// `otlp` if given (and none otherwise, whatever this process's environment says), and a descriptor limit
/// of 65,536 (or the hard limit) for the idle-connection count.
fn start_broker(
    bin: &Path,
    dir: &Path,
    name: &str,
    upstream: Option<SocketAddr>,
    otlp: Option<u16>,
) -> Result<BrokerProc> {
    let (rsocket, trigger, api) = (free_port()?, free_port()?, free_port()?);
    let mut yaml = format!(
        "http:\n  listen: 127.0.0.1:{api}\nbroker:\n  listen: 127.0.0.1:{rsocket}\n  http:\n    listen: \
         127.0.0.1:{trigger}\n"
    );
    if let Some(up) = upstream {
        yaml.push_str(&format!(
            "  upstreams:\n    - {{ service: up, address: {up}, route: /, capacity: 1024 }}\n"
        ));
    }
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, yaml)?;
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n 65536 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; exec \"$0\" broker --config \"$1\"")
        .arg(bin)
        .arg(&config)
        .env("VIGIL_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    for var in OTEL_VARS {
        cmd.env_remove(var);
    }
    if let Some(port) = otlp {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}"));
    }
    let child = cmd.spawn().context("spawn vigil broker")?;
    let mut proc = Proc { name: "vigil broker", child, _stdin: None };
    let api = SocketAddr::from(([127, 0, 0, 1], api));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Err(e) = proc.check_running() {
            bail!("{e}; its log:\n{}", log_tail(&log));
        }
        if http_get(api, "/healthz").is_ok_and(|(status, _)| status == 200) {
            break;
        }
        ensure!(Instant::now() < deadline, "broker not healthy within 20 s; its log:\n{}", log_tail(&log));
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(BrokerProc {
        proc,
        rsocket: SocketAddr::from(([127, 0, 0, 1], rsocket)),
        trigger: SocketAddr::from(([127, 0, 0, 1], trigger)),
        api,
    })
}

/// One HTTP/1.1 GET on a fresh connection: status and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split_ascii_whitespace().nth(1).and_then(|c| c.parse().ok()).context("HTTP status")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// `vigil_broker_connections{role="<role>"}` from the broker's /metrics.
fn broker_connections(api: SocketAddr, role: &str) -> Result<u64> {
    let (_, text) = http_get(api, "/metrics")?;
    let key = format!("vigil_broker_connections{{role=\"{role}\"}}");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

fn proc_status_kib(pid: u32, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{key} of pid {pid}"))
}

/// User + system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = text.rfind(')').map(|i| &text[i + 2..]).unwrap_or("");
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0 // USER_HZ
}

/// `pid` and its children (nginx's master and workers).
fn process_and_children(pid: u32) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid).chain(children.split_ascii_whitespace().filter_map(|c| c.parse().ok())).collect()
}

/// The Python OTLP trace receiver; its span lines are counted and discarded.
struct Receiver {
    proc: Proc,
    port: u16,
    spans: Arc<AtomicU64>,
}

fn start_receiver() -> Result<Receiver> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../collector/tests/otlp_receiver.py");
    let mut child = Command::new("python3")
        .arg("-u")
        .arg(script)
        .args(["--port", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("run python3 {script}"))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let proc = Proc { name: "OTLP receiver", child, _stdin: stdin };
    let mut lines = BufReader::new(stdout.context("receiver stdout")?);
    let mut first = String::new();
    lines.read_line(&mut first)?;
    let port: u16 = first.trim().parse().with_context(|| format!("receiver said {first:?}, not a port"))?;
    let spans = Arc::new(AtomicU64::new(0));
    let counter = spans.clone();
    // Raw lines into one buffer: this thread shares the machine with the measured paths.
    std::thread::spawn(move || {
        let mut line = Vec::with_capacity(4096);
        while lines.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if !line.windows(7).any(|w| w == b"\"end\": ") {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            line.clear();
        }
    });
    Ok(Receiver { proc, port, spans })
}

fn start_nginx(dir: &Path, upstream: SocketAddr) -> Result<(Proc, SocketAddr)> {
    let port = free_port()?;
    let d = dir.display();
    // Two workers, as the broker has two tokio workers. No `user`: as root, the workers run as nobody,
    // which needs no file here (no logs, bodies this small never reach the temp paths).
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\n\
         error_log {d}/nginx.log error;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         \x20 upstream up {{ server {upstream}; keepalive 64; }}\n\
         \x20 server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://up;\n\
         \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let log = dir.join("nginx.log");
    let child = Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("nginx.stderr"))?)
        .spawn()
        .context("spawn /usr/sbin/nginx (scripts/setup installs nginx-light)")?;
    let mut proc = Proc { name: "nginx", child, _stdin: None };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if let Err(e) = proc.check_running() {
            bail!("{e}: {}\n{}", log_tail(&dir.join("nginx.stderr")), log_tail(&log));
        }
        ensure!(Instant::now() < deadline, "nginx not listening within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((proc, addr))
}

// --- The instances (tokio, in this process) ----------------------------------------------------------------

/// A keep-alive HTTP/1.1 server answering every request with `BODY_BYTES` bytes.
async fn http_instance(listener: tokio::net::TcpListener) {
    static BODY: [u8; BODY_BYTES] = [b'x'; BODY_BYTES];
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_req| async {
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(&BODY))))
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn setup_frame(metadata: Option<Bytes>) -> Frame {
    Frame::new(
        0,
        Body::Setup(Setup {
            major: 1,
            minor: 0,
            lease: false,
            keepalive_ms: 30_000,
            lifetime_ms: 600_000,
            resume_token: None,
            metadata_mime: mime::COMPOSITE.into(),
            data_mime: mime::OCTET_STREAM.into(),
            payload: Payload { metadata, data: Bytes::new() },
        }),
    )
}

/// Answers every REQUEST_RESPONSE with its 64-byte data, on the request's stream id, and every KEEPALIVE
/// that asks for it. Answers to the frames that arrived together are written together (pipelining).
async fn rsocket_responder(stream: tokio::net::TcpStream, setup: Option<Frame>) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut wire = Framed::new(stream, FrameCodec::default());
    if let Some(setup) = setup {
        wire.send(setup).await?;
    }
    while let Some(frame) = wire.next().await {
        let mut frame = Some(frame?);
        while let Some(f) = frame.take() {
            let answer = match f.body {
                Body::RequestResponse { payload, .. } => Some(Body::Payload {
                    follows: false,
                    complete: true,
                    next: true,
                    payload: Payload { metadata: None, data: payload.data },
                }),
                Body::Keepalive { respond: true, data, .. } => {
                    Some(Body::Keepalive { respond: false, last_position: 0, data })
                }
                Body::Error { code, message } if f.stream_id == 0 => {
                    bail!("connection error {code:?}: {message}")
                }
                _ => None,
            };
            if let Some(body) = answer {
                wire.feed(Frame::new(f.stream_id, body)).await?;
            }
            if let Some(Some(next)) = wire.next().now_or_never() {
                frame = Some(next?);
            }
        }
        SinkExt::<Frame>::flush(&mut wire).await?;
    }
    Ok(())
}

// --- The RSocket requester (plain threads, for pacing finer than tokio's 1 ms timer) -----------------------

/// A requester connection with a SETUP sent; requests carry `route`'s composite routing metadata (also on
/// the direct path, so both paths carry the same bytes).
struct Requester {
    stream: TcpStream,
    codec: FrameCodec,
    route: Bytes,
    next_id: u32,
}

impl Requester {
    fn connect(addr: SocketAddr) -> Result<Requester> {
        let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let mut codec = FrameCodec::default();
        let mut out = BytesMut::new();
        codec.encode(setup_frame(None), &mut out)?;
        stream.write_all(&out)?;
        let route = composite(&[Entry { mime: mime::ROUTING.into(), value: routing(&[SERVICE]) }]);
        Ok(Requester { stream, codec, route, next_id: 1 })
    }

    /// Appends a request whose data starts with `stamp` (nanoseconds since `base`, echoed by the responder).
    fn encode_request(&mut self, stamp: u64, out: &mut BytesMut) -> Result<()> {
        let mut data = vec![0u8; BODY_BYTES];
        data[..8].copy_from_slice(&stamp.to_le_bytes());
        let payload = Payload { metadata: Some(self.route.clone()), data: Bytes::from(data) };
        let frame = Frame::new(self.next_id, Body::RequestResponse { follows: false, payload });
        self.next_id += 2;
        self.codec.encode(frame, out)?;
        Ok(())
    }
}

/// The stamp of an answer, or an error for anything but an answer (keepalives give `None`).
fn answer_stamp(frame: &Frame) -> Result<Option<u64>> {
    match &frame.body {
        Body::Payload { payload, .. } if payload.data.len() >= 8 => {
            let mut stamp = [0u8; 8];
            stamp.copy_from_slice(&payload.data[..8]);
            Ok(Some(u64::from_le_bytes(stamp)))
        }
        Body::Keepalive { .. } => Ok(None),
        Body::Error { code, message } => bail!("stream {}: error {code:?}: {message}", frame.stream_id),
        other => bail!("stream {}: unexpected {other:?}", frame.stream_id),
    }
}

/// Reads what is there and decodes every whole frame.
fn read_frames(stream: &mut TcpStream, codec: &mut FrameCodec, buf: &mut BytesMut) -> Result<Vec<Frame>> {
    let mut chunk = [0u8; 64 << 10];
    let n = stream.read(&mut chunk)?;
    ensure!(n > 0, "connection closed by the peer");
    buf.extend_from_slice(&chunk[..n]);
    let mut frames = Vec::new();
    while let Some(f) = codec.decode(buf)? {
        frames.push(f);
    }
    Ok(frames)
}

/// Closed loop: `in_flight` requests outstanding for `run`; answers per second.
fn max_throughput(addr: SocketAddr, in_flight: usize, run: Duration) -> Result<f64> {
    let mut r = Requester::connect(addr)?;
    r.stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (mut out, mut buf) = (BytesMut::new(), BytesMut::new());
    for _ in 0..in_flight {
        r.encode_request(0, &mut out)?;
    }
    r.stream.write_all(&out)?;
    out.clear();
    let started = Instant::now();
    let (mut outstanding, mut answered) = (in_flight, 0u64);
    while outstanding > 0 {
        for f in read_frames(&mut r.stream, &mut r.codec, &mut buf)? {
            if answer_stamp(&f)?.is_none() {
                continue;
            }
            answered += 1;
            if started.elapsed() < run {
                r.encode_request(0, &mut out)?;
            } else {
                outstanding -= 1;
            }
        }
        if !out.is_empty() {
            r.stream.write_all(&out)?;
            out.clear();
        }
    }
    Ok(answered as f64 / started.elapsed().as_secs_f64())
}

struct Paced {
    /// Send → answer, nanoseconds, sorted.
    latencies: Vec<u64>,
    sent_per_second: f64,
    /// Writes (each carrying every request due by then).
    writes: usize,
    /// 99th percentile of a write's delay behind the schedule of its first request.
    lag_p99: Duration,
}

/// Open loop: one request every 1/`rate` s for `run`, answers read on this thread. A writer thread sleeps
/// until the next request is due and then writes every request due by then in one write (a sleep lasts
/// ~60 µs at least, longer than the interval at high rates; one write per request would make the load
/// generator, not the path, the bottleneck). Latency runs from that write to the answer's read, both on
/// this host's monotonic clock; how late writes are behind the schedule is reported beside it.
fn paced(addr: SocketAddr, rate: f64, run: Duration) -> Result<Paced> {
    let mut r = Requester::connect(addr)?;
    let mut reader = r.stream.try_clone()?;
    reader.set_read_timeout(Some(Duration::from_secs(10)))?;
    let total = (rate * run.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let base = Instant::now();
    let writer = std::thread::spawn(move || -> Result<(Duration, Vec<u64>)> {
        let mut out = BytesMut::new();
        let mut lags = Vec::new();
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            let next_due = start + interval.mul_f64(sent as f64);
            let now = Instant::now();
            if next_due > now {
                std::thread::sleep(next_due - now);
                continue;
            }
            // Everything due by now goes out in one write, stamped with the time of that write.
            let due = ((now - start).as_secs_f64() / interval.as_secs_f64()) as u64 + 1;
            lags.push((now - next_due).as_nanos() as u64);
            let stamp = base.elapsed().as_nanos() as u64;
            for _ in sent..due.min(total) {
                r.encode_request(stamp, &mut out)?;
            }
            r.stream.write_all(&out)?;
            out.clear();
            sent = due.min(total);
        }
        lags.sort_unstable();
        Ok((start.elapsed(), lags))
    });
    let mut latencies = Vec::with_capacity(total as usize);
    let (mut codec, mut buf) = (FrameCodec::default(), BytesMut::new());
    let mut failure = None;
    while (latencies.len() as u64) < total {
        match read_frames(&mut reader, &mut codec, &mut buf) {
            Ok(frames) => {
                let now = base.elapsed().as_nanos() as u64;
                for f in &frames {
                    match answer_stamp(f) {
                        Ok(Some(stamp)) => latencies.push(now.saturating_sub(stamp)),
                        Ok(None) => {}
                        Err(e) => failure = Some(e),
                    }
                }
            }
            Err(e) => failure = Some(e),
        }
        if failure.is_some() {
            break;
        }
    }
    if let Some(e) = failure {
        let _ = reader.shutdown(std::net::Shutdown::Both);
        let _ = writer.join();
        return Err(e.context(format!("after {} of {total} answers", latencies.len())));
    }
    let (sending, lags) = writer.join().map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
    latencies.sort_unstable();
    Ok(Paced {
        latencies,
        sent_per_second: total as f64 / sending.as_secs_f64(),
        writes: lags.len(),
        lag_p99: Duration::from_nanos(percentile(&lags, 0.99)),
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn micros(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

// --- wrk ---------------------------------------------------------------------------------------------------

struct WrkRun {
    requests_per_second: f64,
    p50: Duration,
    p99: Duration,
    /// Non-2xx/3xx answers and socket errors.
    errors: u64,
}

fn wrk_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().ok()?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

fn wrk(addr: SocketAddr, run: Duration) -> Result<WrkRun> {
    let out = Command::new("/usr/bin/wrk")
        .args(["-t1", "-c64", &format!("-d{}s", run.as_secs()), "--latency"])
        .arg(format!("http://{addr}/"))
        .output()
        .context("run /usr/bin/wrk (scripts/setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "wrk failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let field =
        |key: &str| text.lines().find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()));
    let requests_per_second = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let latency = |key: &str| {
        field(key).and_then(|v| wrk_duration(&v)).with_context(|| format!("no {key} latency in:\n{text}"))
    };
    let mut errors: u64 = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    if let Some(socket) = field("Socket errors:") {
        errors += socket
            .split(',')
            .filter_map(|part| part.split_ascii_whitespace().last()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(WrkRun { requests_per_second, p50: latency("50%")?, p99: latency("99%")?, errors })
}

// --- Report ------------------------------------------------------------------------------------------------

struct Row {
    target: &'static str,
    measured: String,
    goal: &'static str,
    ratio: f64,
    met: bool,
}

fn print_table(rows: &[Row]) {
    println!();
    println!("{:<44} {:<62} {:<12} {:>7}  verdict", "target", "measured", "goal", "ratio");
    for r in rows {
        println!(
            "{:<44} {:<62} {:<12} {:>7.3}  {}",
            r.target,
            r.measured,
            r.goal,
            r.ratio,
            if r.met { "met" } else { "missed" }
        );
    }
    println!();
    for r in rows {
        println!(
            "verdict: {}: {} {} (ratio {:.3})",
            r.target,
            if r.met { "met" } else { "missed" },
            r.goal,
            r.ratio
        );
    }
}

// --- The three benchmarks ----------------------------------------------------------------------------------

fn latency_bench(plan: &Plan, broker: &BrokerProc, direct: SocketAddr, rows: &mut Vec<Row>) -> Result<()> {
    // Registered? Then a request through the broker is answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker_connections(broker.api, "instance").unwrap_or(0) == 0 {
        ensure!(Instant::now() < deadline, "the responder did not register at the broker within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    for addr in [direct, broker.rsocket] {
        max_throughput(addr, MAX_IN_FLIGHT, Duration::from_millis(500)).context("warm-up")?;
    }
    let direct_max = max_throughput(direct, MAX_IN_FLIGHT, plan.max_run)?;
    let broker_max = max_throughput(broker.rsocket, MAX_IN_FLIGHT, plan.max_run)?;
    println!(
        "1. request-response (broker without trace export), closed loop, {MAX_IN_FLIGHT} in flight, \
         {} s each: direct {direct_max:.0}/s, via broker {broker_max:.0}/s",
        plan.max_run.as_secs()
    );
    let rate = (broker_max / 2.0).max(100.0);
    let d = paced(direct, rate, plan.paced_run).context("paced, direct")?;
    let b = paced(broker.rsocket, rate, plan.paced_run).context("paced, via broker")?;
    for (name, p) in [("direct", &d), ("via broker", &b)] {
        println!(
            "   open loop {rate:.0}/s for {} s {name:<10}: sent {:.0}/s, {} answers, p50 {:.1} µs, \
             p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs; {} writes, p99 write lag {:.0} µs",
            plan.paced_run.as_secs(),
            p.sent_per_second,
            p.latencies.len(),
            micros(percentile(&p.latencies, 0.50)),
            micros(percentile(&p.latencies, 0.99)),
            micros(percentile(&p.latencies, 0.999)),
            micros(p.latencies.last().copied().unwrap_or(0)),
            p.writes,
            p.lag_p99.as_secs_f64() * 1e6,
        );
    }
    for (q, label, goal, limit_us) in [
        (0.50, "added p50 latency, broker vs direct", "<= 100 µs", 100.0),
        (0.99, "added p99 latency, broker vs direct", "<= 1 ms", 1000.0),
    ] {
        let (dq, bq) = (micros(percentile(&d.latencies, q)), micros(percentile(&b.latencies, q)));
        let added = bq - dq;
        rows.push(Row {
            target: label,
            measured: format!("{added:.1} µs ({bq:.1} via broker − {dq:.1} direct, at {rate:.0}/s)"),
            goal,
            ratio: added / limit_us,
            met: added <= limit_us,
        });
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn http_bench(
    plan: &Plan,
    traced: &BrokerProc,
    untraced: &BrokerProc,
    nginx: &Proc,
    nginx_addr: SocketAddr,
    instance: SocketAddr,
    receiver: &mut Receiver,
    rows: &mut Vec<Row>,
) -> Result<()> {
    for (name, addr) in [("instance", instance), ("broker", traced.trigger), ("nginx", nginx_addr)] {
        let (status, body) = http_get(addr, "/")?;
        ensure!(status == 200 && body.len() == BODY_BYTES, "{name}: GET / gave {status} with {body:?}");
    }
    // Each target with the processes doing its proxying, whose CPU time is reported per request.
    let targets = [
        ("broker, tracing on", traced.trigger, vec![traced.proc.pid()]),
        ("nginx", nginx_addr, process_and_children(nginx.pid())),
        ("broker, tracing off", untraced.trigger, vec![untraced.proc.pid()]),
    ];
    for (_, addr, _) in &targets {
        wrk(*addr, Duration::from_secs(1)).context("warm-up")?;
    }
    let spans_before = receiver.spans.load(Ordering::Relaxed);
    let receiver_cpu = cpu_seconds(receiver.proc.pid());
    let mut runs: Vec<Vec<WrkRun>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..plan.wrk_rounds {
        for (i, (name, addr, pids)) in targets.iter().enumerate() {
            let cpu = |pids: &[u32]| pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
            let (proxy_before, receiver_before) = (cpu(pids), cpu_seconds(receiver.proc.pid()));
            let r = wrk(*addr, plan.wrk_run).with_context(|| format!("wrk against {name}"))?;
            let proxy_cpu = cpu(pids) - proxy_before;
            let receiver_cpu = cpu_seconds(receiver.proc.pid()) - receiver_before;
            let requests = r.requests_per_second * plan.wrk_run.as_secs_f64();
            println!(
                "2. wrk -t1 -c64 -d{}s round {} {name:<20}: {:>6.0} req/s, p50 {:>5.0} µs, \
                 p99 {:>5.0} µs, {} errors; proxy CPU {proxy_cpu:.1} s = {:.1} µs/req; \
                 OTLP receiver CPU {receiver_cpu:.1} s",
                plan.wrk_run.as_secs(),
                round + 1,
                r.requests_per_second,
                r.p50.as_secs_f64() * 1e6,
                r.p99.as_secs_f64() * 1e6,
                r.errors,
                proxy_cpu / requests * 1e6,
            );
            runs[i].push(r);
        }
    }
    receiver.proc.check_running()?;
    let spans = receiver.spans.load(Ordering::Relaxed) - spans_before;
    println!(
        "   OTLP receiver got {spans} spans from the traced broker during the timed runs, using \
         {:.1} CPU s in all (it shares the two cores with the traced broker)",
        cpu_seconds(receiver.proc.pid()) - receiver_cpu
    );
    let best = |runs: &[WrkRun]| runs.iter().map(|r| r.requests_per_second).fold(0.0, f64::max);
    let errors: u64 = runs.iter().flatten().map(|r| r.errors).sum();
    let (broker, nginx_best, off) = (best(&runs[0]), best(&runs[1]), best(&runs[2]));
    let ratio = broker / nginx_best;
    rows.push(Row {
        target: "HTTP throughput, broker (traced) / nginx",
        measured: format!(
            "{broker:.0} / {nginx_best:.0} req/s, best of {}{}{}",
            plan.wrk_rounds,
            if spans == 0 { ", NO spans exported" } else { ", spans exported" },
            if errors > 0 { format!(", {errors} errors") } else { String::new() }
        ),
        goal: ">= 1.0",
        ratio,
        met: ratio >= 1.0 && errors == 0,
    });
    println!("   broker with tracing off (not a target): {off:.0} req/s = {:.3} × nginx", off / nginx_best);
    Ok(())
}

fn idle_bench(plan: &Plan, bin: &Path, dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let n = plan.idle_connections;
    let broker = start_broker(bin, dir, "idle", None, None)?;
    let pid = broker.proc.pid();
    std::thread::sleep(Duration::from_millis(500));
    let before = proc_status_kib(pid, "VmRSS:")?;
    let mut setup = BytesMut::new();
    FrameCodec::default().encode(setup_frame(None), &mut setup)?;
    // In chunks, each counted by the broker before the next: the broker listens with a backlog of 128, and
    // a burst beyond what it has accepted overflows it and costs the connection a 1 s SYN retransmit.
    let started = Instant::now();
    // Counting is given 10 s beyond a generous 2 ms per connection; then the count is reported as it is.
    let deadline = started + Duration::from_secs(10) + Duration::from_millis(n as u64 * 2);
    let mut conns = Vec::with_capacity(n);
    let mut seen = 0;
    while conns.len() < n {
        for _ in 0..IDLE_CHUNK.min(n - conns.len()) {
            let mut c = TcpStream::connect(broker.rsocket)
                .with_context(|| format!("connection {}", conns.len() + 1))?;
            c.write_all(&setup)?;
            conns.push(c);
        }
        loop {
            seen = broker_connections(broker.api, "requester")?;
            if seen as usize >= conns.len() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let opened = started.elapsed();
    // Let the broker finish whatever the SETUPs started (first keepalive timers and the like).
    std::thread::sleep(Duration::from_millis(500));
    let after = proc_status_kib(pid, "VmRSS:")?;
    let per = after.saturating_sub(before) as f64 / n as f64;
    println!(
        "3. {n} idle connections opened and counted in {:.2} s; broker counts {seen} requesters; \
         VmRSS {before} KiB → {after} KiB (VmHWM {} KiB)",
        opened.as_secs_f64(),
        proc_status_kib(pid, "VmHWM:")?
    );
    rows.push(Row {
        target: "memory per idle connection",
        measured: format!("{per:.2} KiB ({n} connections, {seen} counted)"),
        goal: "<= 20 KiB",
        ratio: per / 20.0,
        met: per <= 20.0 && seen as usize >= n,
    });
    drop(conns);
    Ok(())
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_ascii_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn raise_nofile() -> Result<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let want = limit.maximum.map_or(65_536, |max| max.min(65_536));
    if limit.current.is_none_or(|cur| cur < want) {
        setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: limit.maximum })
            .context("raise RLIMIT_NOFILE")?;
    }
    Ok(want)
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var("VIGIL_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let plan = Plan::new(quick);
    let began = Instant::now();
    let nofile = raise_nofile()?;
    ensure!(
        nofile as usize > plan.idle_connections + 1000,
        "RLIMIT_NOFILE hard limit {nofile} too low for {} connections",
        plan.idle_connections
    );
    let bin = vigil_binary()?;
    // Anything else busy on the machine takes CPU from the measured paths; the load average shows it.
    let loadavg_start = loadavg();
    let dir = TempDir::new()?;
    println!(
        "broker bench{}: {} on {} cores, broker process {}",
        if quick { " (quick)" } else { "" },
        std::env::consts::ARCH,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        bin.display()
    );

    // The instances: one tokio worker, in this process.
    let peers = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let (direct, instance) = peers.block_on(async {
        let direct = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        anyhow::Ok((direct, http))
    })?;
    let (direct_addr, instance_addr) = (direct.local_addr()?, instance.local_addr()?);
    peers.spawn(async move {
        loop {
            let Ok((stream, _)) = direct.accept().await else { continue };
            tokio::spawn(rsocket_responder(stream, None));
        }
    });
    peers.spawn(http_instance(instance));

    let mut rows = Vec::new();

    // 1. Latency: a broker without trace export, the responder registered at it.
    {
        let broker = start_broker(&bin, &dir.0, "latency", None, None)?;
        let register =
            format!(r#"{{"service":"{SERVICE}","version":"v1","instance_id":"bench-0","capacity":1024}}"#);
        let setup =
            setup_frame(Some(composite(&[Entry { mime: mime::REGISTER.into(), value: register.into() }])));
        let rsocket = broker.rsocket;
        let registration = peers.spawn(async move {
            let stream = tokio::net::TcpStream::connect(rsocket).await?;
            rsocket_responder(stream, Some(setup)).await
        });
        let result = latency_bench(&plan, &broker, direct_addr, &mut rows);
        registration.abort();
        result.context("request-response latency")?;
    }

    // 2. HTTP: the traced broker, nginx and an untraced broker in front of the same instance.
    {
        let mut receiver = start_receiver()?;
        let traced = start_broker(&bin, &dir.0, "http-traced", Some(instance_addr), Some(receiver.port))?;
        let untraced = start_broker(&bin, &dir.0, "http-untraced", Some(instance_addr), None)?;
        let (nginx, nginx_addr) = start_nginx(&dir.0, instance_addr)?;
        http_bench(&plan, &traced, &untraced, &nginx, nginx_addr, instance_addr, &mut receiver, &mut rows)
            .context("HTTP trigger vs nginx")?;
    }

    // 3. Idle connections, on a fresh broker so earlier load does not colour its RSS.
    idle_bench(&plan, &bin, &dir.0, &mut rows).context("idle connections")?;

    print_table(&rows);
    println!(
        "broker bench took {:.0} s; load average at the start {loadavg_start}, at the end {}",
        began.elapsed().as_secs_f64(),
        loadavg()
    );
    Ok(())
}
