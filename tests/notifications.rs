//! Notifications out, end to end through `vigil up`: a `notify` rule and a receiver's matcher send to a
//! webhook (verified with PyPI `standardwebhooks` by tests/../healer/tests/notify_receiver.py) and to a
//! real Alertmanager. The webhook receiver is down while Vigil decides and while Vigil restarts; when it
//! comes up it gets every notification, in order, each once: the hibernation (an event its `match`
//! takes), the notify rule's alert firing, and its resolution (sent after the restart, when the rule sees
//! the instance active again). Alertmanager shows the alert firing with the rule's labels, then resolved.
//! Needs root (cgroups) and the packages scripts/setup installs.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{CgroupParent, Scratch, Vigil, alertmanager, free_ports, received, wait_for, webhook_receiver};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn am_alerts(port: u16, name: &str) -> Option<Vec<Value>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET /api/v2/alerts?active=true HTTP/1.0\r\nHost: am\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body = text.split_once("\r\n\r\n")?.1;
    let all: Vec<Value> = serde_json::from_str(body).ok()?;
    Some(all.into_iter().filter(|a| a["labels"]["alertname"] == name).collect())
}

#[test]
fn notifications_survive_a_down_receiver_and_a_restart_and_reach_alertmanager() {
    let scratch = Scratch::new("notifications");
    let base = free_ports(5);
    let (api, app, hook, am, grpc) = (base, base + 1, base + 2, base + 3, base + 4);
    let parent = CgroupParent::new("notifications");
    let rules = scratch.write(
        "rules.yaml",
        "rules:\n  - name: tell-hibernated\n    when:\n      - state: [hibernated]\n    action: notify\n    notify: [ops, am]\n    labels: { severity: page }\n",
    );
    let config = scratch.write(
        "vigil.yaml",
        &format!(
            "data_dir: {data}\nhttp: {{ listen: \"127.0.0.1:{api}\" }}\ngrpc: {{ listen: \"127.0.0.1:{grpc}\" }}\nrules: [{rules}]\nhealer: {{ cgroup_parent: {parent}, stop_grace: 2s }}\ncollector: {{ watch: {{ managed_root: {parent} }} }}\nbroker: {{ enabled: false }}\nservices:\n  - name: echo\n    command: [python3, -m, http.server, --bind, 127.0.0.1, \"{{port}}\"]\n    port: {app}\n    readiness: {{ tcp: true }}\nnotify:\n  retry: {{ initial: 200ms, max: 1s }}\n  receivers:\n    - name: ops\n      webhook: {{ url: \"http://127.0.0.1:{hook}/hook\", secret: {SECRET} }}\n      match: {{ action: [hibernate, wake, restart], outcome: [succeeded, failed] }}\n    - name: am\n      alertmanager: {{ url: \"http://127.0.0.1:{am}\" }}\n",
            data = scratch.path("data").display(),
            rules = rules.display(),
        ),
    );
    let _am = alertmanager(&scratch, am, "route: { receiver: \"null\" }\nreceivers:\n  - name: \"null\"\n");

    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), None);
    vigil.active_pids("echo-0", Duration::from_secs(60));
    vigil.client.call("POST", "/api/v1/instances/echo-0/hibernate?wait=60s").expect("hibernate");
    // The notify rule fires on the next tick; Alertmanager (up) shows it with the rule's labels.
    let firing = wait_for("the alert in Alertmanager", Duration::from_secs(30), || {
        vigil.proc.assert_running();
        am_alerts(am, "tell-hibernated").filter(|l| !l.is_empty())
    });
    let labels = &firing[0]["labels"];
    assert_eq!(
        (labels["instance_id"].as_str(), labels["service"].as_str(), labels["severity"].as_str()),
        (Some("echo-0"), Some("echo"), Some("page")),
        "{labels}"
    );
    let queued = |v: &Vigil| {
        let metrics = v.client.call("GET", "/metrics").ok().and_then(|m| m.as_str().map(str::to_string));
        metrics
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("vigil_notifications_queued{receiver=\"ops\"}"))
            .map(str::to_string)
    };
    wait_for("two notifications queued for the down webhook", Duration::from_secs(30), || {
        (queued(&vigil).as_deref() == Some("vigil_notifications_queued{receiver=\"ops\"} 2")).then_some(())
    });

    // Vigil restarts with the receiver still down: the outbox and the firing alert survive. The new run
    // starts echo-0 afresh (active), so the rule sees its condition end and queues the resolution.
    assert!(vigil.proc.stop(), "vigil exits on SIGTERM:\n{}", vigil.proc.log_text());
    let mut vigil = Vigil::up(&scratch.0, "vigil-again", &config, ([127, 0, 0, 1], api).into(), None);
    vigil.active_pids("echo-0", Duration::from_secs(60));
    wait_for("the resolution queued behind the other two", Duration::from_secs(30), || {
        vigil.proc.assert_running();
        (queued(&vigil).as_deref() == Some("vigil_notifications_queued{receiver=\"ops\"} 3")).then_some(())
    });
    wait_for("Alertmanager to see the resolution", Duration::from_secs(30), || {
        am_alerts(am, "tell-hibernated").filter(|l| l.is_empty())
    });

    // The receiver comes up: everything, in order, verified, once.
    let out = scratch.path("received.jsonl");
    let mut receiver = webhook_receiver(&scratch, hook, SECRET, &out);
    let got = wait_for("three notifications at the receiver", Duration::from_secs(30), || {
        receiver.assert_running();
        let got = received(&out);
        (got.len() >= 3).then_some(got)
    });
    let summary: Vec<(String, String, String)> = got
        .iter()
        .map(|m| {
            let a = &m["body"]["alerts"][0];
            let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
            // A condition's alert carries no `action` (or outcome) label: firing and resolved are one alert.
            let action = a["labels"]["action"].as_str().unwrap_or("-").to_string();
            (s(&m["body"]["status"]), s(&a["labels"]["alertname"]), action)
        })
        .collect();
    let want = |s: &str, n: &str, a: &str| (s.to_string(), n.to_string(), a.to_string());
    assert_eq!(
        summary,
        vec![
            want("firing", "manual", "hibernate"),
            want("firing", "tell-hibernated", "-"),
            want("resolved", "tell-hibernated", "-"),
        ],
        "{got:#?}"
    );
    let ids: std::collections::BTreeSet<&str> = got.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids.len(), 3, "three distinct webhook-ids");
    let (fired, resolved) = (&got[1]["body"]["alerts"][0], &got[2]["body"]["alerts"][0]);
    assert_eq!(fired["fingerprint"], resolved["fingerprint"], "one alert, firing then resolved");
    assert_eq!(fired["startsAt"], resolved["startsAt"]);
    assert_eq!(fired["labels"]["severity"], "page");
    wait_for("the outbox to empty", Duration::from_secs(10), || {
        (queued(&vigil).as_deref() == Some("vigil_notifications_queued{receiver=\"ops\"} 0")).then_some(())
    });
    assert_eq!(received(&out).len(), 3, "nothing more, nothing twice");
    assert!(vigil.proc.stop(), "vigil exits on SIGTERM:\n{}", vigil.proc.log_text());
}
