//! Remediation workflows end to end through `vigil up`, on this host's real CPUs and processes:
//! - a run cordons CPU 1, drains and evacuates the instance on it (the kernel's own affinity of its process
//!   loses CPU 1), runs a command with the run's parameters, waits for a person (`vigil ctl workflows
//!   approve`), uncordons; every step is audited; a restart after the uncordon gets every CPU back;
//! - Vigil killed (SIGKILL) in the middle of a step that is not idempotent: after the restart the run waits
//!   for a person, saying why, and runs the step again only once approved; an idempotent step is simply run
//!   again;
//! - `cpu_offline` takes CPU 1 offline for real and `cpu_online` brings it back (a guard puts it back
//!   whatever happens);
//! - a dry run shows the plan and changes nothing.
//!
//! Needs root (cgroups, CPU hotplug) and at least two online CPUs.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::{CgroupParent, Scratch, Vigil, free_ports, wait_for};

/// The kernel's CPU affinity of `pid`, as its cpu list.
fn cpus_allowed(pid: u64) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process runs");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
        .expect("Cpus_allowed_list")
}

fn online_cpus() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/online").expect("online cpus").trim().to_string()
}

/// Puts CPU 1 back online when dropped, whatever the test did.
struct CpuBack;

impl Drop for CpuBack {
    fn drop(&mut self) {
        let _ = std::fs::write("/sys/devices/system/cpu/cpu1/online", "1");
    }
}

fn config(
    scratch: &Scratch,
    parent: &CgroupParent,
    api: u16,
    app: u16,
    workflows: &Path,
) -> std::path::PathBuf {
    config_with_rules(scratch, parent, api, app, workflows, "[]")
}

fn config_with_rules(
    scratch: &Scratch,
    parent: &CgroupParent,
    api: u16,
    app: u16,
    workflows: &Path,
    rules: &str,
) -> std::path::PathBuf {
    scratch.write(
        "vigil.yaml",
        &format!(
            "data_dir: {data}\nhttp: {{ listen: \"127.0.0.1:{api}\" }}\nrules: {rules}\nworkflows: [{wf}]\nhealer: {{ cgroup_parent: {parent}, stop_grace: 2s }}\ncollector: {{ watch: {{ managed_root: {parent} }} }}\nbroker: {{ enabled: false }}\nhardware: {{ enabled: false }}\nservices:\n  - name: echo\n    command: [python3, -m, http.server, --bind, 127.0.0.1, \"{{port}}\"]\n    port: {app}\n    readiness: {{ tcp: true }}\n",
            data = scratch.path("data").display(),
            wf = workflows.display(),
        ),
    )
}

fn run_of(vigil: &Vigil, id: u64) -> Value {
    vigil.get(&format!("/api/v1/workflows/runs/{id}")).expect("the run")
}

fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["steps"].as_array().and_then(|s| s.iter().find(|s| s["name"] == name)).expect("the step")
}

/// Waits until run `id` is in `state`; panics with the run when it ended otherwise.
fn wait_run(vigil: &mut Vigil, id: u64, state: &str) -> Value {
    wait_for(&format!("run {id} to be {state}"), Duration::from_secs(60), || {
        vigil.proc.assert_running();
        let run = run_of(vigil, id);
        let now = run["state"].as_str().unwrap_or("?").to_string();
        if now != state && matches!(now.as_str(), "succeeded" | "failed" | "cancelled") {
            panic!("run {id} ended {now}, not {state}: {run:#}");
        }
        (now == state).then_some(run)
    })
}

fn start(vigil: &Vigil, workflow: &str, body: Value) -> u64 {
    let run = vigil
        .client
        .call_with("POST", &format!("/api/v1/workflows/{workflow}/run"), &body.to_string())
        .expect("the run starts");
    run["id"].as_u64().expect("an id")
}

fn ctl(api: u16, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["ctl", "--api", &format!("127.0.0.1:{api}")])
        .args(args)
        .output()
        .expect("vigil ctl runs");
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn a_run_moves_an_instance_off_a_cpu_waits_for_a_person_and_gives_the_cpu_back() {
    assert!(online_cpus() != "0", "this test needs at least two online CPUs, the host has {}", online_cpus());
    let scratch = Scratch::new("workflows-cpu");
    let base = free_ports(2);
    let (api, app) = (base, base + 1);
    let parent = CgroupParent::new("workflows-cpu");
    let marker = scratch.path("marker");
    let wf = scratch.write(
        "wf.yaml",
        &format!(
            "workflows:\n  - name: move-off-cpu\n    trigger: {{ manual: true }}\n    steps:\n      - {{ name: cordon, cordon: {{}} }}\n      - {{ name: drain, drain: {{ timeout: 5s }}, after: [cordon] }}\n      - {{ name: move, evacuate: {{}}, after: [drain] }}\n      - {{ name: fix, run: {{ command: [sh, -c, \"echo fixed cpu {{cpu}} in run {{run_id}} > {marker}\"], timeout: 10s }}, after: [move] }}\n      - {{ name: ok, approve: {{}}, after: [fix] }}\n      - {{ name: back, uncordon: {{}}, after: [ok] }}\n",
            marker = marker.display()
        ),
    );
    let config = config(&scratch, &parent, api, app, &wf);
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    let pid = vigil.active_pids("echo-0", Duration::from_secs(60))[0];
    assert_eq!(cpus_allowed(pid), online_cpus(), "an active instance may use every CPU");

    let id = start(&vigil, "move-off-cpu", json!({"cpu": "1", "reason": "test"}));
    let run = wait_run(&mut vigil, id, "waiting");
    for name in ["cordon", "drain", "move", "fix"] {
        assert_eq!(step(&run, name)["state"], "succeeded", "{name}: {run:#}");
    }
    assert_eq!(step(&run, "ok")["state"], "waiting");
    assert_eq!(step(&run, "move")["output"]["moved"][0]["instance_id"], "echo-0", "{run:#}");
    // The kernel's own view: the instance's process may no longer run on CPU 1.
    assert!(!cpus_allowed(pid).split(',').any(|p| p == "1" || p.ends_with("-1")), "{}", cpus_allowed(pid));
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), format!("fixed cpu 1 in run {id}"));
    let listed = vigil.get("/api/v1/workflows").unwrap();
    assert_eq!(listed["cordons"]["cpu1"]["run_id"], id, "{listed:#}");
    let (ok, table) = ctl(api, &["workflows", "list"]);
    assert!(ok && table.contains("move-off-cpu") && table.contains("cpu1"), "{table}");

    let (ok, out) = ctl(api, &["workflows", "approve", &id.to_string()]);
    assert!(ok, "{out}");
    let run = wait_run(&mut vigil, id, "succeeded");
    assert_eq!(step(&run, "back")["state"], "succeeded");
    assert_eq!(vigil.get("/api/v1/workflows").unwrap()["cordons"], json!({}));
    // Every step is a decision of rule workflow:NAME, with the run and the step.
    for kind in ["cordon", "drain", "evacuate", "run", "approve", "uncordon"] {
        let d = vigil.decision(|d| d["rule"] == "workflow:move-off-cpu" && d["action"] == kind);
        let d = d.unwrap_or_else(|| panic!("no audited {kind} step"));
        assert_eq!(d["inputs"]["run_id"], id, "{d}");
    }
    // The CPU is not cordoned any more: a restart gets every CPU again.
    vigil.client.call("POST", "/api/v1/instances/echo-0/restart?wait=60s").expect("restart");
    let pid = vigil.active_pids("echo-0", Duration::from_secs(60))[0];
    assert_eq!(cpus_allowed(pid), online_cpus());
}

#[test]
fn a_killed_vigil_resumes_its_runs_and_repeats_a_step_only_if_it_may() {
    let scratch = Scratch::new("workflows-kill");
    let base = free_ports(2);
    let (api, app) = (base, base + 1);
    let parent = CgroupParent::new("workflows-kill");
    let (once, twice) = (scratch.path("once"), scratch.path("twice"));
    // Each command counts its starts in a file, and takes long the first time only.
    let counting = |file: &Path| {
        format!(
            "[sh, -c, \"echo x >> {f}; if [ $(wc -l < {f}) -gt 1 ]; then exit 0; fi; sleep 60\"]",
            f = file.display()
        )
    };
    let wf = scratch.write(
        "wf.yaml",
        &format!(
            "workflows:\n  - name: fragile\n    trigger: {{ manual: true }}\n    steps:\n      - {{ name: fix, run: {{ command: {a}, timeout: 2m, idempotent: false }} }}\n  - name: sturdy\n    trigger: {{ manual: true }}\n    steps:\n      - {{ name: fix, run: {{ command: {b}, timeout: 2m, idempotent: true }} }}\n",
            a = counting(&once),
            b = counting(&twice)
        ),
    );
    let config = config(&scratch, &parent, api, app, &wf);
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    let fragile = start(&vigil, "fragile", json!({}));
    let sturdy = start(&vigil, "sturdy", json!({}));
    wait_for("both commands started", Duration::from_secs(30), || {
        let n = |f: &Path| std::fs::read_to_string(f).map(|t| t.lines().count()).unwrap_or(0);
        (n(&once) == 1 && n(&twice) == 1).then_some(())
    });
    vigil.proc.kill();

    let mut vigil = Vigil::up(&scratch.0, "vigil-again", &config, ([127, 0, 0, 1], api).into(), None);
    // The idempotent step ran again by itself and the run ended.
    let run = wait_run(&mut vigil, sturdy, "succeeded");
    assert_eq!(std::fs::read_to_string(&twice).unwrap().lines().count(), 2, "{run:#}");
    // The other waits for a person, saying why, and has not run the command again.
    let run = wait_run(&mut vigil, fragile, "waiting");
    let fix = step(&run, "fix");
    assert_eq!(fix["state"], "interrupted", "{run:#}");
    let why = run["message"].as_str().unwrap_or_default();
    assert!(why.contains("\"fix\" ran; it is not idempotent"), "{why}");
    assert_eq!(std::fs::read_to_string(&once).unwrap().lines().count(), 1);
    vigil.client.call("POST", &format!("/api/v1/workflows/runs/{fragile}/approve")).expect("approve");
    wait_run(&mut vigil, fragile, "succeeded");
    assert_eq!(std::fs::read_to_string(&once).unwrap().lines().count(), 2);
}

#[test]
fn cpu_offline_and_online_switch_a_real_cpu_and_a_dry_run_switches_nothing() {
    assert!(online_cpus() != "0", "this test needs at least two online CPUs, the host has {}", online_cpus());
    let _back = CpuBack;
    let scratch = Scratch::new("workflows-hotplug");
    let base = free_ports(2);
    let (api, app) = (base, base + 1);
    let parent = CgroupParent::new("workflows-hotplug");
    let wf = scratch.write(
        "wf.yaml",
        "workflows:\n  - name: cpu-off\n    trigger: { manual: true }\n    steps:\n      - { name: off, cpu_offline: {} }\n      - { name: ok, approve: { message: \"CPU {cpu} is offline\" }, after: [off] }\n      - { name: on, cpu_online: {}, after: [ok] }\n",
    );
    let config = config(&scratch, &parent, api, app, &wf);
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    let before = online_cpus();

    let plan = start(&vigil, "cpu-off", json!({"cpu": 1, "dry_run": true}));
    let run = wait_run(&mut vigil, plan, "succeeded");
    assert_eq!(step(&run, "off")["output"]["would"], "cpu_offline", "{run:#}");
    assert_eq!(online_cpus(), before, "a dry run changes nothing");

    let id = start(&vigil, "cpu-off", json!({"cpu": 1}));
    let run = wait_run(&mut vigil, id, "waiting");
    assert_eq!(step(&run, "off")["output"]["online"], false, "{run:#}");
    assert_eq!(std::fs::read_to_string("/sys/devices/system/cpu/cpu1/online").unwrap().trim(), "0");
    let pid = vigil.active_pids("echo-0", Duration::from_secs(60))[0];
    assert_eq!(cpus_allowed(pid), "0", "the kernel took CPU 1 from the instance");
    vigil.client.call("POST", &format!("/api/v1/workflows/runs/{id}/approve")).expect("approve");
    let run = wait_run(&mut vigil, id, "succeeded");
    assert_eq!(online_cpus(), before);
    // Back online, the instance has every CPU again (on hybrid hosts its v1 cpusets had lost it for good).
    assert_eq!(step(&run, "on")["output"]["widened"], json!(["echo-0"]), "{run:#}");
    assert_eq!(cpus_allowed(pid), before);
    vigil.client.call("POST", "/api/v1/instances/echo-0/restart?wait=60s").expect("restart");
    let pid = vigil.active_pids("echo-0", Duration::from_secs(60))[0];
    assert_eq!(cpus_allowed(pid), before, "and so does a new start");
}

#[test]
fn a_rule_starts_a_workflow_for_its_instance() {
    let scratch = Scratch::new("workflows-rule");
    let base = free_ports(2);
    let (api, app) = (base, base + 1);
    let parent = CgroupParent::new("workflows-rule");
    let marker = scratch.path("marker");
    let wf = scratch.write(
        "wf.yaml",
        &format!(
            "workflows:\n  - name: note\n    trigger: {{ manual: true }}\n    steps:\n      - {{ name: write, run: {{ command: [sh, -c, \"echo {{service}} {{instance_id}} >> {m}\"], timeout: 10s }} }}\n",
            m = marker.display()
        ),
    );
    let rules = scratch.write(
        "rules.yaml",
        "rules:\n  - name: note-active\n    when:\n      - state: [active]\n    action: workflow\n    workflow: note\n    cooldown: 1h\n",
    );
    let config = config_with_rules(&scratch, &parent, api, app, &wf, &format!("[{}]", rules.display()));
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    vigil.active_pids("echo-0", Duration::from_secs(60));
    let decision = wait_for("the rule's decision", Duration::from_secs(30), || {
        vigil.proc.assert_running();
        vigil.decision(|d| d["rule"] == "note-active" && d["action"] == "workflow")
    });
    assert_eq!(decision["outcome"], "succeeded", "{decision}");
    let id = decision["inputs"]["run_id"].as_u64().expect("the run's id in the decision");
    let run = wait_run(&mut vigil, id, "succeeded");
    assert_eq!(
        (run["source"].as_str(), run["params"]["instance_id"].as_str()),
        (Some("rule"), Some("echo-0"))
    );
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "echo echo-0\n",
        "one run: the rule's cooldown holds"
    );
}

#[test]
fn a_person_lifts_the_cordon_a_failed_run_left_and_the_cpu_is_used_again() {
    let scratch = Scratch::new("workflows-uncordon");
    let base = free_ports(2);
    let (api, app) = (base, base + 1);
    let parent = CgroupParent::new("workflows-uncordon");
    let wf = scratch.write(
        "wf.yaml",
        "workflows:\n  - name: broken\n    trigger: { manual: true }\n    steps:\n      - { name: cordon, cordon: {} }\n      - { name: fix, run: { command: [\"false\"] }, after: [cordon] }\n      - { name: back, uncordon: {}, after: [fix] }\n",
    );
    assert!(online_cpus() != "0", "this test needs at least two online CPUs, the host has {}", online_cpus());
    let config = config(&scratch, &parent, api, app, &wf);
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    vigil.active_pids("echo-0", Duration::from_secs(60));
    let id = start(&vigil, "broken", json!({"cpu": 1}));
    wait_run(&mut vigil, id, "failed");
    let cordons = vigil.get("/api/v1/workflows").unwrap()["cordons"].clone();
    assert_eq!(cordons["cpu1"]["run_id"], id, "a failed run keeps its cordon: {cordons}");
    // A restart now avoids CPU 1.
    vigil.client.call("POST", "/api/v1/instances/echo-0/restart?wait=60s").expect("restart");
    let pid = vigil.active_pids("echo-0", Duration::from_secs(60))[0];
    assert!(!cpus_allowed(pid).split(',').any(|p| p == "1" || p.ends_with("-1")), "{}", cpus_allowed(pid));

    let (ok, out) = ctl(api, &["workflows", "uncordon", "cpu1", "--reason", "replaced the fan"]);
    assert!(ok, "{out}");
    assert!(out.starts_with(&format!("cpu1 uncordoned (cordoned by run {id} ")), "{out}");
    assert_eq!(vigil.get("/api/v1/workflows").unwrap()["cordons"], json!({}));
    let d = vigil.decision(|d| d["action"] == "uncordon" && d["instance_id"] == "cpu1").expect("audited");
    assert_eq!((&d["rule"], &d["inputs"]["reason"]), (&json!("workflow:broken"), &json!("replaced the fan")));
    let (ok, out) = ctl(api, &["workflows", "uncordon", "cpu1"]);
    assert!(!ok && out.contains("\"cpu1\" is not cordoned"), "{out}");
    vigil.client.call("POST", "/api/v1/instances/echo-0/restart?wait=60s").expect("restart");
    let pid = vigil.active_pids("echo-0", Duration::from_secs(60))[0];
    assert_eq!(cpus_allowed(pid), online_cpus(), "every CPU again");
}

#[test]
fn edited_workflow_files_are_reloaded_and_a_bad_edit_keeps_the_workflows_in_force() {
    let scratch = Scratch::new("workflows-reload");
    let base = free_ports(2);
    let (api, app) = (base, base + 1);
    let parent = CgroupParent::new("workflows-reload");
    let one = "workflows:\n  - name: first\n    trigger: { manual: true }\n    steps:\n      - { name: ok, approve: {} }\n";
    let wf = scratch.write("wf.yaml", one);
    let rules = scratch.write(
        "rules.yaml",
        "rules:\n  - name: kick\n    when:\n      - state: [failed]\n    action: workflow\n    workflow: first\n",
    );
    let config = config_with_rules(&scratch, &parent, api, app, &wf, &format!("[{}]", rules.display()));
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    let names = |v: &Vigil| -> Vec<String> {
        let w = v.get("/api/v1/workflows").expect("workflows");
        w["workflows"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(names(&vigil), ["first"]);
    let waiting = start(&vigil, "first", json!({}));
    wait_run(&mut vigil, waiting, "waiting");

    // A second workflow added: in force within a few ticks, and it runs.
    std::fs::write(&wf, format!("{one}  - name: second\n    trigger: {{ manual: true }}\n    steps:\n      - {{ name: fix, run: {{ command: [\"true\"] }} }}\n")).unwrap();
    wait_for("the reload", Duration::from_secs(60), || {
        vigil.proc.assert_running();
        (names(&vigil) == ["first", "second"]).then_some(())
    });
    let id = start(&vigil, "second", json!({}));
    wait_run(&mut vigil, id, "succeeded");

    // A mistake, then an edit that drops the workflow a rule starts: both refused, said in the log.
    std::fs::write(&wf, "workflows:\n  - name: first\n    steps: [\n").unwrap();
    wait_for("the refusal in the log", Duration::from_secs(60), || {
        vigil.proc.log_text().contains("workflow files changed but have mistakes").then_some(())
    });
    std::fs::write(&wf, "workflows:\n  - name: second\n    trigger: { manual: true }\n    steps:\n      - { name: ok, approve: {} }\n").unwrap();
    wait_for("the refusal of the edit", Duration::from_secs(60), || {
        let log = vigil.proc.log_text();
        log.contains("rule `kick` starts workflow `first`, which no workflow file declares").then_some(())
    });
    assert_eq!(names(&vigil), ["first", "second"], "the workflows in force stay");
    // The run that waited all along still ends as its workflow says.
    vigil.client.call("POST", &format!("/api/v1/workflows/runs/{waiting}/approve")).expect("approve");
    wait_run(&mut vigil, waiting, "succeeded");
}
