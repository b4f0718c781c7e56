//! [`Hardware`]: the running monitor. Two threads of its own, so nothing blocks an async runtime: the
//! kernel log reader (asleep in `poll()` until the kernel writes a record) and the poll loop (sysfs
//! counters, tracepoint counts, the state file, every `poll_interval`). Every event from either, or from
//! [`HardwareHandle::record`], goes the same way: metrics, the health tracker, then the subscribers.
//!
//! Consumers (the API, the workflow engine) hold a [`HardwareHandle`]: subscribe to events, ask a device's
//! health, count events of a kind in a window, read the report. Shutdown stops both threads and saves the
//! kernel log cursor and the sysfs readings, so a restart in the same boot reports nothing twice.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::broadcast;
use vigil_core::config::HardwareConfig;
use vigil_core::time::now_unix_ms;

use crate::event::{HardwareEvent, Kind, KmsgOrigin, Source};
use crate::health::{DeviceHealth, HealthTracker, State};
use crate::kmsg::{self, Batch, Reader};
use crate::metrics::{self, DeviceStates, HardwareMetrics};
use crate::patterns::{Patterns, PatternsError};
use crate::state::{self, Persisted, StateError};
use crate::sysfs::{SourceStatus, SysfsScanner};
use crate::tracepoint::{TracepointDeltas, TracepointSource};

/// Events a slow subscriber may fall behind by before it misses some (it is told how many).
const CHANNEL_CAPACITY: usize = 4096;

/// While records that match no pattern stream in, the kernel log cursor is written at most this often; the
/// poll tick and shutdown write whatever is left. A batch that brought hardware events is written at once,
/// so a crash reads again at most the batch whose write it interrupted, not a poll interval's events.
const SAVE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Why the monitor cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HardwareError {
    #[error(transparent)]
    Patterns(#[from] PatternsError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot start the {what} thread: {source}")]
    Thread { what: &'static str, source: std::io::Error },
}

/// The monitor's report, as `GET /api/v1/hardware` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct HardwareReport {
    pub devices: Vec<DeviceHealth>,
    /// Every source, available or not, and why.
    pub sources: Vec<SourceStatus>,
    /// Events about devices beyond `hardware.max_devices`.
    pub dropped_events: u64,
    /// The quiet window after which a device is healthy again.
    pub quiet_seconds: u64,
}

impl HardwareReport {
    /// The report as `GET /api/v1/hardware[?device=]` answers it: with `device`, that device only, or why
    /// it is not listed.
    pub fn to_json(&self, device: Option<&str>) -> Result<serde_json::Value, String> {
        let mut body = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(device) = device {
            let Some(d) = self.devices.iter().find(|d| d.device == device) else {
                return Err(format!(
                    "no errors were seen on `{device}`: it is healthy as far as Vigil knows"
                ));
            };
            body["devices"] = serde_json::json!([d]);
        }
        Ok(body)
    }
}

struct Shared {
    health: Mutex<HealthTracker>,
    events: broadcast::Sender<HardwareEvent>,
    metrics: HardwareMetrics,
    patterns: Patterns,
    kept: Mutex<Persisted>,
    state_path: PathBuf,
    dirty: AtomicBool,
    last_save: Mutex<Instant>,
    kmsg_status: Mutex<SourceStatus>,
    sysfs_status: Mutex<Vec<SourceStatus>>,
    tracepoints: Option<Arc<dyn TracepointSource>>,
}

/// Locks `m`, going on with the data of a thread that panicked while holding it (it is plain data, and a
/// monitor that stops reporting is worse than one that reports what it has).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn ingest(&self, event: HardwareEvent) {
        let now = now_unix_ms();
        if lock(&self.health).record(&event, now) {
            self.metrics.event(&event);
        } else {
            self.metrics.dropped.inc();
        }
        // No subscriber is no error.
        let _ = self.events.send(event);
    }

    /// Writes the state file if it changed (`force`: now; otherwise at most every [`SAVE_AT_MOST_EVERY`]).
    fn save(&self, force: bool) {
        if !self.dirty.load(Ordering::Acquire) {
            return;
        }
        let mut last = lock(&self.last_save);
        if !force && last.elapsed() < SAVE_AT_MOST_EVERY {
            return;
        }
        self.dirty.store(false, Ordering::Release);
        let snapshot = lock(&self.kept).clone();
        if let Err(e) = state::save(&self.state_path, &snapshot) {
            self.dirty.store(true, Ordering::Release);
            self.metrics.source_error("state", 1);
            tracing::warn!(error = %e, "saving the hardware state failed; retrying on the next tick");
        }
        *last = Instant::now();
    }

    fn set_kmsg_status(&self, available: bool, detail: String) {
        *lock(&self.kmsg_status) = SourceStatus { name: "kmsg".into(), available, detail };
    }

    /// One batch of kernel log records: matched, turned into events, and the cursor moved past them.
    fn kmsg_batch(&self, batch: Batch) {
        self.metrics.kmsg_records.inc_by(batch.records.len() as u64);
        if batch.lost > 0 {
            self.metrics.kmsg_lost.inc_by(batch.lost);
            tracing::warn!(lost = batch.lost, "kernel log records were overwritten before they were read");
        }
        if !batch.malformed.is_empty() {
            self.metrics.source_error("kmsg", batch.malformed.len() as u64);
            for e in &batch.malformed {
                tracing::debug!(error = %e, "skipping a kernel log record");
            }
        }
        if batch.records.is_empty() && batch.skipped == 0 {
            return;
        }
        let (now_ms, mono_us) = (now_unix_ms(), kmsg::monotonic_now_usec());
        let mut events = 0;
        for record in &batch.records {
            let Some(m) = self.patterns.find(&record.message) else { continue };
            events += 1;
            self.ingest(HardwareEvent {
                device: m.device,
                kind: m.kind.clone(),
                severity: m.severity,
                source: Source::Kmsg,
                counter: format!("kmsg:{}", m.pattern),
                delta: m.count,
                message: record.message.clone(),
                at_unix_ms: kmsg::wall_clock_ms(record.ts_usec, now_ms, mono_us),
                kmsg: Some(KmsgOrigin { seq: record.seq, facility: record.facility }),
            });
        }
        let mut kept = lock(&self.kept);
        if batch.last_seq.is_some() && kept.kmsg_seq != batch.last_seq {
            kept.kmsg_seq = batch.last_seq;
            self.dirty.store(true, Ordering::Release);
        }
        drop(kept);
        // Events were counted and sent: a restart after a crash must not report them again.
        self.save(events > 0);
    }
}

impl DeviceStates for Shared {
    fn states(&self) -> Vec<(String, State)> {
        lock(&self.health).devices(now_unix_ms()).into_iter().map(|d| (d.device, d.state)).collect()
    }
}

/// What consumers hold: cheap to clone, answers from the monitor's current state.
#[derive(Clone)]
pub struct HardwareHandle {
    shared: Arc<Shared>,
}

impl HardwareHandle {
    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HardwareEvent> {
        self.shared.events.subscribe()
    }

    /// Every device seen, with its health, by name.
    pub fn devices(&self) -> Vec<DeviceHealth> {
        lock(&self.shared.health).devices(now_unix_ms())
    }

    /// `device`'s health; a device never seen is healthy since the monitor started.
    pub fn health(&self, device: &str) -> DeviceHealth {
        lock(&self.shared.health).health(device, now_unix_ms())
    }

    /// Events of `kind` (sums of deltas) on `device`, or on any device, in the last `within` (at most
    /// [`HardwareHandle::history`] back).
    pub fn count(&self, kind: &Kind, device: Option<&str>, within: Duration) -> u64 {
        lock(&self.shared.health).count(kind, device, within, now_unix_ms())
    }

    /// How long `device` has been healthy; `None` while it is degraded or failed.
    pub fn healthy_for(&self, device: &str) -> Option<Duration> {
        lock(&self.shared.health).healthy_for(device, now_unix_ms())
    }

    /// How far back [`HardwareHandle::count`] sees.
    pub fn history(&self) -> Duration {
        lock(&self.shared.health).history()
    }

    /// Injects an event from another source (it is counted, tracked and sent to subscribers like the
    /// monitor's own).
    pub fn record(&self, event: HardwareEvent) {
        self.shared.ingest(event);
    }

    /// The devices and the sources in use or unavailable, with why.
    pub fn report(&self) -> HardwareReport {
        let s = &self.shared;
        let mut sources = vec![lock(&s.kmsg_status).clone()];
        sources.extend(lock(&s.sysfs_status).iter().cloned());
        if let Some(tp) = &s.tracepoints {
            sources.extend(tp.report().into_iter().map(|(name, available, why)| SourceStatus {
                name: format!("tracepoint:{name}"),
                available,
                detail: if available { "attached".to_string() } else { why },
            }));
        }
        let health = lock(&s.health);
        HardwareReport {
            devices: health.devices(now_unix_ms()),
            sources,
            dropped_events: health.dropped(),
            quiet_seconds: health.quiet().as_secs(),
        }
    }

    /// The metrics, for `/metrics`.
    pub fn metrics_registry(&self) -> Arc<Registry> {
        Arc::new(metrics::registry(&self.shared.metrics, self.shared.clone()))
    }
}

/// The running monitor; stopping it (or dropping it) saves its state.
pub struct Hardware {
    handle: HardwareHandle,
    stop_poll: Option<mpsc::Sender<()>>,
    stop_kmsg: Option<std::io::PipeWriter>,
    threads: Vec<JoinHandle<()>>,
}

impl std::ops::Deref for Hardware {
    type Target = HardwareHandle;
    fn deref(&self) -> &HardwareHandle {
        &self.handle
    }
}

impl Hardware {
    /// Starts watching as `config` says, keeping its state in `data_dir`.
    pub fn start(config: &HardwareConfig, data_dir: &Path) -> Result<Hardware, HardwareError> {
        Self::start_with(config, data_dir, None)
    }

    /// Starts watching, with tracepoint counts from `tracepoints`.
    pub fn start_with(
        config: &HardwareConfig,
        data_dir: &Path,
        tracepoints: Option<Arc<dyn TracepointSource>>,
    ) -> Result<Hardware, HardwareError> {
        Self::start_subscribed(config, data_dir, tracepoints).map(|(h, _)| h)
    }

    /// Starts watching and hands back a subscription made before the first event, so nothing read at
    /// start (the kernel log's backlog, what changed while Vigil was down) is missed.
    pub fn start_subscribed(
        config: &HardwareConfig,
        data_dir: &Path,
        tracepoints: Option<Arc<dyn TracepointSource>>,
    ) -> Result<(Hardware, broadcast::Receiver<HardwareEvent>), HardwareError> {
        let patterns = Patterns::load(&config.patterns)?;
        std::fs::create_dir_all(data_dir)
            .map_err(|source| HardwareError::DataDir { path: data_dir.to_path_buf(), source })?;
        let boot_id = state::boot_id()?;
        let state_path = data_dir.join(state::FILE_NAME);
        let (kept, note) = state::load(&state_path, &boot_id);
        if let Some(note) = note {
            tracing::info!(path = %state_path.display(), "hardware state {note}");
        }
        let (events, receiver) = broadcast::channel(CHANNEL_CAPACITY);
        let started = now_unix_ms();
        let shared = Arc::new(Shared {
            health: Mutex::new(HealthTracker::new(config.quiet(), config.max_devices, started)),
            events,
            metrics: HardwareMetrics::default(),
            patterns,
            kept: Mutex::new(kept.clone()),
            state_path,
            dirty: AtomicBool::new(false),
            last_save: Mutex::new(Instant::now()),
            kmsg_status: Mutex::new(SourceStatus {
                name: "kmsg".into(),
                available: false,
                detail: "hardware watching is off".into(),
            }),
            sysfs_status: Mutex::new(Vec::new()),
            tracepoints,
        });
        let mut hw = Hardware {
            handle: HardwareHandle { shared: shared.clone() },
            stop_poll: None,
            stop_kmsg: None,
            threads: Vec::new(),
        };
        if !config.enabled {
            return Ok((hw, receiver));
        }

        match config.kmsg_path() {
            None => {
                shared.set_kmsg_status(false, "the kernel log is turned off (hardware.kmsg is empty)".into())
            }
            Some(path) => match kmsg::open(path) {
                Err(e) => {
                    tracing::warn!(error = %e, "hardware: the kernel log cannot be read; watching sysfs only");
                    shared.set_kmsg_status(false, e.to_string());
                }
                Ok(mut file) => {
                    if kept.kmsg_seq.is_none() && !config.kmsg_backlog {
                        // /dev/kmsg seeks to the record after the last one: only new records follow.
                        use std::io::Seek;
                        if let Err(e) = file.seek(std::io::SeekFrom::End(0)) {
                            tracing::warn!(error = %e, "hardware: cannot skip the kernel log's backlog; reading it");
                        }
                    }
                    let (stop_read, stop_write) = std::io::pipe()
                        .map_err(|source| HardwareError::Thread { what: "kernel log", source })?;
                    shared.set_kmsg_status(true, format!("reading {}", path.display()));
                    let mut reader = Reader::new(kept.kmsg_seq);
                    let s = shared.clone();
                    let path = path.display().to_string();
                    let thread = std::thread::Builder::new()
                        .name("vigil-kmsg".into())
                        .spawn(move || {
                            let stopped =
                                kmsg::run(&mut file, &mut reader, &stop_read, |batch| s.kmsg_batch(batch));
                            if let kmsg::Stopped::Failed(why) = stopped {
                                tracing::warn!(%path, "hardware: {why}");
                                s.set_kmsg_status(false, format!("{path}: {why}"));
                            }
                        })
                        .map_err(|source| HardwareError::Thread { what: "kernel log", source })?;
                    hw.threads.push(thread);
                    hw.stop_kmsg = Some(stop_write);
                }
            },
        }

        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let s = shared.clone();
        let mut scanner = SysfsScanner::new(&config.sysfs_root, kept.readings);
        let interval = config.poll_interval();
        let thread = std::thread::Builder::new()
            .name("vigil-hw-poll".into())
            .spawn(move || {
                let mut deltas = TracepointDeltas::default();
                loop {
                    poll_once(&s, &mut scanner, &mut deltas);
                    match stop_rx.recv_timeout(interval) {
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            })
            .map_err(|source| HardwareError::Thread { what: "hardware poll", source })?;
        hw.threads.push(thread);
        hw.stop_poll = Some(stop_tx);
        Ok((hw, receiver))
    }

    /// A handle for consumers.
    pub fn handle(&self) -> HardwareHandle {
        self.handle.clone()
    }

    /// Stops both threads and saves the state.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Closing the pipe wakes the reader's poll(); dropping the sender ends the poll loop's wait.
        self.stop_kmsg.take();
        self.stop_poll.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.handle.shared.save(true);
    }
}

impl Drop for Hardware {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One poll tick: sysfs, tracepoints, pruning, the state file.
fn poll_once(s: &Shared, scanner: &mut SysfsScanner, deltas: &mut TracepointDeltas) {
    let now = now_unix_ms();
    let scan = scanner.scan(now);
    if !scan.errors.is_empty() {
        s.metrics.source_error("sysfs", scan.errors.len() as u64);
        for e in &scan.errors {
            tracing::debug!(error = %e, "hardware: a sysfs file could not be read");
        }
    }
    for (device, seconds) in &scan.latencies {
        s.metrics.io_latency(device, *seconds);
    }
    *lock(&s.sysfs_status) = scan.sources;
    for event in scan.events {
        s.ingest(event);
    }
    if let Some(tp) = &s.tracepoints {
        for event in deltas.events(tp.read(), now) {
            s.ingest(event);
        }
    }
    lock(&s.health).prune(now);
    let mut kept = lock(&s.kept);
    if &kept.readings != scanner.readings() {
        kept.readings = scanner.readings().clone();
        s.dirty.store(true, Ordering::Release);
    }
    drop(kept);
    s.save(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Severity;
    use crate::sysfs::tests::TempDir;
    use crate::tracepoint::tests::{FakeTracepoints, count};

    fn config(root: &Path) -> HardwareConfig {
        HardwareConfig {
            sysfs_root: root.to_path_buf(),
            kmsg: PathBuf::new(),
            poll_interval: vigil_core::values::HumanDuration::from_secs(1),
            ..HardwareConfig::default()
        }
    }

    fn next(rx: &mut broadcast::Receiver<HardwareEvent>) -> HardwareEvent {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rx.try_recv() {
                Ok(e) => return e,
                Err(broadcast::error::TryRecvError::Empty) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("no event within 10s: {e:?}"),
            }
        }
    }

    #[test]
    fn sysfs_rises_reach_subscribers_health_and_the_report_and_survive_a_restart() {
        let sys = TempDir::new("mon-sys");
        let data = TempDir::new("mon-data");
        sys.write("devices/system/edac/mc/mc0/ce_count", "1\n");
        sys.write("devices/system/edac/mc/mc0/ue_count", "0\n");
        let hw = Hardware::start(&config(&sys.0), &data.0).unwrap();
        let mut rx = hw.subscribe();
        // The first tick took the baseline; wait for the state file that says so, then raise the counter.
        let state_path = data.0.join(state::FILE_NAME);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&state_path).is_ok_and(|t| t.contains("edac/mc0/ce_count")) {
            assert!(Instant::now() < deadline, "no baseline saved");
            std::thread::sleep(Duration::from_millis(5));
        }
        sys.write("devices/system/edac/mc/mc0/ue_count", "2\n");
        let e = next(&mut rx);
        assert_eq!(
            (e.device.as_str(), e.kind.as_str(), e.delta, e.severity),
            ("mc0", "memory_ue", 2, Severity::Critical)
        );
        assert_eq!(hw.health("mc0").state, State::Failed);
        assert_eq!(hw.count(&Kind::memory_ue(), Some("mc0"), Duration::from_secs(60)), 2);
        assert_eq!(hw.count(&Kind::memory_ue(), None, Duration::from_secs(60)), 2);
        let report = hw.report();
        assert_eq!(report.devices.len(), 1);
        let kmsg = report.sources.iter().find(|s| s.name == "kmsg").unwrap();
        assert!(!kmsg.available && kmsg.detail.contains("turned off"), "{kmsg:?}");
        assert!(report.sources.iter().any(|s| s.name == "edac" && s.available));
        hw.shutdown();

        // Down while one more error happened: reported once after the restart, and only once.
        sys.write("devices/system/edac/mc/mc0/ue_count", "3\n");
        let (hw, mut rx) = Hardware::start_subscribed(&config(&sys.0), &data.0, None).unwrap();
        let e = next(&mut rx);
        assert_eq!((e.kind.as_str(), e.delta), ("memory_ue", 1));
        hw.shutdown();
        let (_hw, mut rx) = Hardware::start_subscribed(&config(&sys.0), &data.0, None).unwrap();
        // A tracer event injected after start arrives first: nothing else came before it.
        _hw.record(HardwareEvent {
            device: "probe".into(),
            kind: Kind::io_error(),
            severity: Severity::Info,
            source: Source::Tracepoint,
            counter: "test".into(),
            delta: 1,
            message: "marker".into(),
            at_unix_ms: now_unix_ms(),
            kmsg: None,
        });
        let first = next(&mut rx);
        assert_eq!(first.device, "probe", "{first:?}");
    }

    fn batch(seq: u64, message: &str) -> Batch {
        Batch {
            records: vec![kmsg::KmsgRecord {
                level: 3,
                facility: 1,
                seq,
                ts_usec: kmsg::monotonic_now_usec(),
                message: message.into(),
                fields: Vec::new(),
            }],
            lost: 0,
            malformed: Vec::new(),
            skipped: 0,
            last_seq: Some(seq),
            end: kmsg::BatchEnd::WouldBlock,
        }
    }

    #[test]
    fn a_batch_with_hardware_events_writes_the_cursor_at_once_and_other_records_wait() {
        let sys = TempDir::new("mon-cursor");
        let data = TempDir::new("mon-cursor-data");
        // Off: no thread of its own runs, so the batches below are the only ones and nothing else saves.
        let c = HardwareConfig { enabled: false, ..config(&sys.0) };
        let hw = Hardware::start(&c, &data.0).unwrap();
        let shared = &hw.handle.shared;
        let boot = state::boot_id().unwrap();
        let cursor = || state::load(&data.0.join(state::FILE_NAME), &boot).0.kmsg_seq;
        // A save has just happened as far as the rate limit knows.
        *lock(&shared.last_save) = Instant::now();
        shared.kmsg_batch(batch(10, "usb 1-1: new high-speed USB device number 2 using xhci_hcd"));
        assert_eq!(cursor(), None, "a record matching no pattern waits for the next tick");
        // Counted, so a crash from here on must not count it again: the cursor is on disk before the batch
        // is done with.
        shared.kmsg_batch(batch(
            11,
            "I/O error, dev sdq, sector 8 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 2",
        ));
        assert_eq!(hw.count(&Kind::io_error(), Some("sdq"), Duration::from_secs(60)), 1);
        assert_eq!(cursor(), Some(11));
        shared.kmsg_batch(batch(12, "usb 1-1: USB disconnect, device number 2"));
        assert_eq!(cursor(), Some(11));
        hw.shutdown();
        assert_eq!(cursor(), Some(12), "the stop writes what was left");
    }

    #[test]
    fn tracepoint_counts_become_events_and_their_sources_are_reported() {
        let sys = TempDir::new("mon-tp");
        let data = TempDir::new("mon-tp-data");
        let fake = Arc::new(FakeTracepoints::default());
        *fake.0.lock().unwrap() = vec![count("sdz", 2)];
        let (hw, mut rx) = Hardware::start_subscribed(&config(&sys.0), &data.0, Some(fake.clone())).unwrap();
        let e = next(&mut rx);
        assert_eq!((e.device.as_str(), e.source, e.delta), ("sdz", Source::Tracepoint, 2));
        *fake.0.lock().unwrap() = vec![count("sdz", 5)];
        assert_eq!(next(&mut rx).delta, 3);
        let report = hw.report();
        let mce = report.sources.iter().find(|s| s.name == "tracepoint:mce:mce_record").unwrap();
        assert_eq!((mce.available, mce.detail.as_str()), (false, "no MCE on this host"));
        assert_eq!(hw.health("sdz").state, State::Degraded);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &hw.metrics_registry()).unwrap();
        assert!(
            text.contains(
                "vigil_hardware_errors_total{device=\"sdz\",kind=\"io_error\",severity=\"error\"} 5"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_unreadable_kernel_log_is_reported_and_sysfs_goes_on() {
        let sys = TempDir::new("mon-nokmsg");
        let data = TempDir::new("mon-nokmsg-data");
        let mut c = config(&sys.0);
        c.kmsg = PathBuf::from("/nonexistent/kmsg");
        let hw = Hardware::start(&c, &data.0).unwrap();
        let kmsg = hw.report().sources.into_iter().find(|s| s.name == "kmsg").unwrap();
        assert!(!kmsg.available && kmsg.detail.contains("/nonexistent/kmsg"), "{kmsg:?}");
        let mut bad = config(&sys.0);
        bad.patterns = vec![PathBuf::from("/nonexistent/patterns.yaml")];
        let e = Hardware::start(&bad, &data.0).err().unwrap().to_string();
        assert!(e.contains("/nonexistent/patterns.yaml"), "{e}");
    }
}
