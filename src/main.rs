//! The `vigil` binary: command-line wiring only. Each subcommand builds its components from the library
//! crates and runs them until SIGINT or SIGTERM; all logic lives in those crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vigil_broker::Broker;
use vigil_broker::config::BrokerFile;
use vigil_collector::{Collector, Config, otlp};
use vigil_core::VigilConfig;
use vigil_core::config::Runs;
use vigil_healer::config::HealerConfig;
use vigil_healer::rules;
use vigil_healer::run::Healer;
use vigil_healer::traffic::{ConnectionTraffic, TrafficSource};
use vigil_healer::workflow;

mod hardware;
mod workflows_ctl;

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Kernel-level observer and self-healing operator for service instances"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on this host: collector, managed services, healer, broker, REST and gRPC APIs (embedded defaults, or --config).
    Up {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run the collector alone: probes, discovery, /metrics.
    Collector {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run the broker alone: RSocket on broker.listen, the HTTP trigger, its /metrics on http.listen.
    Broker {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Talk to a running Vigil's API.
    Ctl {
        /// API address (`http.listen` of the running Vigil).
        #[arg(long, default_value = "127.0.0.1:9750")]
        api: SocketAddr,
        /// Bearer token, for an API bound beyond loopback (or set VIGIL_TOKEN).
        #[arg(long, env = "VIGIL_TOKEN")]
        token: Option<String>,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Validate rule files or run their own test cases.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Validate workflow files or run their own test cases.
    Workflows {
        #[command(subcommand)]
        command: WorkflowsCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// List instances with their state and metrics.
    Instances,
    /// Show one instance.
    Instance { id: String },
    /// Hibernate an instance now (through the safety gate; audited).
    Hibernate { id: String },
    /// Wake an instance now.
    Wake { id: String },
    /// Stop an instance of an on-demand or scaled service until it is needed again.
    Stop { id: String },
    /// Start a stopped instance of an on-demand or scaled service.
    Start { id: String },
    /// Restart an instance now: stop its process, start it again, wait until it is ready.
    Restart { id: String },
    /// List managed services: desired and ready instances, standby, stopped, concurrency, autoscaler mode.
    Services,
    /// Show one service, with the autoscaler's last decision and why.
    Service { name: String },
    /// Pin a scaled service at COUNT instances by hand (audited), or give it back to the autoscaler with
    /// `auto`.
    Scale { name: String, count: String },
    /// Show an action by the id its request returned (running, or finished with its decision).
    Action { id: u64 },
    /// The latest decisions, newest first.
    Decisions {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// The rules in force.
    Rules,
    /// Incoming alerts firing now (from Alertmanager's webhook), oldest first.
    Alerts {
        /// Only those whose `instance_id` label is this.
        #[arg(long)]
        instance_id: Option<String>,
        /// Only those whose `service` label is this.
        #[arg(long)]
        service: Option<String>,
        /// The whole JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Turn dry-run mode on or off (decide and audit, execute nothing).
    DryRun {
        #[arg(value_parser = ["on", "off"])]
        mode: String,
    },
    /// Hardware health: each device that had errors, its state and why, and the sources in use.
    Hardware {
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// The whole JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Remediation workflows: their runs, starting one, approving or cancelling one.
    Workflows {
        #[command(subcommand)]
        command: workflows_ctl::WorkflowsCtl,
    },
}

fn ctl_command(api: SocketAddr, token: Option<String>, command: CtlCommand) -> anyhow::Result<()> {
    let client = vigil_healer::client::Client::new(api, token);
    let command = match command {
        CtlCommand::Workflows { command } => return workflows_ctl::run(&client, command),
        other => other,
    };
    let mut body = String::new();
    if let CtlCommand::Scale { count, .. } = &command {
        body = match count.as_str() {
            "auto" => r#"{"scale": "auto"}"#.to_string(),
            n => match n.parse::<u32>() {
                Ok(n) => format!(r#"{{"instances": {n}}}"#),
                Err(_) => anyhow::bail!("COUNT must be a number of instances or `auto`, got {n:?}"),
            },
        };
    }
    let (method, path) = match &command {
        CtlCommand::Instances => ("GET", "/api/v1/instances".to_string()),
        CtlCommand::Instance { id } => ("GET", format!("/api/v1/instances/{id}")),
        CtlCommand::Hibernate { id } => ("POST", format!("/api/v1/instances/{id}/hibernate")),
        CtlCommand::Wake { id } => ("POST", format!("/api/v1/instances/{id}/wake")),
        CtlCommand::Stop { id } => ("POST", format!("/api/v1/instances/{id}/stop")),
        CtlCommand::Start { id } => ("POST", format!("/api/v1/instances/{id}/start")),
        CtlCommand::Restart { id } => ("POST", format!("/api/v1/instances/{id}/restart")),
        CtlCommand::Action { id } => ("GET", format!("/api/v1/actions/{id}")),
        CtlCommand::Services => ("GET", "/api/v1/services".to_string()),
        CtlCommand::Service { name } => ("GET", format!("/api/v1/services/{name}")),
        CtlCommand::Scale { name, .. } => ("POST", format!("/api/v1/services/{name}/scale")),
        CtlCommand::Decisions { limit } => ("GET", format!("/api/v1/decisions?limit={limit}")),
        CtlCommand::Rules => ("GET", "/api/v1/rules".to_string()),
        CtlCommand::Alerts { instance_id, service, .. } => {
            let mut query = Vec::new();
            if let Some(id) = instance_id {
                query.push(format!("instance_id={}", percent_encode(id)));
            }
            if let Some(s) = service {
                query.push(format!("service={}", percent_encode(s)));
            }
            let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
            ("GET", format!("/api/v1/alerts{query}"))
        }
        CtlCommand::DryRun { mode } => ("POST", format!("/api/v1/dry-run?enabled={}", mode == "on")),
        // Answered above, by workflows_ctl.
        CtlCommand::Workflows { .. } => return Ok(()),
        CtlCommand::Hardware { device, .. } => match device {
            Some(d) => ("GET", format!("/api/v1/hardware?device={}", percent_encode(d))),
            None => ("GET", "/api/v1/hardware".to_string()),
        },
    };
    let mut answer = client.call_with(method, &path, &body)?;
    // An action still running after the API's wait: follow it until it ends.
    if method == "POST"
        && answer["status"] == "running"
        && let Some(action_id) = answer["action_id"].as_u64()
    {
        eprintln!(
            "action {action_id} is running ({}); waiting for it",
            answer["state"].as_str().unwrap_or("?")
        );
        while answer["status"] == "running" {
            std::thread::sleep(std::time::Duration::from_millis(500));
            answer = client.call("GET", &format!("/api/v1/actions/{action_id}"))?;
        }
        if let Some(message) = answer["error"]["message"].as_str() {
            anyhow::bail!("{}: {message}", answer["error"]["code"].as_str().unwrap_or("error"));
        }
    }
    if let CtlCommand::Services = command {
        println!(
            "{:<20} {:>7} {:>6} {:>8} {:>8} {:>12} {:<7} {:<7}",
            "SERVICE", "DESIRED", "READY", "STANDBY", "STOPPED", "CONCURRENCY", "MODE", "SCALE"
        );
        for s in answer.as_array().into_iter().flatten() {
            let n = |k: &str| s[k].as_u64().map_or("-".to_string(), |v| v.to_string());
            let concurrency =
                s["observed_concurrency"].as_f64().map_or("-".to_string(), |c| format!("{c:.2}"));
            println!(
                "{:<20} {:>7} {:>6} {:>8} {:>8} {:>12} {:<7} {:<7}",
                s["name"].as_str().unwrap_or("?"),
                n("desired"),
                n("ready"),
                n("standby"),
                n("stopped"),
                concurrency,
                s["mode"].as_str().unwrap_or("-"),
                s["scale"].as_str().unwrap_or("-"),
            );
        }
    } else if let CtlCommand::Alerts { json: false, .. } = command {
        let alerts = answer["alerts"].as_array().cloned().unwrap_or_default();
        if alerts.is_empty() {
            println!("no alerts are firing");
        }
        println!("{:<28} {:<26} {:<25} {:<10} SUMMARY", "ALERT", "ABOUT", "SINCE", "SEVERITY");
        for a in &alerts {
            let about = match &a["scope"] {
                serde_json::Value::Object(o) => {
                    o.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?"))).collect::<String>()
                }
                other => other.as_str().unwrap_or("?").to_string(),
            };
            println!(
                "{:<28} {:<26} {:<25} {:<10} {}",
                a["name"].as_str().unwrap_or("?"),
                about,
                a["starts_at"].as_str().unwrap_or("?"),
                a["labels"]["severity"].as_str().unwrap_or("-"),
                a["annotations"]["summary"].as_str().unwrap_or(""),
            );
        }
    } else if let CtlCommand::Hardware { json: false, .. } = command {
        hardware::print(&answer);
    } else if let CtlCommand::Instances = command {
        println!("{:<28} {:<16} {:<12} {:>8} {:>14}", "ID", "SERVICE", "STATE", "CPU", "MEMORY");
        for i in answer["instances"].as_array().into_iter().flatten() {
            let cpu = i["metrics"]["cpu_cores"].as_f64().unwrap_or(0.0);
            let mem = i["metrics"]["memory_resident_bytes"]
                .as_u64()
                .map(|b| format!("{:.1} MiB", b as f64 / 1048576.0));
            println!(
                "{:<28} {:<16} {:<12} {:>8.3} {:>14}",
                i["id"].as_str().unwrap_or("?"),
                i["service"].as_str().unwrap_or("?"),
                i["state"].as_str().unwrap_or("?"),
                cpu,
                mem.unwrap_or_else(|| "-".into())
            );
        }
    } else {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    }
    Ok(())
}

/// Percent-encodes a query value (everything but unreserved characters).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Report every mistake in the files (`file:line:column: key.path: message`).
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Also check the receivers the rules name against this config's `notify.receivers`.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run each file's own test cases.
    Test {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Also check the receivers the rules name against this config's `notify.receivers`.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// What checking one rule or workflow file found, when it had no mistakes.
enum Checked {
    /// How many rules or workflows it declares, and which.
    Count(usize, &'static str),
    /// Its test cases' outcomes.
    Tests(Vec<rules::TestOutcome>),
}

/// Prints one file's mistakes, its count, or a line per test case; answers how many failed.
fn report_file(file: &std::path::Path, checked: Result<Checked, &dyn std::fmt::Display>) -> usize {
    match checked {
        Err(e) => {
            eprintln!("{e}");
            1
        }
        Ok(Checked::Count(n, what)) => {
            println!("ok: {} ({n} {what})", file.display());
            0
        }
        Ok(Checked::Tests(outcomes)) => {
            let mut failed = 0;
            for outcome in outcomes {
                match &outcome.failure {
                    None => println!("ok: {}: {}", file.display(), outcome.name),
                    Some(why) => {
                        println!("FAILED: {}: {}\n{why}", file.display(), outcome.name);
                        failed += 1;
                    }
                }
            }
            failed
        }
    }
}

/// Checks (and with `run_tests`, tests) each file; prints one line per file and case. Err when any fails.
fn rules_command(files: &[PathBuf], run_tests: bool, config: Option<&PathBuf>) -> anyhow::Result<()> {
    let receivers: Option<Vec<String>> = match config {
        Some(path) => Some(
            load_config(Some(path), Runs::WithoutServices)?
                .notify
                .receivers
                .into_iter()
                .map(|r| r.name)
                .collect(),
        ),
        None => None,
    };
    let mut failed = 0usize;
    for file in files {
        let checked = rules::check_file(file).and_then(|set| match &receivers {
            Some(known) => rules::check_receivers(&set, known).map(|()| set),
            None => Ok(set),
        });
        failed += match checked {
            Err(e) => report_file(file, Err(&e)),
            Ok(set) if !run_tests => report_file(file, Ok(Checked::Count(set.rules.len(), "rules"))),
            Ok(set) => report_file(file, Ok(Checked::Tests(rules::run_tests(&set)))),
        };
    }
    if failed > 0 {
        anyhow::bail!("{failed} failed");
    }
    Ok(())
}

#[derive(Subcommand)]
enum WorkflowsCommand {
    /// Report every mistake in the files (`file:line:column: key.path: message`), names used twice across
    /// them included.
    Check {
        /// Workflow files or directories; none: the config's `workflows:`.
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The config whose `workflows:` to use, and whose `notify.receivers` the workflows' receivers must be in.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run each file's own test cases.
    Test {
        /// Workflow files or directories; none: the config's `workflows:`.
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The config whose `workflows:` to use, and whose `notify.receivers` the workflows' receivers must be in.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// `rules_command` for workflow files: the files given, or the config's; one line per file and case.
fn workflows_command(files: &[PathBuf], run_tests: bool, config: Option<&PathBuf>) -> anyhow::Result<()> {
    let loaded = config.map(|path| load_config(Some(path), Runs::WithoutServices)).transpose()?;
    let receivers: Option<Vec<String>> =
        loaded.as_ref().map(|c| c.notify.receivers.iter().map(|r| r.name.clone()).collect());
    // Directories as their `*.yaml` files, as in `workflows:`.
    let files = if files.is_empty() {
        let c = match loaded {
            Some(c) => c,
            None => load_config(None, Runs::WithoutServices)?,
        };
        HealerConfig::from_config(&c).workflow_files()?
    } else {
        HealerConfig { workflows: files.to_vec(), ..HealerConfig::default() }.workflow_files()?
    };
    if files.is_empty() {
        eprintln!("no workflow files found");
    }
    let mut failed = 0usize;
    for (file, checked) in files.iter().zip(workflow::check_files(&files, receivers.as_deref())) {
        failed += match checked {
            Err(e) => report_file(file, Err(&e)),
            Ok(set) if !run_tests => report_file(file, Ok(Checked::Count(set.workflows.len(), "workflows"))),
            Ok(set) => report_file(file, Ok(Checked::Tests(workflow::run_tests(&set)))),
        };
    }
    if failed > 0 {
        anyhow::bail!("{failed} failed");
    }
    Ok(())
}

/// The file, read and checked once (every section, every mistake at once), or the embedded defaults.
fn load_config(path: Option<&PathBuf>, runs: Runs) -> anyhow::Result<VigilConfig> {
    Ok(VigilConfig::load_or_default(path.map(PathBuf::as_path), runs)?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// What to run besides the collector.
struct Parts {
    healer: Option<HealerConfig>,
    broker: Option<(BrokerFile, Option<PathBuf>)>,
    /// Where the gRPC API listens, when it is served (it serves the healer's operations).
    grpc: Option<SocketAddr>,
    /// The hardware monitor's section and the data directory its state lives in.
    hardware: Option<(vigil_core::config::HardwareConfig, PathBuf)>,
}

/// Resolves once `stopping` turns true.
async fn stopped(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

async fn run_collector(config: Config, parts: Parts) -> anyhow::Result<()> {
    let collector = Collector::start(&config.collector)?;
    let otlp = if otlp::requested() {
        let otlp_config = otlp::OtlpConfig::from_env()?.with_max_instances(config.collector.max_instances());
        let o = otlp::OtlpMetrics::start_with(collector.snapshots(), otlp_config)
            .context("starting OTLP metric export")?;
        tracing::info!("exporting metrics over OTLP");
        Some(o)
    } else {
        None
    };
    let mut broker = match parts.broker {
        Some((file, path)) if file.broker.enabled => Some(
            Broker::start_with(file, path, Some(collector.snapshots()))
                .await
                .context("starting the broker")?,
        ),
        _ => None,
    };
    let healer = match parts.healer {
        Some(hc) => {
            let traffic: Arc<dyn TrafficSource> = match &broker {
                Some(b) => b.traffic(),
                None => Arc::new(ConnectionTraffic::default()),
            };
            let h = Healer::start(&hc, collector.snapshots(), traffic)?;
            tracing::info!(services = hc.services.len(), dry_run = hc.dry_run, "healer started");
            if let Some(b) = &mut broker {
                b.attach(Arc::new(h.handle()));
                h.attach_load(b.hub().load.clone());
                h.attach_inflight(b.hub().clone());
            }
            Some(h)
        }
        None => None,
    };
    let hardware = match &parts.hardware {
        Some((hc, data_dir)) => hardware::start(hc, data_dir, &collector)?,
        None => None,
    };
    if let (Some(h), Some(hw)) = (&healer, &hardware) {
        h.attach_hardware(hw.handle());
    }
    let mut registries = Vec::new();
    registries.extend(healer.as_ref().map(Healer::metrics_registry));
    registries.extend(hardware.as_ref().map(|h| h.metrics_registry()));
    registries.extend(broker.as_ref().map(Broker::metrics_registry));
    // One token rule for the whole listener: metrics, probes and API alike; and for the gRPC API.
    let token = config.http.token.clone().filter(|t| !t.is_empty());
    let mut router = collector.router_with(registries, token.as_deref());
    if let Some(hw) = &hardware {
        router = router.merge(hardware::router(hw.handle(), token.as_deref()));
    }
    // One set of API operations behind both transports.
    let api = healer.as_ref().map(|h| h.api(collector.snapshots(), token));
    if let Some(api) = &api {
        router = router.merge(vigil_healer::api::router(api.clone()));
    }
    let grpc = api.zip(parts.grpc);
    let listen: SocketAddr = config.http.listen;
    let served = async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (http.listen)"))?;
        let grpc = match grpc {
            Some((api, addr)) => Some((api, vigil_healer::grpc::bind(addr).await?)),
            None => None,
        };
        tracing::info!(%listen, "serving /metrics, /healthz, /readyz, /api/v1/");
        // Both servers stop on the signal, and either stops the other when it fails.
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let signal = async {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = stopped(stopping.clone()) => {}
            }
            stop.send_replace(true);
        };
        let http = async {
            let r = axum::serve(listener, router)
                .with_graceful_shutdown(stopped(stopping.clone()))
                .await
                .context("HTTP server");
            stop.send_replace(true);
            r
        };
        let grpc = async {
            let Some((api, listener)) = grpc else { return Ok(()) };
            let r = vigil_healer::grpc::serve(api, listener, stopped(stopping.clone())).await;
            stop.send_replace(true);
            r.map_err(anyhow::Error::from)
        };
        let ((), http, grpc) = tokio::join!(signal, http, grpc);
        http.and(grpc)
    }
    .await;
    if let Some(b) = broker {
        b.shutdown().await;
    }
    // Managed instances are stopped and their cgroups removed even when serving failed.
    if let Some(h) = healer {
        h.shutdown().await;
    }
    if let Some(hw) = hardware {
        let _ = tokio::task::spawn_blocking(move || hw.shutdown()).await;
    }
    served?;
    if let Some(o) = otlp
        && let Err(e) = o.shutdown()
    {
        tracing::warn!(error = %e, "flushing OTLP metrics failed");
    }
    collector.stop();
    Ok(())
}

/// The broker alone, without probes or healer: its metrics on `http.listen`.
async fn run_broker(config: Config, file: BrokerFile, path: Option<PathBuf>) -> anyhow::Result<()> {
    let broker = Broker::start(file, path).await.context("starting the broker")?;
    let registry = broker.metrics_registry();
    let router = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    // prometheus-client writes OpenMetrics; say so.
                    let content_type = [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )];
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &registry) {
                        Ok(()) => (axum::http::StatusCode::OK, content_type, text),
                        Err(e) => {
                            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, content_type, e.to_string())
                        }
                    }
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let router = vigil_auth::require_bearer(router, config.http.token());
    let listen: SocketAddr = config.http.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (http.listen)"))?;
    tracing::info!(%listen, "serving /metrics, /healthz");
    let served =
        axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await.context("HTTP server");
    broker.shutdown().await;
    served
}

/// The error and its causes in one line, skipping causes the message already quotes (our error types
/// include their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIGIL_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Rules { command: RulesCommand::Check { files, config } } => {
            rules_command(&files, false, config.as_ref())
        }
        Command::Rules { command: RulesCommand::Test { files, config } } => {
            rules_command(&files, true, config.as_ref())
        }
        Command::Workflows { command: WorkflowsCommand::Check { files, config } } => {
            workflows_command(&files, false, config.as_ref())
        }
        Command::Workflows { command: WorkflowsCommand::Test { files, config } } => {
            workflows_command(&files, true, config.as_ref())
        }
        Command::Ctl { api, token, command } => ctl_command(api, token, command),
        Command::DefaultConfig => {
            print!("{}", vigil_core::config::DEFAULT_YAML);
            Ok(())
        }
        // Each component is built from its sections of the one parsed file.
        Command::Up { config } => load_config(config.as_ref(), Runs::Everything).and_then(|c| {
            let healer = Some(HealerConfig::from_config(&c));
            let broker = Some((BrokerFile::from_config(&c), config.clone()));
            let grpc = c.grpc.enabled.then_some(c.grpc.listen);
            let hardware = Some((c.hardware.clone(), c.data_dir.clone()));
            runtime()?
                .block_on(run_collector(Config::from_config(&c), Parts { healer, broker, grpc, hardware }))
        }),
        Command::Collector { config } => load_config(config.as_ref(), Runs::WithoutServices).and_then(|c| {
            runtime()?.block_on(run_collector(
                Config::from_config(&c),
                Parts {
                    healer: None,
                    broker: None,
                    grpc: None,
                    hardware: Some((c.hardware.clone(), c.data_dir.clone())),
                },
            ))
        }),
        Command::Broker { config } => load_config(config.as_ref(), Runs::WithoutServices).and_then(|c| {
            runtime()?.block_on(run_broker(
                Config::from_config(&c),
                BrokerFile::from_config(&c),
                config.clone(),
            ))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
