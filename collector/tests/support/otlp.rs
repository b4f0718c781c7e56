//! The OTLP/gRPC test receiver (`collector/tests/otlp_receiver.py`, metrics and traces) as a child
//! process: its port, and its JSON lines for the test to read.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Longest wait for the receiver to start.
pub const START_DEADLINE: Duration = Duration::from_secs(20);

/// The Python receiver, killed on drop (and exiting by itself when its stdin closes).
pub struct Receiver {
    pub child: Child,
    /// Its stdout after the port: one JSON line per data point or span, and one per export's end.
    pub lines: Lines<BufReader<ChildStdout>>,
    pub port: u16,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../collector/tests/otlp_receiver.py");
        let mut child = Command::new("python3")
            .arg("-u")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 {script}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_DEADLINE, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("receiver printed no port within {START_DEADLINE:?}"))
            .expect("read receiver stdout")
            .unwrap_or_else(|| {
                panic!("receiver exited before printing its port (see its stderr above; scripts/setup installs opentelemetry-proto and grpcio)")
            });
        let port = first.trim().parse().unwrap_or_else(|e| panic!("receiver's first line {first:?}: {e}"));
        Receiver { child, lines, port }
    }

    /// The OTLP/gRPC endpoint to export to.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill().await;
    }
}
