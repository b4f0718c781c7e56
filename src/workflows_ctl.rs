//! `vigil ctl workflows ...`: the remediation workflows' runs over the REST API, as tables a person reads.

use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};
use vigil_healer::client::Client;

#[derive(Subcommand)]
pub enum WorkflowsCtl {
    /// The workflows in force, the cordons in force, and the newest runs.
    List {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// The whole JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// One run with each step's state, attempts, timing and outcome.
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Start workflow NAME now (audited; no cooldown, no circuit breaker: a person asked).
    Run {
        name: String,
        /// The run's device parameter (a disk such as `sdb`, or `cpuN`).
        #[arg(long)]
        device: Option<String>,
        /// Another parameter, `KEY=VALUE` (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Plan only: show what each step would do, do nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
        /// Follow the run until it ends or waits for a person.
        #[arg(long)]
        wait: bool,
    },
    /// Approve a run waiting for a person (its `approve` steps, or a step interrupted by a restart).
    Approve { id: u64 },
    /// Cancel a run.
    Cancel { id: u64 },
    /// Lift the cordon on RESOURCE (a device such as `sdb`, or `cpuN`) that an ended run left in force,
    /// e.g. after it failed (audited). A run still under way keeps its cordon: cancel it first.
    Uncordon {
        resource: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
}

pub fn run(client: &Client, command: WorkflowsCtl) -> anyhow::Result<()> {
    match command {
        WorkflowsCtl::List { limit, json } => {
            let answer = client.call("GET", &format!("/api/v1/workflows?limit={limit}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print_list(&answer);
            }
        }
        WorkflowsCtl::Show { id, json } => {
            let run = client.call("GET", &format!("/api/v1/workflows/runs/{id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&run)?);
            } else {
                print_run(&run);
            }
        }
        WorkflowsCtl::Run { name, device, params, dry_run, reason, wait } => {
            let mut body = serde_json::Map::new();
            for p in &params {
                let Some((k, v)) = p.split_once('=') else {
                    anyhow::bail!("--param takes KEY=VALUE, got {p:?}");
                };
                body.insert(k.to_string(), json!(v));
            }
            if let Some(d) = device {
                body.insert("device".into(), json!(d));
            }
            if dry_run {
                body.insert("dry_run".into(), json!(true));
            }
            if let Some(r) = reason {
                body.insert("reason".into(), json!(r));
            }
            let path = format!("/api/v1/workflows/{}/run", crate::percent_encode(&name));
            let mut run = client.call_with("POST", &path, &Value::Object(body).to_string())?;
            let id = run["id"].as_u64().unwrap_or_default();
            eprintln!("run {id} of {name} started ({})", run["state"].as_str().unwrap_or("?"));
            if wait {
                let mut last = String::new();
                loop {
                    let state = run["state"].as_str().unwrap_or("?").to_string();
                    let progress = progress(&run);
                    if progress != last {
                        eprintln!("  {progress}");
                        last = progress;
                    }
                    if matches!(state.as_str(), "succeeded" | "failed" | "cancelled" | "waiting") {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                    run = client.call("GET", &format!("/api/v1/workflows/runs/{id}"))?;
                }
                print_run(&run);
                if run["state"] == "waiting" {
                    eprintln!("run {id} waits for a person: vigil ctl workflows approve {id}");
                }
            } else {
                eprintln!("follow it with: vigil ctl workflows show {id}");
            }
        }
        WorkflowsCtl::Approve { id } => {
            let run = client.call("POST", &format!("/api/v1/workflows/runs/{id}/approve"))?;
            eprintln!("run {id} approved");
            print_run(&run);
        }
        WorkflowsCtl::Cancel { id } => {
            let run = client.call("POST", &format!("/api/v1/workflows/runs/{id}/cancel"))?;
            eprintln!("run {id} cancelled");
            print_run(&run);
        }
        WorkflowsCtl::Uncordon { resource, reason } => {
            let path = format!("/api/v1/workflows/cordons/{}/uncordon", crate::percent_encode(&resource));
            let body = reason.map(|r| json!({ "reason": r }).to_string()).unwrap_or_default();
            let answer = client.call_with("POST", &path, &body)?;
            let c = &answer["cordon"];
            println!(
                "{resource} uncordoned (cordoned by run {} {}: {})",
                c["run_id"],
                when(&c["since_ms"]),
                c["reason"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// `step state, step state, ...` of a run.
fn progress(run: &Value) -> String {
    let steps: Vec<String> = run["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| format!("{} {}", s["name"].as_str().unwrap_or("?"), s["state"].as_str().unwrap_or("?")))
        .collect();
    format!("{}: {}", run["state"].as_str().unwrap_or("?"), steps.join(", "))
}

/// How long ago the Unix time in milliseconds `ms` was, in whole seconds (`-` when there is none).
pub fn when(ms: &Value) -> String {
    match ms.as_u64() {
        Some(ms) => {
            let ago = vigil_core::time::now_unix_ms().saturating_sub(ms);
            format!("{} ago", vigil_core::values::HumanDuration(Duration::from_millis(ago / 1000 * 1000)))
        }
        None => "-".into(),
    }
}

fn print_list(answer: &Value) {
    let workflows = answer["workflows"].as_array().cloned().unwrap_or_default();
    if workflows.is_empty() {
        println!("no workflows are configured (config `workflows:`)");
    } else {
        println!("{:<24} {:<40} {:>6}", "WORKFLOW", "TRIGGER", "STEPS");
        for w in &workflows {
            println!(
                "{:<24} {:<40} {:>6}",
                w["name"].as_str().unwrap_or("?"),
                w["trigger"].to_string(),
                w["steps"].as_array().map_or(0, Vec::len)
            );
        }
    }
    if let Some(cordons) = answer["cordons"].as_object().filter(|c| !c.is_empty()) {
        println!();
        println!("{:<16} {:>6} {:<14} REASON", "CORDONED", "RUN", "SINCE");
        for (resource, c) in cordons {
            println!(
                "{:<16} {:>6} {:<14} {}",
                resource,
                c["run_id"],
                when(&c["since_ms"]),
                c["reason"].as_str().unwrap_or("")
            );
        }
    }
    let runs = answer["runs"].as_array().cloned().unwrap_or_default();
    println!();
    if runs.is_empty() {
        println!("no workflow runs yet");
        return;
    }
    println!(
        "{:>6} {:<24} {:<10} {:<8} {:<14} {:<24} REASON",
        "RUN", "WORKFLOW", "STATE", "SOURCE", "STARTED", "STEP"
    );
    for r in &runs {
        let current = r["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .rfind(|s| !matches!(s["state"].as_str(), Some("pending")))
            .map(|s| format!("{} {}", s["name"].as_str().unwrap_or("?"), s["state"].as_str().unwrap_or("?")))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:>6} {:<24} {:<10} {:<8} {:<14} {:<24} {}",
            r["id"],
            r["workflow"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?"),
            r["source"].as_str().unwrap_or("?"),
            when(&r["created_ms"]),
            current,
            r["reason"].as_str().unwrap_or("")
        );
    }
}

fn print_run(run: &Value) {
    println!(
        "run {} of {}: {}{} (from {}: {})",
        run["id"],
        run["workflow"].as_str().unwrap_or("?"),
        run["state"].as_str().unwrap_or("?"),
        if run["dry_run"] == true { ", dry run" } else { "" },
        run["source"].as_str().unwrap_or("?"),
        run["reason"].as_str().unwrap_or("")
    );
    if let Some(m) = run["message"].as_str() {
        println!("  {m}");
    }
    if let Some(p) = run["params"].as_object().filter(|p| !p.is_empty()) {
        let list: Vec<String> = p.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?"))).collect();
        println!("  params: {}", list.join(" "));
    }
    println!("  {:<20} {:<12} {:<12} {:>7} {:>9}  RESULT", "STEP", "KIND", "STATE", "ATTEMPT", "SECONDS");
    for s in run["steps"].as_array().into_iter().flatten() {
        let seconds = match (s["started_ms"].as_u64(), s["ended_ms"].as_u64()) {
            (Some(a), Some(b)) => format!("{:.2}", b.saturating_sub(a) as f64 / 1000.0),
            (Some(a), None) => {
                format!("{:.0}…", vigil_core::time::now_unix_ms().saturating_sub(a) as f64 / 1000.0)
            }
            _ => "-".into(),
        };
        let result = match (s["error"].as_str(), &s["output"]) {
            (Some(e), _) => e.to_string(),
            (None, Value::Null) => String::new(),
            (None, o) => {
                let t = o.to_string();
                if t.len() > 100 {
                    format!("{}…", &t[..t.char_indices().nth(99).map_or(t.len(), |(i, _)| i)])
                } else {
                    t
                }
            }
        };
        println!(
            "  {:<20} {:<12} {:<12} {:>7} {:>9}  {}",
            s["name"].as_str().unwrap_or("?"),
            s["kind"].as_str().unwrap_or("?"),
            s["state"].as_str().unwrap_or("?"),
            s["attempt"],
            seconds,
            result
        );
    }
}
