//! The gRPC API end to end: the real `vigil up`, with a token and two managed services (`echo`, started
//! at once, and `lazy`, started on demand), driven by a client in another language (`grpc_client.py`,
//! PyPI `grpcio` with stubs generated from `proto/` by `grpcio-tools`): every operation, the decisions
//! watched while it acts, health, reflection, and the status codes of bad requests.
//!
//! Needs root (the healer creates cgroups), python3 with grpcio, grpcio-tools and grpcio-reflection
//! (scripts/setup installs them). The binary is stopped with SIGTERM whatever happens, so it stops its
//! instances and removes its cgroups.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{CgroupParent, Scratch, Vigil, free_ports, v2_root, wait_for};

const TOKEN: &str = "grpc-test-token";

#[test]
fn a_python_grpc_client_calls_every_operation_and_watches_the_decisions() {
    let scratch = Scratch::new("grpc");
    let parent = CgroupParent::new("grpc");
    let base = free_ports(6);
    let (http, grpc, broker, trigger, echo, lazy) = (base, base + 1, base + 2, base + 3, base + 4, base + 5);
    let server = r#"["python3", "-m", "http.server", "--bind", "127.0.0.1", "{port}"]"#;
    let workflows = scratch.write(
        "wf.yaml",
        "workflows:\n  - name: probe\n    trigger: { manual: true }\n    steps:\n      - { name: cordon, cordon: {} }\n      - { name: ok, approve: {}, after: [cordon] }\n      - { name: fix, run: { command: [\"false\"] }, after: [ok] }\n",
    );
    let config = format!(
        "data_dir: {data}\nrules: []\nworkflows: [{wf}]\nhardware: {{ enabled: true, kmsg_backlog: false }}\n\
         http: {{ listen: 127.0.0.1:{http}, token: {TOKEN} }}\n\
         grpc: {{ listen: 127.0.0.1:{grpc} }}\n\
         collector:\n  watch: {{ include: [{parent}], managed_root: {parent} }}\n\
         healer: {{ cgroup_parent: {parent}, stop_grace: 2s, max_actions_per_minute: 200 }}\n\
         broker: {{ listen: 127.0.0.1:{broker}, http: {{ listen: 127.0.0.1:{trigger} }} }}\n\
         services:\n\
         \x20 - {{ name: echo, command: {server}, port: {echo}, readiness: {{ http: / }} }}\n\
         \x20 - {{ name: lazy, command: {server}, port: {lazy}, readiness: {{ http: / }}, start: on_demand }}\n",
        data = scratch.path("data").display(),
        wf = workflows.display(),
    );
    let config = scratch.write("vigil.yaml", &config);
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], http).into(), Some(TOKEN));
    wait_for("/readyz", Duration::from_secs(30), || {
        vigil.proc.assert_running();
        vigil.get("/readyz").ok()
    });
    vigil.active_pids("echo-0", Duration::from_secs(30));

    // An incoming alert over REST, for the client's ListAlerts.
    let alert = r#"{"version":"4","groupKey":"{}:{alertname=\"EchoSlow\"}","status":"firing","receiver":"vigil","groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"http://am","alerts":[{"status":"firing","labels":{"alertname":"EchoSlow","instance_id":"echo-0","service":"echo","severity":"critical"},"annotations":{"summary":"echo is slow"},"startsAt":"2026-12-02T05:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prom","fingerprint":"f00d"}]}"#;
    let ingested = vigil.client.call_with("POST", "/api/v1/alerts", alert).expect("POST /api/v1/alerts");
    assert_eq!(ingested["new"], 1, "{ingested}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let client = Command::new("python3")
        .arg(root.join("tests/grpc_client.py"))
        .arg(format!("127.0.0.1:{grpc}"))
        .arg(TOKEN)
        .arg(root.join("proto"))
        .output()
        .expect("run python3 tests/grpc_client.py");
    let out = String::from_utf8_lossy(&client.stdout);
    let err = String::from_utf8_lossy(&client.stderr);
    assert!(
        client.status.success(),
        "the Python gRPC client failed ({}):\n{out}\n{err}\n--- vigil's log ---\n{}",
        client.status,
        vigil.proc.log_text()
    );
    print!("{out}");

    // A clean stop: the watch streams end, both servers drain, the instances stop and their cgroups go.
    let status = vigil.proc.stop_status();
    assert!(
        status.is_some_and(|s| s.success()),
        "vigil did not stop cleanly ({status:?}):\n{}",
        vigil.proc.log_text()
    );
    let instance = v2_root().join(parent.0.trim_start_matches('/')).join("echo/echo-0");
    assert!(!instance.exists(), "{} was left behind", instance.display());
}
