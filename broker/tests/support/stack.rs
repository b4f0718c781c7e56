//! The whole of Vigil in one test process: a collector, a healer running the config's services, and the
//! broker in front, with the API on an ephemeral loopback port. Torn down on drop (instances stopped,
//! cgroups removed, the data directory too unless it is kept for a restart). Needs root.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use vigil_broker::Broker;
use vigil_broker::config::BrokerFile;
use vigil_collector::Collector;
use vigil_collector::config::CollectorConfig;
use vigil_collector::discovery::WatchConfig;
use vigil_healer::config::HealerConfig;
use vigil_healer::run::Healer;

/// What a [`Stack`] runs.
pub struct Options<'a> {
    /// Names the cgroup parent and the data directory.
    pub tag: &'a str,
    /// The YAML of the `services:` list (entries indented by two spaces).
    pub services: String,
    /// Follows the healer's own keys (indent by two spaces).
    pub healer_extra: &'a str,
    /// Follows the broker's own keys (indent by two spaces).
    pub broker_extra: &'a str,
    /// A YAML list of rule files.
    pub rules: &'a str,
    /// Where the HTTP trigger listens.
    pub trigger: &'a str,
    /// Keep the data directory on drop (for a second stack that restarts on it).
    pub keep_data: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            tag: "stack",
            services: String::new(),
            healer_extra: "",
            broker_extra: "",
            rules: "[]",
            trigger: "127.0.0.1:0",
            keep_data: false,
        }
    }
}

pub struct Stack {
    pub runtime: tokio::runtime::Runtime,
    pub collector: Option<Collector>,
    pub healer: Option<Healer>,
    pub broker: Option<Broker>,
    pub api: SocketAddr,
    pub trigger: SocketAddr,
    pub parent: String,
    pub data_dir: PathBuf,
    keep_data: bool,
}

impl Stack {
    pub fn start(o: Options) -> Stack {
        let parent = format!("/vigil-test-{}-{}", o.tag, std::process::id());
        let data_dir = std::env::temp_dir().join(format!("vigil-test-{}-{}", o.tag, std::process::id()));
        let yaml = format!(
            "data_dir: {}\nrules: {}\nservices:\n{}healer:\n  cgroup_parent: {parent}\n  stop_grace: 2s\n  max_actions_per_minute: 200\n{}collector:\n  watch: {{ managed_root: {parent} }}\nbroker:\n  listen: 127.0.0.1:0\n  http: {{ listen: \"{}\" }}\n{}",
            data_dir.display(),
            o.rules,
            o.services,
            o.healer_extra,
            o.trigger,
            o.broker_extra,
        );
        let healer_config = HealerConfig::parse(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let broker_file = BrokerFile::parse(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let collector_config = CollectorConfig {
            watch: WatchConfig {
                include: vec![parent.clone()],
                managed_root: parent.clone(),
                ..WatchConfig::default()
            },
            ..CollectorConfig::default()
        };
        let collector = Collector::start(&collector_config).expect("collector starts (root)");
        let (healer, broker, api) = runtime.block_on(async {
            let mut broker =
                Broker::start_with(broker_file, None, Some(collector.snapshots())).await.expect("broker");
            let healer =
                Healer::start(&healer_config, collector.snapshots(), broker.traffic()).expect("healer");
            broker.attach(Arc::new(healer.handle()));
            healer.attach_load(broker.hub().load.clone());
            let router = collector
                .router_with(vec![healer.metrics_registry(), broker.metrics_registry()], None)
                .merge(healer.router(collector.snapshots(), None));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move { axum::serve(listener, router).await });
            (healer, broker, addr)
        });
        let trigger = broker.http_addr().expect("HTTP trigger");
        Stack {
            runtime,
            collector: Some(collector),
            healer: Some(healer),
            broker: Some(broker),
            api,
            trigger,
            parent,
            data_dir,
            keep_data: o.keep_data,
        }
    }

    pub fn healer(&self) -> &Healer {
        self.healer.as_ref().expect("running")
    }

    pub fn broker(&self) -> &Broker {
        self.broker.as_ref().expect("running")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let (broker, healer) = (self.broker.take(), self.healer.take());
        self.runtime.block_on(async {
            if let Some(b) = broker {
                b.shutdown().await;
            }
            if let Some(h) = healer {
                h.shutdown().await;
            }
        });
        if let Some(c) = self.collector.take() {
            c.stop();
        }
        if !self.keep_data {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
        for root in
            ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuset"]
        {
            let _ = std::fs::remove_dir(format!("{root}{}", self.parent));
        }
    }
}

/// The first of `n` consecutive loopback ports that are free now, below the kernel's ephemeral range (so that
/// no client connection takes one of them while a service is stopped: an autoscaled service binds its
/// instance ports again and again).
pub fn free_ports(n: u16) -> u16 {
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    // Each candidate block once, starting at one that depends on the process (tests run in parallel
    // processes), wrapping around below the ephemeral range.
    let blocks = (ephemeral_low.saturating_sub(10_000) / n.max(1)).max(1);
    let first = (std::process::id() % u32::from(blocks)) as u16;
    (0..blocks)
        .map(|i| 10_000 + ((first + i) % blocks) * n)
        .find(|&base| (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()))
        .unwrap_or_else(|| panic!("no {n} consecutive free ports below {ephemeral_low}"))
}
