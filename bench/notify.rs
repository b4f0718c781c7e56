//! Notifications through the outbox (issue 10): how many per second reach a local webhook receiver, and
//! how long one takes from the decision to its delivery. Everything is the real path: a redb outbox in a
//! fresh data directory, the delivery task, HMAC signing, hyper's client over loopback; the receiver is
//! an in-process axum server that answers 200 and notes when each `webhook-id` arrived.
//!
//! Three measurements, one run:
//! - latency: one decision at a time, each queued in a durable transaction of its own together with its
//!   audit record (as the healer does), from just before the transaction to the receiver's receipt;
//!   the next one is queued once the last has arrived, so each sees a receiver that is up and idle.
//!   Goal: p99 ≤ 50 ms.
//! - sustained: decisions queued back to back, each in its own durable transaction, while delivery
//!   runs: notifications per second from the first queued to the last received.
//! - backlog: a backlog queued in one transaction while the receiver was unreachable, delivered after
//!   it comes back: the delivery rate alone.
//!
//! Run: `cargo bench -p vigil-healer --bench notify`. `VIGIL_BENCH_NOTIFY_N` (default 2000) sets the
//! sizes of the sustained and backlog runs; latency takes 500 samples.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tokio::sync::{mpsc, watch};
use vigil_core::VigilConfig;
use vigil_healer::audit::AuditLog;
use vigil_healer::engine::{Decision, Outcome};
use vigil_healer::notify::{Notice, Notifier};

const LATENCY_SAMPLES: usize = 500;
const GOAL_P99: Duration = Duration::from_millis(50);
/// Bound on any one wait, so a stuck delivery fails the run instead of hanging it.
const WAIT: Duration = Duration::from_secs(60);

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

/// Queues decision `i` with its audit record in one durable transaction; returns its message id.
fn queue_one(audit: &AuditLog, notifier: &Notifier, i: usize) -> Result<String> {
    let d = decision(i);
    let notice = Notice::for_decision(&d, &BTreeMap::new());
    let mut id = String::new();
    audit.append_with(&d, |tx, _| {
        id = notifier.enqueue_in(tx, "bench", &notice)?;
        Ok::<(), vigil_healer::notify::NotifyError>(())
    })?;
    notifier.wake();
    Ok(id)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let n: usize = std::env::var("VIGIL_BENCH_NOTIFY_N").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;

    // The receiver: 200 to everything, each webhook-id's arrival reported.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<(String, Instant)>();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, _body: axum::body::Bytes| {
            let at = Instant::now();
            let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let _ = arrived_tx.send((id, at));
            async { StatusCode::OK }
        }),
    );
    let (server_stop_tx, mut server_stop) = watch::channel(false);
    let server = runtime.spawn(async move {
        let shutdown = async move {
            let _ = server_stop.wait_for(|s| *s).await;
        };
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await
    });

    let dir = TempDir(std::env::temp_dir().join(format!("vigil-bench-notify-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let yaml = |port: u16| {
        format!(
            "notify:\n  retry: {{ initial: 10ms, max: 100ms }}\n  receivers:\n    - name: bench\n      webhook: {{ url: \
             \"http://127.0.0.1:{port}/hook\", secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw }}\n"
        )
    };
    let config = VigilConfig::parse(&yaml(port), "bench.yaml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let audit = Arc::new(AuditLog::open(&dir.0.join("data"))?);
    let notifier = Notifier::open(audit.clone(), &config.notify, "http://127.0.0.1:9750")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = {
        let _in_runtime = runtime.enter();
        notifier.spawn(stop_rx)
    };

    // Latency, one at a time.
    let mut latencies = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        let t0 = Instant::now();
        let id = queue_one(&audit, &notifier, i)?;
        let (got, at) = runtime
            .block_on(async { tokio::time::timeout(WAIT, arrived.recv()).await })
            .context("a notification did not arrive")?
            .context("the receiver stopped")?;
        if got != id {
            bail!("expected {id}, got {got}");
        }
        latencies.push(at - t0);
    }
    latencies.sort();
    let (p50, p99, max) =
        (percentile(&latencies, 0.5), percentile(&latencies, 0.99), latencies[latencies.len() - 1]);

    // Sustained: queued back to back while delivery runs.
    let mut queued_at: HashMap<String, Instant> = HashMap::with_capacity(n);
    let start = Instant::now();
    let producer = {
        let (audit, notifier) = (audit.clone(), notifier.clone());
        std::thread::spawn(move || -> Result<Vec<(String, Instant)>> {
            (0..n)
                .map(|i| {
                    let t = Instant::now();
                    queue_one(&audit, &notifier, LATENCY_SAMPLES + i).map(|id| (id, t))
                })
                .collect()
        })
    };
    let mut arrivals = Vec::with_capacity(n);
    for _ in 0..n {
        let a = runtime
            .block_on(async { tokio::time::timeout(WAIT, arrived.recv()).await })
            .context("the sustained run stalled")?
            .context("the receiver stopped")?;
        arrivals.push(a);
    }
    let sustained_elapsed = start.elapsed();
    let queue_elapsed;
    {
        let ids = producer.join().map_err(|_| anyhow::anyhow!("the producer panicked"))??;
        queue_elapsed = ids.last().map(|(_, t)| *t - start).unwrap_or_default();
        queued_at.extend(ids);
    }
    let mut under_load: Vec<Duration> =
        arrivals.iter().filter_map(|(id, at)| queued_at.get(id).map(|t| *at - *t)).collect();
    if under_load.len() != n {
        bail!("{} of {n} arrivals match a queued id", under_load.len());
    }
    under_load.sort();
    let sustained_rate = n as f64 / sustained_elapsed.as_secs_f64();
    let queue_rate = n as f64 / queue_elapsed.as_secs_f64().max(1e-9);

    // Backlog: stop delivery, queue n in one transaction, start again, time the drain.
    stop_tx.send_replace(true);
    runtime.block_on(task)?;
    let items: Vec<(String, Notice)> = (0..n)
        .map(|i| ("bench".to_string(), Notice::for_decision(&decision(10 * n + i), &BTreeMap::new())))
        .collect();
    notifier.enqueue(&items)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let start = Instant::now();
    let task = {
        let _in_runtime = runtime.enter();
        notifier.spawn(stop_rx)
    };
    for _ in 0..n {
        runtime
            .block_on(async { tokio::time::timeout(WAIT, arrived.recv()).await })
            .context("the backlog stalled")?
            .context("the receiver stopped")?;
    }
    let backlog_rate = n as f64 / start.elapsed().as_secs_f64();
    stop_tx.send_replace(true);
    runtime.block_on(task)?;
    server_stop_tx.send_replace(true);
    runtime.block_on(server)??;

    println!();
    println!(
        "notifications through the outbox to a local webhook receiver (answers 200), signed, over loopback"
    );
    println!(
        "  latency, one at a time ({LATENCY_SAMPLES} samples; decision + notice committed durably, then delivered):"
    );
    println!("    p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", ms(p50), ms(p99), ms(max));
    println!(
        "    goal p99 ≤ {} ms: measured {:.2} ms = {:.3} × the goal ({})",
        GOAL_P99.as_millis(),
        ms(p99),
        p99.as_secs_f64() / GOAL_P99.as_secs_f64(),
        if p99 <= GOAL_P99 { "met" } else { "missed" }
    );
    println!(
        "  sustained, {n} decisions queued back to back (one durable transaction each): {sustained_rate:.0} \
         notifications/s delivered; queueing alone {queue_rate:.0}/s"
    );
    println!(
        "    latency while loaded: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(&under_load, 0.5)),
        ms(percentile(&under_load, 0.99)),
        ms(under_load[under_load.len() - 1])
    );
    println!("  backlog of {n} queued in one transaction, then delivered: {backlog_rate:.0} notifications/s");
    Ok(())
}
