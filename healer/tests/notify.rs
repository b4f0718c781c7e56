//! Durable notifications against real receivers, driving `vigil_healer::notify::Notifier` directly:
//! - a Python webhook receiver (`notify_receiver.py`) that verifies every request with PyPI
//!   `standardwebhooks` and deduplicates by `webhook-id`: it is down while a backlog is queued, then
//!   fails its first requests, and still gets every notification once, in order; the notifier is then
//!   stopped in the middle of a second backlog and reopened on the same data directory, and the rest
//!   arrives the same way;
//! - the same receiver over https, with a certificate from a CA made for the test: a receiver that
//!   trusts that CA (`ca_file`) delivers; one that trusts only the web's roots does not, and retries;
//! - a real Alertmanager (Debian `prometheus-alertmanager`) gets a firing condition, which shows in its
//!   API with the labels and fingerprint Vigil computed, and then its resolution, after which it is no
//!   longer active.
//!
//! Child processes are killed by `Drop`, also when an assertion fails. Waits are for conditions (with a
//! deadline), never fixed sleeps.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vigil_core::VigilConfig;
use vigil_healer::audit::AuditLog;
use vigil_healer::engine::{Decision, Outcome};
use vigil_healer::notify::{Notice, Notifier};

const SECRET_OLD: &str = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const SECRET_NEW: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

/// A child process killed and reaped on drop.
struct Proc {
    child: Child,
    what: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited: {status}", self.what);
        }
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("vigil-notify-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port that is free now, below the ephemeral range (so no client connection takes it while
/// its server is down), chosen by the process id so parallel test processes rarely meet.
fn free_port(offset: u16) -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(20_000).max(1);
    let start = (std::process::id() as u16).wrapping_mul(7).wrapping_add(offset.wrapping_mul(101)) % span;
    (0..span)
        .map(|i| 20_000 + (start + i) % span)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap_or_else(|| panic!("no free port below {low}"))
}

/// Waits until `done` holds, or panics after `limit` saying `what` (and what `done` last saw).
fn wait_until<T: std::fmt::Debug>(
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        match done() {
            Ok(v) => return v,
            Err(seen) => last = seen,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {limit:?} waiting for {what}; last seen: {last}");
}

fn start_receiver(port: u16, out: &Path, extra: &[&str]) -> Proc {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/notify_receiver.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(["--port", &port.to_string(), "--secret", SECRET_NEW, "--out"])
        .arg(out)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3 notify_receiver.py");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("receiver stdout");
    BufReader::new(stdout).read_line(&mut line).expect("read the receiver's first line");
    let mut proc = Proc { child, what: "the webhook receiver" };
    assert_eq!(line.trim(), "ready", "the receiver did not start (is PyPI standardwebhooks installed?)");
    proc.assert_running();
    proc
}

/// The `(webhook-id, instance_id)` of every message the receiver recorded, in order.
fn received(out: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(out) else { return Vec::new() };
    text.lines()
        .filter(|l| l.ends_with('}'))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a receiver line is JSON");
            let id = v["id"].as_str().expect("id").to_string();
            let instance =
                v["body"]["alerts"][0]["labels"]["instance_id"].as_str().expect("instance_id").to_string();
            (id, instance)
        })
        .collect()
}

fn decision(i: usize) -> Decision {
    Decision {
        unix_ms: 1_700_000_000_000 + i as u64,
        rule: "tell-ops".into(),
        action: "restart",
        service: "echo".into(),
        instance_id: format!("echo-{i}"),
        held_seconds: 1.0,
        inputs: None,
        outcome: Outcome::Succeeded { seconds: 0.5 },
    }
}

fn open(data_dir: &Path, yaml: &str) -> (Arc<AuditLog>, Notifier) {
    let config = VigilConfig::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    let audit = Arc::new(AuditLog::open(data_dir).expect("open the audit log"));
    let notifier =
        Notifier::open(audit.clone(), &config.notify, &config.notify.external_url_or(config.http.listen))
            .expect("open the notifier");
    (audit, notifier)
}

/// Queues decisions `range` for `receiver`, each with its decision in the audit log, in one transaction
/// per decision (as the healer does).
fn queue(audit: &AuditLog, notifier: &Notifier, receiver: &str, range: std::ops::Range<usize>) {
    let labels = BTreeMap::from([("team".to_string(), "ops".to_string())]);
    for i in range {
        let d = decision(i);
        let routes = notifier.routes(&d, &[receiver]);
        audit
            .append_with(&d, |tx, _| {
                let notice = Notice::for_decision(&d, &labels);
                routes.iter().try_for_each(|r| notifier.enqueue_in(tx, r, &notice).map(drop))
            })
            .expect("queue a decision's notification");
    }
    notifier.wake();
}

fn failed_attempts(notifier: &Notifier) -> u64 {
    failed_attempts_of(notifier, "ops")
}

fn failed_attempts_of(notifier: &Notifier, receiver: &str) -> u64 {
    let mut registry = prometheus_client::registry::Registry::default();
    notifier.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode metrics");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("vigil_notifications_failed_total{{receiver=\"{receiver}\"}} "))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn expected(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("echo-{i}")).collect()
}

fn assert_in_order_once(got: &[(String, String)], want: &[String]) {
    let instances: Vec<&str> = got.iter().map(|(_, i)| i.as_str()).collect();
    assert_eq!(instances, want.iter().map(String::as_str).collect::<Vec<_>>(), "order and completeness");
    let ids: BTreeSet<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "each message id once");
}

#[test]
fn a_webhook_backlog_arrives_in_order_once_across_an_outage_and_a_restart() {
    let dir = TempDir::new("webhook");
    let data = dir.0.join("data");
    let out = dir.0.join("received.jsonl");
    let port = free_port(1);
    // Two secrets, as while rotating: the receiver knows only the new one, and each request carries both
    // signatures.
    let yaml = format!(
        "notify:\n  retry: {{ initial: 50ms, max: 400ms }}\n  timeout: 2s\n  receivers:\n    - name: ops\n      \
         webhook: {{ url: \"http://127.0.0.1:{port}/hook\", secret: [{SECRET_OLD}, {SECRET_NEW}] }}\n"
    );
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    const FIRST: usize = 20;
    const SECOND: usize = 40;

    // Phase 1: the receiver is down while the backlog is queued.
    let (audit, notifier) = open(&data, &yaml);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = {
        let _in_runtime = runtime.enter();
        notifier.spawn(stop_rx)
    };
    queue(&audit, &notifier, "ops", 0..FIRST);
    assert_eq!(notifier.queued()["ops"], FIRST);
    wait_until(Duration::from_secs(20), "failed attempts while the receiver is down", || {
        let n = failed_attempts(&notifier);
        if n >= 3 { Ok(n) } else { Err(format!("{n} failed attempts")) }
    });
    assert!(received(&out).is_empty());
    // It comes back, and fails its first three requests on top.
    let mut receiver = start_receiver(port, &out, &["--fail-first", "3"]);
    let got = wait_until(Duration::from_secs(30), "the first backlog", || {
        let got = received(&out);
        if got.len() >= FIRST { Ok(got) } else { Err(format!("{} of {FIRST}", got.len())) }
    });
    assert_in_order_once(&got, &expected(0..FIRST));
    wait_until(Duration::from_secs(10), "an empty queue", || match notifier.queued()["ops"] {
        0 => Ok(()),
        n => Err(format!("{n} queued")),
    });

    // Phase 2: a slow receiver and a second backlog; the notifier stops part way through.
    drop(receiver);
    receiver = start_receiver(port, &out, &["--delay-ms", "40"]);
    queue(&audit, &notifier, "ops", FIRST..SECOND);
    wait_until(Duration::from_secs(30), "part of the second backlog", || {
        let n = received(&out).len();
        if n >= FIRST + 5 { Ok(()) } else { Err(format!("{n} received")) }
    });
    stop_tx.send_replace(true);
    runtime.block_on(task).expect("the delivery tasks end");
    let left = notifier.queued()["ops"];
    let delivered = received(&out).len();
    assert!(
        left > 0 && delivered < FIRST + (SECOND - FIRST),
        "stopped mid-backlog: {left} left, {delivered} received"
    );
    drop(notifier);
    drop(audit);

    // Reopened on the same data directory, as after a restart: the rest arrives, in order, none twice.
    let (audit, notifier) = open(&data, &yaml);
    assert_eq!(notifier.queued()["ops"], left, "the queue survived the restart");
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = {
        let _in_runtime = runtime.enter();
        notifier.spawn(stop_rx)
    };
    let got = wait_until(Duration::from_secs(30), "the rest of the second backlog", || {
        let got = received(&out);
        if got.len() >= SECOND { Ok(got) } else { Err(format!("{} of {SECOND}", got.len())) }
    });
    assert_in_order_once(&got, &expected(0..SECOND));
    wait_until(
        Duration::from_secs(10),
        "an empty queue after the restart",
        || match notifier.queued()["ops"] {
            0 => Ok(()),
            n => Err(format!("{n} queued")),
        },
    );
    receiver.assert_running();
    stop_tx.send_replace(true);
    runtime.block_on(task).expect("the delivery tasks end");
    // The decisions are in the audit log beside their notifications.
    assert_eq!(audit.recent(1000).expect("audit").len(), SECOND);
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (`ca.pem`) and a certificate it signed for 127.0.0.1 (`server.pem`, `server.key`) in `dir`.
fn make_certificates(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        dir,
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=vigil test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]]
            .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

#[test]
fn an_https_receiver_is_reached_through_the_ca_it_names() {
    let dir = TempDir::new("https");
    make_certificates(&dir.0);
    let out = dir.0.join("received.jsonl");
    let port = free_port(3);
    let cert = dir.0.join("server.pem");
    let key = dir.0.join("server.key");
    let mut receiver = start_receiver(
        port,
        &out,
        &["--tls-cert", cert.to_str().expect("utf-8 path"), "--tls-key", key.to_str().expect("utf-8 path")],
    );
    let ca = dir.0.join("ca.pem");
    let yaml = format!(
        "notify:\n  retry: {{ initial: 50ms, max: 200ms }}\n  timeout: 2s\n  receivers:\n    - name: ops\n      \
         webhook: {{ url: \"https://127.0.0.1:{port}/hook\", secret: {SECRET_NEW}, ca_file: \"{}\" }}\n    - \
         name: web-roots\n      webhook: {{ url: \"https://127.0.0.1:{port}/hook\", secret: {SECRET_NEW} }}\n",
        ca.display()
    );
    let (audit, notifier) = open(&dir.0.join("data"), &yaml);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = {
        let _in_runtime = runtime.enter();
        notifier.spawn(stop_rx)
    };
    queue(&audit, &notifier, "ops", 0..3);
    queue(&audit, &notifier, "web-roots", 100..101);
    let got = wait_until(Duration::from_secs(20), "three notifications over https", || {
        let got = received(&out);
        if got.len() >= 3 { Ok(got) } else { Err(format!("{} of 3", got.len())) }
    });
    assert_in_order_once(&got, &expected(0..3));
    // The test CA is no web root: that receiver's certificate is refused, and the notice waits, retried.
    wait_until(Duration::from_secs(20), "failed attempts through the web roots", || {
        let n = failed_attempts_of(&notifier, "web-roots");
        if n >= 2 { Ok(n) } else { Err(format!("{n} failed attempts")) }
    });
    assert_eq!(notifier.queued()["web-roots"], 1);
    assert_eq!(received(&out).len(), 3, "nothing arrived through an untrusted connection");
    receiver.assert_running();
    stop_tx.send_replace(true);
    runtime.block_on(task).expect("the delivery tasks end");
}

/// `GET path` on 127.0.0.1:`port`: the status and the body.
fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no status line")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    // Alertmanager may answer chunked; the JSON is the part between the first `[`/`{` and the last `]`/`}`.
    let body = match (body.find(['[', '{']), body.rfind([']', '}'])) {
        (Some(a), Some(b)) if a <= b => body[a..=b].to_string(),
        _ => body,
    };
    Ok((status, body))
}

/// Alertmanager's alerts (`query` e.g. `?active=true`) whose `rule` label is `rule`.
fn am_alerts(port: u16, query: &str, rule: &str) -> Result<Vec<serde_json::Value>, String> {
    let (status, body) = http_get(port, &format!("/api/v2/alerts{query}"))?;
    if status != 200 {
        return Err(format!("HTTP {status}: {body}"));
    }
    let all: Vec<serde_json::Value> = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    Ok(all.into_iter().filter(|a| a["labels"]["rule"] == rule).collect())
}

#[test]
fn alertmanager_shows_the_alert_and_then_its_resolution() {
    assert!(
        Path::new(ALERTMANAGER).exists(),
        "{ALERTMANAGER} is missing: apt-get install prometheus-alertmanager (scripts/setup installs it)"
    );
    let dir = TempDir::new("am");
    let am_port = free_port(2);
    let am_config = dir.0.join("alertmanager.yml");
    std::fs::write(&am_config, "route:\n  receiver: \"null\"\nreceivers:\n  - name: \"null\"\n")
        .expect("write config");
    let storage = dir.0.join("am-data");
    let child = Command::new(ALERTMANAGER)
        .arg(format!("--config.file={}", am_config.display()))
        .arg(format!("--storage.path={}", storage.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus-alertmanager");
    let mut am = Proc { child, what: "alertmanager" };
    wait_until(Duration::from_secs(30), "Alertmanager ready", || {
        am.assert_running();
        match http_get(am_port, "/-/ready") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    let yaml = format!(
        "http: {{ listen: 127.0.0.1:9750 }}\nnotify:\n  retry: {{ initial: 50ms, max: 500ms }}\n  receivers:\n    \
         - name: am\n      alertmanager: {{ url: \"http://127.0.0.1:{am_port}\" }}\n"
    );
    let data = dir.0.join("data");
    let (_audit, notifier) = open(&data, &yaml);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = {
        let _in_runtime = runtime.enter();
        notifier.spawn(stop_rx)
    };

    let rule = format!("hot-{}", std::process::id());
    let labels = BTreeMap::from([("team".to_string(), "ops".to_string())]);
    let started = vigil_now_ms() - 1000;
    let firing = Notice::firing(&rule, "echo", "echo-0", &labels, started);
    notifier.enqueue(&[("am".to_string(), firing.clone())]).expect("queue the firing alert");
    let alert = wait_until(Duration::from_secs(20), "the firing alert in Alertmanager", || {
        am.assert_running();
        match am_alerts(am_port, "?active=true", &rule)?.pop() {
            Some(a) => Ok(a),
            None => Err("not there".into()),
        }
    });
    for (k, v) in &firing.labels {
        assert_eq!(alert["labels"][k], v.as_str(), "label {k} in {alert}");
    }
    assert_eq!(alert["fingerprint"], firing.fingerprint(), "Vigil's fingerprint is Alertmanager's");
    assert_eq!(alert["status"]["state"], "active");
    assert_eq!(alert["annotations"]["summary"], format!("rule {rule} holds for echo-0 (service echo)"));
    assert_eq!(alert["generatorURL"], "http://127.0.0.1:9750/api/v1/rules");

    let resolved = Notice::resolved(&rule, "echo", "echo-0", &labels, started, vigil_now_ms());
    notifier.enqueue(&[("am".to_string(), resolved)]).expect("queue the resolution");
    wait_until(Duration::from_secs(20), "the alert no longer active", || {
        am.assert_running();
        let active = am_alerts(am_port, "?active=true", &rule)?;
        if active.is_empty() { Ok(()) } else { Err(format!("{active:?}")) }
    });
    // Whatever Alertmanager still lists of it has ended.
    for a in am_alerts(am_port, "", &rule).expect("alerts") {
        assert_ne!(a["status"]["state"], "active", "{a}");
    }
    wait_until(Duration::from_secs(10), "an empty queue", || match notifier.queued()["am"] {
        0 => Ok(()),
        n => Err(format!("{n} queued")),
    });
    stop_tx.send_replace(true);
    runtime.block_on(task).expect("the delivery tasks end");
}

fn vigil_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
