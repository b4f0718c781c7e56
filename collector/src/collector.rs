//! The collector's run loop: every tick it walks the cgroup trees, reads the probe maps and cgroupfs, builds
//! a [`Snapshot`] and publishes it. The loop runs on its own thread because every step is a blocking
//! syscall; async code (HTTP, the healer) only ever reads the published snapshot.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::aggregate::{Aggregator, TickInput};
use crate::auth;
use crate::cgroupfs::{self, CgroupError, CgroupStats, Layout};
use crate::config::CollectorConfig;
use crate::discovery::{DiscoveredCgroup, Discovery};
use crate::export;
use crate::hwtrace::HwTracepoints;
use crate::privilege;
use crate::probes::{ProbeError, Probes};
use crate::snapshot::{Snapshot, SnapshotReceiver};

/// Ticks a probe-map key may stay unclaimed by any discovered cgroup before it is removed. Long enough
/// for a new cgroup to be discovered, short enough to keep the maps to live cgroups.
const UNCLAIMED_TICKS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error("{0}")]
    Privilege(String),
    #[error("finding the cgroup hierarchies: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("{0}")]
    Probes(#[from] ProbeError),
    #[error("starting the collector thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A running collector. Dropping it stops the loop (and detaches the probes).
pub struct Collector {
    snapshots: SnapshotReceiver,
    registry: Arc<Registry>,
    interval: Duration,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    hardware: Option<Arc<HwTracepoints>>,
}

/// Removes probe-map entries nobody claims: cgroups that vanished, or that are not watched.
#[derive(Default)]
struct MapJanitor {
    unclaimed_since: HashMap<(bool, u64), u64>,
}

impl MapJanitor {
    fn sweep(
        &mut self,
        tick: u64,
        probes: &mut Probes,
        readout: &crate::probes::ProbeReadout,
        claimed_cg: &HashSet<u64>,
        claimed_mem: &HashSet<u64>,
    ) {
        let mut seen = HashSet::new();
        let v2_keys = readout.faults.keys().chain(readout.cpu.keys()).map(|k| (true, *k));
        let mem_keys = readout.memcg.keys().map(|k| (false, *k));
        for key in v2_keys.chain(mem_keys) {
            let claimed = if key.0 { claimed_cg.contains(&key.1) } else { claimed_mem.contains(&key.1) };
            if !claimed {
                seen.insert(key);
                self.unclaimed_since.entry(key).or_insert(tick);
            }
        }
        self.unclaimed_since.retain(|k, _| seen.contains(k));
        let expired: Vec<(bool, u64)> = self
            .unclaimed_since
            .iter()
            .filter(|(_, since)| tick - **since >= UNCLAIMED_TICKS)
            .map(|(k, _)| *k)
            .collect();
        let cg: Vec<u64> = expired.iter().filter(|k| k.0).map(|k| k.1).collect();
        let mem: Vec<u64> = expired.iter().filter(|k| !k.0).map(|k| k.1).collect();
        probes.forget(&cg, &mem);
        for k in expired {
            self.unclaimed_since.remove(&k);
        }
    }
}

impl Collector {
    /// Checks privileges, loads the probes and starts ticking. The first snapshot follows at once.
    pub fn start(config: &CollectorConfig) -> Result<Collector, CollectorError> {
        privilege::check().map_err(CollectorError::Privilege)?;
        let layout = Layout::detect()?;
        let probes = Probes::load()?;
        tracing::info!(
            hybrid = layout.is_hybrid(),
            v2_root = %layout.v2_root.display(),
            pswpin = probes.items.pswpin,
            pswpout = probes.items.pswpout,
            pgmajfault = probes.items.pgmajfault,
            "probes attached"
        );
        let hardware = probes.hardware();
        for s in hardware.as_ref().map(|h| h.statuses()).unwrap_or_default() {
            if s.attached {
                tracing::info!(tracepoint = s.tracepoint, "hardware error tracepoint attached");
            } else {
                tracing::info!(tracepoint = s.tracepoint, reason = %s.detail, "hardware error tracepoint not used");
            }
        }
        let (tx, rx) = watch::channel(Arc::new(Snapshot::empty()));
        let (stop_tx, stop_rx) = mpsc::channel();
        let interval = config.interval();
        let max_instances = config.max_instances();
        let stats_every = config.cgroupfs_every_ticks();
        let discovery = Discovery::new(layout, config.watch.clone());
        let thread = std::thread::Builder::new()
            .name("vigil-collector".into())
            .spawn(move || run(probes, discovery, tx, stop_rx, interval, max_instances, stats_every))
            .map_err(CollectorError::Thread)?;
        let registry = Arc::new(export::registry(rx.clone()));
        Ok(Collector {
            snapshots: rx,
            registry,
            interval,
            stop: Some(stop_tx),
            thread: Some(thread),
            hardware,
        })
    }

    /// The hardware-error tracepoints (block request errors, EDAC, AER, MCE, memory failures): which are
    /// attached and their cumulative counts, for whoever polls hardware health. None when they could not
    /// be set up at all (the reason was logged); the collector runs either way.
    pub fn hardware_tracepoints(&self) -> Option<Arc<HwTracepoints>> {
        self.hardware.clone()
    }

    /// The snapshot stream (latest value; `changed()` wakes every tick).
    pub fn snapshots(&self) -> SnapshotReceiver {
        self.snapshots.clone()
    }

    /// `/metrics`, `/healthz`, `/readyz`, open to anyone who can reach them (a loopback listener).
    pub fn router(&self) -> Router {
        self.router_with(Vec::new(), None)
    }

    /// The same, with other components' metrics (the healer's, the broker's) appended to `/metrics`, and
    /// every route behind `token` when one is set (`http.token`), as the API is.
    pub fn router_with(&self, extra: Vec<Arc<Registry>>, token: Option<&str>) -> Router {
        http_routes(self.registry.clone(), extra, self.snapshots.clone(), self.interval, token)
    }

    /// Stops the loop and waits for it (at most one tick).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The collector's HTTP routes over a registry and a snapshot stream; apart from [`Collector`] so that they
/// can be served without probes.
fn http_routes(
    registry: Arc<Registry>,
    extra: Vec<Arc<Registry>>,
    snapshots: SnapshotReceiver,
    interval: Duration,
    token: Option<&str>,
) -> Router {
    let router = Router::new()
        .route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let registry = registry.clone();
                let extra = extra.clone();
                async move { metrics_response(&registry, &extra, &headers) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let snap = snapshots.borrow().clone();
                async move { readiness(&snap, interval, SystemTime::now()).into_response() }
            }),
        );
    // Metrics name every instance and service on the host, so they are no more public than the API.
    auth::require_bearer(router, token)
}

/// OpenMetrics for scrapers that accept it (Prometheus does), the classic text format otherwise.
fn metrics_response(
    registry: &Registry,
    extra: &[Arc<Registry>],
    headers: &HeaderMap,
) -> ([(header::HeaderName, &'static str); 1], String) {
    let mut text = export::render(registry);
    for extra in extra {
        // One exposition: a single `# EOF`, at the very end.
        if let Some(stripped) = text.strip_suffix("# EOF\n") {
            text.truncate(stripped.len());
        }
        text.push_str(&export::render(extra));
    }
    let accepts_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if accepts_openmetrics {
        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
    } else {
        (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            export::openmetrics_to_classic(&text),
        )
    }
}

/// Ready once the first snapshot exists and the latest is no older than three ticks.
fn readiness(snap: &Snapshot, interval: Duration, now: SystemTime) -> (StatusCode, String) {
    let age = now.duration_since(snap.taken_at).unwrap_or_default();
    if snap.tick == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"error\":{\"code\":\"starting\",\"message\":\"no snapshot yet\"}}\n".into(),
        )
    } else if age > interval * 3 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{{\"error\":{{\"code\":\"stale\",\"message\":\"last snapshot is {:.1}s old\"}}}}\n",
                age.as_secs_f64()
            ),
        )
    } else {
        (StatusCode::OK, format!("ready: tick {}, {} instances\n", snap.tick, snap.instances.len()))
    }
}

/// cgroupfs readings spread over `every` ticks: each cgroup is read in the tick its stable slot comes up
/// (and at once when new), and the last reading stands in between.
#[derive(Default)]
struct StatsCache {
    by_cgroup: HashMap<(Option<u64>, Option<u64>), CgroupStats>,
    buf: Vec<u8>,
}

impl StatsCache {
    fn key(c: &DiscoveredCgroup) -> (Option<u64>, Option<u64>) {
        (c.cgroup_id, c.memcg_id)
    }

    fn refresh(&mut self, layout: &Layout, cgroups: &[DiscoveredCgroup], tick: u64, every: u64) {
        let live: HashSet<_> = cgroups.iter().map(Self::key).collect();
        self.by_cgroup.retain(|k, _| live.contains(k));
        for c in cgroups {
            let key = Self::key(c);
            // The id is random enough to spread the reads evenly over the round.
            let slot = key.0.or(key.1).unwrap_or(0) % every;
            if slot == tick % every || !self.by_cgroup.contains_key(&key) {
                let s = cgroupfs::read_stats_with(layout, &c.paths, &mut self.buf);
                self.by_cgroup.insert(key, s);
            }
        }
    }

    fn get(&self, c: &DiscoveredCgroup) -> CgroupStats {
        self.by_cgroup.get(&Self::key(c)).copied().unwrap_or_default()
    }
}

fn run(
    mut probes: Probes,
    mut discovery: Discovery,
    tx: watch::Sender<Arc<Snapshot>>,
    stop: mpsc::Receiver<()>,
    interval: Duration,
    max_instances: usize,
    stats_every: u64,
) {
    let mut aggregator = Aggregator::new();
    let mut stats = StatsCache::default();
    let mut janitor = MapJanitor::default();
    let mut last = Instant::now();
    let mut first = true;
    loop {
        let started = Instant::now();
        let elapsed = if first { interval } else { started - last };
        first = false;
        last = started;

        let cgroups = discovery.scan();
        let readout = match probes.read() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading probe maps failed; this tick has no probe counters");
                Default::default()
            }
        };
        let tick = aggregator.ticks() + 1;
        stats.refresh(discovery.layout(), &cgroups, tick, stats_every);
        let inputs: Vec<TickInput<'_>> =
            cgroups.iter().map(|c| TickInput { cgroup: c, stats: stats.get(c) }).collect();
        let snapshot = aggregator.tick(&inputs, &readout, max_instances, elapsed, SystemTime::now());
        tx.send_replace(Arc::new(snapshot));

        let claimed_cg: HashSet<u64> = cgroups.iter().filter_map(|c| c.cgroup_id).collect();
        let claimed_mem: HashSet<u64> = cgroups.iter().filter_map(|c| c.memcg_id).collect();
        janitor.sweep(tick, &mut probes, &readout, &claimed_cg, &claimed_mem);
        if discovery.skipped() > 0 && tick % 60 == 1 {
            tracing::warn!(
                skipped = discovery.skipped(),
                "more cgroups than watch.max_tracked; the rest are not watched"
            );
        }

        let wait = interval.saturating_sub(started.elapsed());
        match stop.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Sender dropped (or a message): stop.
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_states() {
        let now = SystemTime::now();
        let mut s = Snapshot::empty();
        assert_eq!(readiness(&s, Duration::from_secs(1), now).0, StatusCode::SERVICE_UNAVAILABLE);
        s.tick = 1;
        s.taken_at = now;
        assert_eq!(readiness(&s, Duration::from_secs(1), now).0, StatusCode::OK);
        let later = now + Duration::from_secs(5);
        let (code, body) = readiness(&s, Duration::from_secs(1), later);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"stale\""), "{body}");
    }

    /// Serves the collector's routes on an ephemeral loopback port, with a snapshot from tick 1.
    async fn serve_routes(token: Option<&str>) -> std::net::SocketAddr {
        let mut snap = Snapshot::empty();
        snap.tick = 1;
        // The sender goes; the receiver keeps the last value.
        let (_, rx) = watch::channel(Arc::new(snap));
        let registry = Arc::new(export::registry(rx.clone()));
        let app = http_routes(registry, Vec::new(), rx, Duration::from_secs(3600), token);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    async fn get(addr: std::net::SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
        s.write_all(format!("GET {path} HTTP/1.0\r\n{auth}\r\n").as_bytes()).await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let status = buf[9..12].parse().unwrap();
        (status, buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }

    #[tokio::test]
    async fn routes_are_open_without_a_token() {
        let addr = serve_routes(None).await;
        for path in ["/metrics", "/healthz", "/readyz"] {
            let (code, _) = get(addr, path, None).await;
            assert_eq!(code, 200, "{path}");
        }
        let (_, body) = get(addr, "/metrics", None).await;
        assert!(body.contains("vigil_instances 0"), "{body}");
    }

    #[tokio::test]
    async fn routes_need_the_token_when_one_is_set() {
        let addr = serve_routes(Some("s3cret")).await;
        for path in ["/metrics", "/healthz", "/readyz"] {
            for wrong in [None, Some("Bearer nope"), Some("Bearer s3cre"), Some("Basic s3cret")] {
                let (code, body) = get(addr, path, wrong).await;
                assert_eq!(code, 401, "{path} with {wrong:?}");
                let body: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(body["error"]["code"], "unauthorized", "{path}");
            }
            let (code, _) = get(addr, path, Some("Bearer s3cret")).await;
            assert_eq!(code, 200, "{path} with the token");
        }
        let (_, body) = get(addr, "/metrics", Some("Bearer s3cret")).await;
        assert!(body.contains("vigil_instances 0"), "{body}");
    }
}
