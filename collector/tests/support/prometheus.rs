//! A throwaway Prometheus server for integration tests.
//!
//! [`Prometheus::start`] runs Debian's `/usr/bin/prometheus` on a free loopback port with its own temporary
//! data directory and a config holding one scrape job, `vigil`, that scrapes the given address every second.
//! [`Prometheus::query`] runs an instant PromQL query through the HTTP API and returns its `data` object, or
//! Prometheus's own error message (a PromQL parse error comes back verbatim). Dropping the value kills the
//! server and removes its directory, also when a test panics.
//!
//! The HTTP client is a few lines over `std::net::TcpStream` on purpose: the tests need one GET against a
//! loopback server, not another dependency.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The Debian package's server binary (`scripts/setup` installs it).
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// The scrape job every harness config defines; queries select it with `{job="vigil"}`.
pub const JOB: &str = "vigil";
/// How long [`Prometheus::start`] waits for `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`Prometheus::wait_for`] polls.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Bound on one HTTP exchange with the server, so a wedged server fails a test instead of hanging it.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// A free port can be taken by someone else between probing and Prometheus binding it; try again then.
const START_ATTEMPTS: usize = 3;

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A running Prometheus server; killed and cleaned up on drop.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    target: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (its `/metrics`) every second, and waits until it is ready.
    pub fn start(target: SocketAddr) -> Result<Prometheus, String> {
        Self::start_with(Some(target))
    }

    /// Starts Prometheus scraping its own `/metrics`: a target that is always there, for testing the harness.
    pub fn start_self() -> Result<Prometheus, String> {
        Self::start_with(None)
    }

    fn start_with(target: Option<SocketAddr>) -> Result<Prometheus, String> {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(target) {
                Ok(prometheus) => return Ok(prometheus),
                Err(error) if error.contains("address already in use") => last_error = error,
                Err(error) => return Err(error),
            }
        }
        Err(last_error)
    }

    fn try_start(target: Option<SocketAddr>) -> Result<Prometheus, String> {
        let addr = free_loopback_addr()?;
        let target = target.unwrap_or(addr);
        let dir = unique_temp_dir()?;
        let config = dir.join("prometheus.yml");
        fs::write(&config, scrape_config(target))
            .map_err(|e| format!("writing {}: {e}", config.display()))?;
        let log_path = dir.join("prometheus.log");
        let log = fs::File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| format!("cloning log handle: {e}"))?;

        let spawned = Command::new(PROMETHEUS_BIN)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=info")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(format!("starting {PROMETHEUS_BIN} (run scripts/setup?): {e}"));
            }
        };
        // From here on, Drop cleans up whatever happens.
        let mut prometheus = Prometheus { child, addr, target, dir };
        prometheus.wait_ready()?;
        Ok(prometheus)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "prometheus exited with {status} before ready; log:\n{}",
                    self.log_tail()
                ));
            }
            let last = match http_get(self.addr, "/-/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("HTTP {status}: {}", body.trim()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "prometheus on {} not ready after {READY_TIMEOUT:?} ({last}); log:\n{}",
                    self.addr,
                    self.log_tail()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The address Prometheus itself listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the `vigil` job scrapes.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The temporary directory holding the config, the log and the TSDB; removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Runs an instant query and returns the response's `data` object (`resultType` and `result`).
    /// On failure the error holds Prometheus's `errorType` and `error` verbatim.
    pub fn query(&self, promql: &str) -> Result<Value, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = http_get(self.addr, &path)?;
        let json: Value = serde_json::from_str(&body)
            .map_err(|e| format!("query {promql:?}: HTTP {status}, body is not JSON ({e}): {body}"))?;
        if json["status"] == "success" {
            return Ok(json["data"].clone());
        }
        let error_type = json["errorType"].as_str().unwrap_or("unknown");
        let error = json["error"].as_str().unwrap_or("no error message");
        Err(format!("query {promql:?}: HTTP {status}: {error_type}: {error}"))
    }

    /// Polls `promql` every 500 ms until `pred` accepts its `data`, and returns that `data`. Fails after
    /// `timeout` with the last answer (or error), or at once if the query itself is invalid.
    pub fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.query(promql) {
                Ok(data) if pred(&data) => return Ok(data),
                Ok(data) => format!("last result: {data}"),
                // A bad query will not get better by waiting.
                Err(e) if e.contains("bad_data") => return Err(e),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!("query {promql:?} not satisfied within {timeout:?}; {last}"));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until the `vigil` job has scraped its target successfully (`up == 1`).
    pub fn wait_until_up(&self, timeout: Duration) -> Result<(), String> {
        let query = format!("up{{job=\"{JOB}\"}}");
        self.wait_for(&query, timeout, |data| sample_values(data).contains(&1.0)).map(drop)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// True when an instant query's `data` holds at least one sample or series.
pub fn has_samples(data: &Value) -> bool {
    data["result"].as_array().is_some_and(|result| !result.is_empty())
}

/// The values of an instant vector (or a scalar) `data`, parsed as numbers (`NaN` and `±Inf` included).
pub fn sample_values(data: &Value) -> Vec<f64> {
    let parse = |pair: &Value| pair.get(1).and_then(Value::as_str).and_then(|v| v.parse::<f64>().ok());
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .map(|series| series.iter().filter_map(|s| parse(&s["value"])).collect())
            .unwrap_or_default(),
        Some("scalar") => parse(&data["result"]).into_iter().collect(),
        _ => Vec::new(),
    }
}

fn scrape_config(target: SocketAddr) -> String {
    // scrape_timeout must not exceed scrape_interval, and the global default (10 s) would.
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: {JOB}\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    \
         metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n"
    )
}

fn free_loopback_addr() -> Result<SocketAddr, String> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("finding a free port: {e}"))?;
    listener.local_addr().map_err(|e| format!("finding a free port: {e}"))
}

fn unique_temp_dir() -> Result<PathBuf, String> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let name = format!(
        "vigil-prometheus-{}-{}-{nanos}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir().join(name);
    fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Percent-encodes everything outside RFC 3986's unreserved set, so any PromQL survives a query string.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// One HTTP/1.1 GET on a fresh connection; returns the status code and the (de-chunked) body.
fn http_get(addr: SocketAddr, path_and_query: &str) -> Result<(u16, String), String> {
    let context = |e: std::io::Error| format!("GET http://{addr}{path_and_query}: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).map_err(context)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT)).map_err(context)?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT)).map_err(context)?;
    let request = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(context)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(context)?;
    parse_response(&raw).map_err(|e| format!("GET http://{addr}{path_and_query}: {e}"))
}

fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|line| {
        let lower = line.to_ascii_lowercase();
        lower.starts_with("transfer-encoding:") && lower.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    String::from_utf8(body).map(|text| (status, text)).map_err(|e| format!("body is not UTF-8: {e}"))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end =
            body.windows(2).position(|w| w == b"\r\n").ok_or("chunked body: missing chunk size line")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|e| format!("chunked body: bad chunk size {size_hex:?}: {e}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            return Err(format!("chunked body: chunk of {size} bytes, {} left", body.len()));
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
}
