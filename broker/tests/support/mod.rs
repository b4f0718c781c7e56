//! Shared by the broker's integration tests: a broker on ephemeral loopback ports, the Python interop peers,
//! and the broker's metrics as text.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use vigil_broker::Broker;
use vigil_broker::config::BrokerFile;
use vigil_broker::rsocket::frame::{Body, Frame, FrameCodec, Payload, Setup};
use vigil_broker::rsocket::metadata::mime;

pub mod load;
pub mod stack;

pub fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// A broker on ephemeral loopback ports; `extra` is YAML appended after `broker:`'s own keys (indent two
/// spaces for broker keys, none for top-level keys such as `services:`).
pub async fn start_broker(extra: &str) -> Broker {
    let yaml = format!("broker:\n  listen: 127.0.0.1:0\n  http: {{ listen: 127.0.0.1:0 }}\n{extra}");
    let file = BrokerFile::parse(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    Broker::start(file, None).await.expect("broker starts")
}

/// The broker's metrics in the Prometheus text format.
pub fn metric(broker: &Broker) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &broker.metrics_registry()).expect("encodes");
    text
}

/// Polls `cond` every 50 ms for up to 10 s.
pub async fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running `service.py`, killed on drop.
pub struct Peer {
    pub child: Child,
}

impl Peer {
    pub async fn service(broker: SocketAddr, service: &str, version: &str, id: &str, extra: &[&str]) -> Peer {
        let mut child = Command::new("python3")
            .arg(interop_dir().join("service.py"))
            .args(["--broker", &broker.to_string(), "--service", service, "--version", version])
            .args(["--instance-id", id])
            .args(extra)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs service.py");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
        assert!(matches!(ready, Ok(Ok(Some(ref l))) if l == "ready"), "service.py not ready: {ready:?}");
        // SETUP is written; give the broker a moment to register it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Peer { child }
    }
}

/// Runs `client.py` to completion (20 s at most) and returns its JSON lines.
pub async fn client(broker: SocketAddr, routes: &[&str], command: &[&str]) -> Vec<Value> {
    client_within(broker, routes, command, 20).await
}

/// [`client`] with `timeout_s` seconds for the whole command, for long loads on a busy machine.
pub async fn client_within(
    broker: SocketAddr,
    routes: &[&str],
    command: &[&str],
    timeout_s: u32,
) -> Vec<Value> {
    let mut cmd = Command::new("python3");
    cmd.arg(interop_dir().join("client.py")).args([
        "--broker",
        &broker.to_string(),
        "--timeout",
        &timeout_s.to_string(),
    ]);
    for r in routes {
        cmd.args(["--route", r]);
    }
    let out = cmd.args(command).kill_on_drop(true).output().await.expect("python3 runs client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client.py {command:?} failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// A SETUP with composite metadata (`metadata`, if any), keepalive 1 s and the given lifetime.
pub fn setup_frame(lifetime_ms: u32, metadata: Option<bytes::Bytes>) -> Frame {
    Frame::new(
        0,
        Body::Setup(Setup {
            major: 1,
            minor: 0,
            lease: false,
            keepalive_ms: 1000,
            lifetime_ms,
            resume_token: None,
            metadata_mime: mime::COMPOSITE.into(),
            data_mime: mime::OCTET_STREAM.into(),
            payload: Payload { metadata, data: bytes::Bytes::new() },
        }),
    )
}

pub type Wire = tokio_util::codec::Framed<tokio::net::TcpStream, FrameCodec>;

/// A connection to the broker that has sent `setup`.
pub async fn connect(broker: SocketAddr, setup: Frame) -> Wire {
    use futures_util::SinkExt;
    let stream = tokio::net::TcpStream::connect(broker).await.expect("connects");
    let mut wire = tokio_util::codec::Framed::new(stream, FrameCodec::default());
    wire.send(setup).await.expect("sends SETUP");
    wire
}

/// An RSocket connection that only makes requests (a 10-minute lifetime), kept open while held.
pub async fn requester(broker: SocketAddr) -> Wire {
    connect(broker, setup_frame(600_000, None)).await
}
