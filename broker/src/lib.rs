//! Vigil's broker: the traffic entry of a host. It speaks RSocket 1.0 over TCP with its own codec
//! (`rsocket`), registers service instances that connect to it, routes every request by its routing
//! metadata, balances load across instances, shifts traffic between versions, ejects failing instances and
//! breaks circuits (`balance`), holds requests while a hibernated instance wakes (`hub`), fronts plain HTTP
//! services and HTTP clients (`http`), and reports demand, concurrency and latency to the healer
//! (`signals`, `metrics`) and full-link traces to OpenTelemetry (`trace`).
//!
//! The modules form layers, which `tests/module_graph.rs` keeps free of cycles: `rsocket`, `balance`,
//! `outcome` (how a request ended) and `upstream` (what a request is sent to, and the client for HTTP
//! endpoints) at the bottom; `config`, `metrics` and `trace` on them; `hub` on those, holding upstreams
//! only through the `Upstream` trait; the relay (`conn`, which owns connections and the `Target` they are)
//! and the trigger (`http`) on the hub; `signals` on snapshots it is handed. This file wires them together.

pub mod activator;
pub mod balance;
pub mod config;
pub mod conn;
pub mod http;
pub mod hub;
pub mod load;
pub mod metrics;
pub mod outcome;
pub mod rsocket;
pub mod signals;
pub mod trace;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::balance::Balancer;
use crate::config::{BrokerConfigError, BrokerFile};
use crate::conn::{ConnSettings, Hub, Target};
use crate::hub::Activator;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] BrokerConfigError),
    #[error("invalid traffic splits: {0}")]
    Splits(crate::balance::SplitError),
    #[error("starting trace export: {0}")]
    Tracing(trace::TraceError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running broker.
pub struct Broker {
    hub: Arc<Hub>,
    rsocket_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The HTTP trigger's worker threads.
    threads: Vec<std::thread::JoinHandle<()>>,
    activator: Arc<OnceLock<Arc<dyn Activator>>>,
}

/// How long shutdown waits for the HTTP trigger's in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How often the config file's modification time is compared, for run-time split changes.
const CONFIG_CHECK: Duration = Duration::from_secs(1);

impl Broker {
    /// Binds the RSocket and HTTP listeners and starts serving. `config_path` is watched for changes to
    /// `broker.splits`. Needs a tokio runtime.
    pub async fn start(file: BrokerFile, config_path: Option<PathBuf>) -> Result<Broker, BrokerError> {
        Self::start_with(file, config_path, None).await
    }

    /// The same, with the collector's snapshots: traces then carry each instance's kernel counters.
    pub async fn start_with(
        file: BrokerFile,
        config_path: Option<PathBuf>,
        snapshots: Option<vigil_healer::SnapshotReceiver>,
    ) -> Result<Broker, BrokerError> {
        let tracing = trace::Tracing::from_env(snapshots).map_err(BrokerError::Tracing)?;
        if tracing.is_some() {
            tracing::info!("exporting full-link traces over OTLP");
        }
        Self::start_traced(file, config_path, tracing).await
    }

    /// The same, with tracing given explicitly rather than from the OpenTelemetry environment.
    pub async fn start_traced(
        file: BrokerFile,
        config_path: Option<PathBuf>,
        tracing: Option<Arc<trace::Tracing>>,
    ) -> Result<Broker, BrokerError> {
        let b = &file.broker;
        let mut balancer = Balancer::new(b.health.clone());
        // A checked configuration's splits always pass; a setup built by hand may not.
        balancer.set_splits(b.splits.clone()).map_err(BrokerError::Splits)?;
        for s in &file.services {
            balancer.known_service(s.routed_name());
        }
        let activator: Arc<OnceLock<Arc<dyn Activator>>> = Arc::new(OnceLock::new());
        let hub = Hub::new(balancer, b.queue.clone(), b.managed_capacity, activator.clone(), tracing);
        for (i, u) in b.upstreams.iter().enumerate() {
            let id = format!("{}@{}", u.service, u.address);
            hub.known_service(&u.service);
            hub.add_instance(&u.service, &u.version, &id, u.capacity, true, Target::Http(u.address));
            tracing::debug!(upstream = i, id, "upstream added");
        }
        let settings = Arc::new(ConnSettings {
            max_frame_bytes: b.max_frame_bytes,
            max_reassembly_per_stream: b.max_reassembly_per_stream,
            max_reassembly_per_connection: b.max_reassembly_per_connection,
            max_pending_write_bytes: b.max_pending_write_bytes,
            setup_timeout: b.setup_timeout.0,
            http_timeout: b.http.request_timeout.0,
            token: b.token.as_deref().filter(|t| !t.is_empty()).map(Arc::from),
        });
        let (stop, stop_rx) = watch::channel(false);
        let listener = http::bind_listener(b.listen, false)
            .and_then(TcpListener::from_std)
            .map_err(|source| BrokerError::Bind { what: "RSocket", addr: b.listen, source })?;
        let rsocket_addr = listener.local_addr().unwrap_or(b.listen);
        let mut tasks =
            vec![tokio::spawn(accept_loop(listener, hub.clone(), settings.clone(), stop_rx.clone()))];
        let mut http_addr = None;
        let mut threads = Vec::new();
        if b.http.enabled {
            let bind_error = |source| BrokerError::Bind { what: "HTTP trigger", addr: b.http.listen, source };
            let listener = http::trigger_listener(b.http.listen).map_err(bind_error)?;
            http_addr = Some(listener.local_addr().unwrap_or(b.http.listen));
            let routes = file.http_routes();
            let make = || http::Trigger::new(hub.clone(), settings.clone(), routes.clone(), &b.http);
            let workers = b.http.workers.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            });
            threads = http::spawn_workers(make, listener, workers, stop_rx.clone()).map_err(bind_error)?;
        }
        if let Some(path) = config_path {
            tasks.push(tokio::spawn(watch_splits(path, hub.clone(), stop_rx.clone())));
        }
        tracing::info!(%rsocket_addr, http = ?http_addr, "broker listening");
        Ok(Broker { hub, rsocket_addr, http_addr, stop, tasks, threads, activator })
    }

    /// Connects the healer: its managed instances become routable, their state changes reach the broker
    /// at once, and requests that wait for a service wake it.
    pub fn attach(&mut self, activator: Arc<dyn Activator>) {
        if self.activator.set(activator.clone()).is_err() {
            return;
        }
        let hub = self.hub.clone();
        let mut stop = self.stop.subscribe();
        let mut changes = activator.changes();
        hub.sync_managed(activator.endpoints());
        self.tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = stop.changed() => return,
                }
                changes.borrow_and_update();
                hub.sync_managed(activator.endpoints());
            }
        }));
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn rsocket_addr(&self) -> SocketAddr {
        self.rsocket_addr
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The broker's metrics, for `/metrics`.
    pub fn metrics_registry(&self) -> Arc<prometheus_client::registry::Registry> {
        let hub = self.hub.clone();
        let balancer = move || {
            hub.with_balancer(|b| metrics::BalancerSnapshot {
                instances: b.instances(),
                breakers: b.breakers(),
            })
        };
        Arc::new(metrics::registry(self.hub.metrics.clone(), balancer))
    }

    /// The broker's signals for the healer (merged with the kernel's view of direct connections).
    pub fn traffic(&self) -> Arc<signals::BrokerTraffic> {
        let hub = self.hub.clone();
        Arc::new(signals::BrokerTraffic::new(move || signals::Traffic {
            completed_by_instance: hub.take_completed(),
            queued_by_service: hub.queued(),
            inflight_by_instance: hub.with_balancer(|b| {
                b.instances().into_iter().map(|v| (v.instance_id.to_string(), v.inflight)).collect()
            }),
        }))
    }

    /// Stops accepting and flushes traces; open connections end with the process.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        // The trigger's workers finish the requests they hold; requests still queued for a wake could
        // keep them for the queue timeout, so shutdown waits a few seconds at most.
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        if tokio::time::timeout(SHUTDOWN_GRACE, joined).await.is_err() {
            tracing::warn!("HTTP trigger still had requests after {SHUTDOWN_GRACE:?}; leaving them");
        }
        if let Some(t) = self.hub.tracing().cloned() {
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    hub: Arc<Hub>,
    settings: Arc<ConnSettings>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(conn::serve(hub.clone(), settings.clone(), stream));
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Re-reads `broker.splits` when the config file changes. A file with mistakes leaves the splits in force.
async fn watch_splits(path: PathBuf, hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let stamp = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last: Option<SystemTime> = stamp(&path);
    loop {
        tokio::select! {
            () = tokio::time::sleep(CONFIG_CHECK) => {}
            _ = stop.changed() => return,
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        let applied = match BrokerFile::load(&path) {
            Ok(file) => match hub.set_splits(file.broker.splits) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), "traffic splits reloaded");
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "new traffic splits rejected; the old ones stay");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "config changed but has mistakes; the splits in force stay");
                false
            }
        };
        hub.metrics.config_reload(if applied { "applied" } else { "rejected" });
    }
}
