use super::*;

fn issues(text: &str) -> Vec<String> {
    match VigilConfig::parse(text, "v.yaml") {
        Ok(_) => Vec::new(),
        Err(e) => e.issues().iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn embedded_defaults_parse_to_default() {
    let c = VigilConfig::parse(DEFAULT_YAML, "defaults").unwrap();
    assert_eq!(c, VigilConfig::default());
    assert_eq!(c.collector.cgroupfs_every_ticks(), 10);
    assert_eq!(VigilConfig::parse("", "v.yaml").unwrap(), VigilConfig::default());
    assert_eq!(VigilConfig::parse("# nothing\n", "v.yaml").unwrap(), VigilConfig::default());
}

#[test]
fn every_key_is_read() {
    let text = "\
data_dir: /tmp/v
http: { listen: 127.0.0.1:9000, token: t }
grpc: { enabled: false, listen: 127.0.0.1:9001 }
collector:
  interval: 2s
  max_instances: 10
  cgroupfs_interval: 20s
  watch: { include: [/a], exclude: [/a/b], managed_root: /mine, max_tracked: 5 }
dry_run: true
rules: [r.yaml]
workflows: [w.yaml, more/]
services:
  - name: echo
    command: [python3, app.py]
    env: { MODE: demo }
    port: 18080
    instances: 2
    readiness: { http: /healthz }
    pre_hibernate: [./flush.sh]
    post_wake: [./warm.sh]
    route: /echo
    host: echo.local
    version: v2
    serves: front
    ready_timeout: 5s
    start: on_demand
healer:
  max_actions_per_minute: 3
  max_standby_fraction: 0.5
  pool_cpus: \"1\"
  quota: 0.1
  stop_grace: 2s
  cgroup_parent: /mine
broker:
  enabled: false
  listen: 127.0.0.1:7000
  token: b
  http: { enabled: false, listen: 127.0.0.1:7001, request_timeout: 1s, max_body_bytes: 100, workers: 2 }
  queue: { max_per_service: 1, max_bytes_per_service: 2, max_total: 3, timeout: 4s }
  splits: [{ name: default, service: front, weights: { v1: 1, v2: 3 }, sticky: true }]
  health: { eject_after_failures: 1, eject_base_ms: 2, max_ejected_fraction: 0.25, breaker_window_ms: 3,
            breaker_min_requests: 4, breaker_failure_ratio: 0.75, breaker_open_for_ms: 5 }
  managed_capacity: 7
  upstreams: [{ service: ext, version: v3, address: 127.0.0.1:9001, capacity: 8, route: /ext, host: ext.local }]
  max_frame_bytes: 1000
  max_reassembly_per_stream: 10
  max_reassembly_per_connection: 20
  max_pending_write_bytes: 30
  setup_timeout: 6s
";
    let c = VigilConfig::parse(text, "v.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.data_dir, PathBuf::from("/tmp/v"));
    assert_eq!(c.http.token(), Some("t"));
    assert_eq!(c.grpc, GrpcConfig { enabled: false, listen: "127.0.0.1:9001".parse().unwrap() });
    assert_eq!(c.collector.interval(), Duration::from_secs(2));
    assert_eq!(c.collector.watch.max_tracked, 5);
    assert!(c.dry_run);
    assert_eq!(c.rules, [PathBuf::from("r.yaml")]);
    assert_eq!(c.workflows, [PathBuf::from("w.yaml"), PathBuf::from("more/")]);
    let s = &c.services[0];
    assert_eq!(s.ready_timeout.map(|d| d.0), Some(Duration::from_secs(5)));
    assert_eq!(s.start, crate::service::StartPolicy::OnDemand);
    assert_eq!(s.routed_name(), "front");
    assert_eq!(c.healer.pool_cpus.as_ref().map(|l| l.as_str()), Some("1"));
    assert_eq!(c.healer.quota.cores(), 0.1);
    assert_eq!(c.healer.max_standby_fraction.get(), 0.5);
    assert_eq!(c.broker.http.workers, Some(2));
    assert_eq!(c.broker.health.breaker_failure_ratio.get(), 0.75);
    assert_eq!(c.broker.upstreams[0].address.port(), 9001);
    assert_eq!(c.broker.setup_timeout.0, Duration::from_secs(6));
}

#[test]
fn collector_mistakes_are_located() {
    let text = "http:\n  listen: 0.0.0.0:9750\ncollector:\n  interval: 10ms\n  max_instances: 0\n";
    assert_eq!(
        issues(text),
        vec![
            "v.yaml:2:11: http.listen: 0.0.0.0:9750 is not a loopback address: set http.token (a bearer token) \
             to expose the API",
            "v.yaml:4:13: collector.interval: 10ms is outside 100ms..1h",
            "v.yaml:5:18: collector.max_instances: must be at least 1",
        ]
    );
}

#[test]
fn unknown_keys_are_located_everywhere() {
    assert_eq!(
        issues("collector:\n  intervl: 1s\nservics: []\nbroker: { lisen: 1 }\n"),
        vec![
            "v.yaml:2:3: collector.intervl: unknown field `intervl`, expected one of `interval`, `max_instances`, \
             `cgroupfs_interval`, `watch`",
            "v.yaml:3:1: servics: unknown field `servics`, expected one of `data_dir`, `http`, `grpc`, \
             `collector`, `dry_run`, `rules`, `workflows`, `services`, `healer`, `broker`, `notify`, `alerts`, \
             `hardware`",
            "v.yaml:4:11: broker.lisen: unknown field `lisen`, expected one of `enabled`, `listen`, `token`, \
             `http`, `queue`, `splits`, `health`, `managed_capacity`, `upstreams`, `max_frame_bytes`, \
             `max_reassembly_per_stream`, `max_reassembly_per_connection`, `max_pending_write_bytes`, \
             `setup_timeout`",
        ]
    );
}

#[test]
fn bad_values_name_themselves() {
    assert_eq!(
        issues("collector:\n  interval: soon\nhttp: { listen: localhost }\n"),
        vec![
            "v.yaml:2:13: collector.interval: `soon` is not a duration like 500ms, 1s, 5m, 2h",
            "v.yaml:3:17: http.listen: `localhost` is not a socket address like 127.0.0.1:9750",
        ]
    );
}

#[test]
fn healer_mistakes_are_located() {
    let text = "\
services:
  - { name: a, command: [x], port: 0 }
  - { name: a, command: [x], port: 1 }
healer: { quota: 0, max_standby_fraction: 0, max_actions_per_minute: 0, pool_cpus: 3-1 }
";
    assert_eq!(
        issues(text),
        vec![
            "v.yaml:2:36: services[0].port: port must be above 0",
            "v.yaml:3:13: services[1].name: service `a` is declared twice (first as services[0])",
            "v.yaml:4:18: healer.quota: 0 is not a CPU quota in (0, 64] cores",
            "v.yaml:4:43: healer.max_standby_fraction: 0 allows no standby at all: it must be above 0",
            "v.yaml:4:70: healer.max_actions_per_minute: must be at least 1",
            "v.yaml:4:84: healer.pool_cpus: \"3-1\" is not a CPU list: range ends before it starts",
        ]
    );
}

#[test]
fn broker_mistakes_are_located() {
    let text = "\
broker:
  listen: 0.0.0.0:7878
  queue: { max_total: 0 }
  max_frame_bytes: 10
  splits:
    - { name: d, service: s, weights: { v1: 0 } }
services:
  - { name: a, command: [x], port: 1, route: nope }
";
    assert_eq!(
        issues(text),
        vec![
            "v.yaml:2:11: broker.listen: 0.0.0.0:7878 is not a loopback address: set broker.token to expose the \
             broker",
            "v.yaml:3:23: broker.queue.max_total: must be at least 1",
            "v.yaml:4:20: broker.max_frame_bytes: 10 is not in 64..=16777215",
            "v.yaml:6:30: broker.splits[0].weights: split `d` of `s` has no version with a positive weight",
            "v.yaml:8:46: services[0].route: \"nope\" must start with '/'",
        ]
    );
}

#[test]
fn a_route_leads_to_one_service() {
    let text = "\
services:
  - { name: a, command: [x], port: 10, route: /echo }
  - { name: a2, serves: a, version: v2, command: [x], port: 20, route: /echo }
  - { name: b, command: [x], port: 30, route: /echo }
  - { name: c, command: [x], port: 40, route: /echo, host: c.local }
broker:
  upstreams: [{ service: ext, address: 127.0.0.1:9000, route: /echo }]
";
    assert_eq!(
        issues(text),
        vec![
            "v.yaml:4:47: services[2].route: route \"/echo\" already leads to `a` (services[0]), not to `b`",
            "v.yaml:7:63: broker.upstreams[0].route: route \"/echo\" already leads to `a` (services[0]), not to \
             `ext`",
        ]
    );
}

#[test]
fn the_cgroup_parent_is_the_managed_root() {
    assert_eq!(
        issues("healer: { cgroup_parent: /other }\n"),
        vec![
            "v.yaml:1:26: healer.cgroup_parent: \"/other\" differs from collector.watch.managed_root \"/vigil\": \
             instances must be created where the collector looks for them"
        ]
    );
    assert_eq!(
        issues("collector: { watch: { managed_root: /other } }\n"),
        vec![
            "v.yaml:1:37: collector.watch.managed_root: \"/other\" differs from healer.cgroup_parent \"/vigil\": instances must be created where the collector looks for them"
        ]
    );
    assert_eq!(
        issues("collector: { watch: { managed_root: /o/ } }\nhealer: { cgroup_parent: /o }\n"),
        Vec::<String>::new()
    );
}

#[test]
fn ports_are_bound_once() {
    let text = "\
http: { listen: 127.0.0.1:7878 }
services:
  - { name: a, command: [x], port: 100, instances: 3 }
  - { name: b, command: [x], port: 102 }
";
    assert_eq!(
        issues(text),
        vec![
            "v.yaml:1:17: http.listen: 127.0.0.1:7878 is bound twice: http.listen and broker.listen",
            "v.yaml:4:36: services[1].port: ports 102..=102 overlap those of `a` (services[0]: 100..=102)",
        ]
    );
}

#[test]
fn only_a_command_that_runs_services_needs_their_command_and_port() {
    let text = "services:\n  - { name: late, route: /late }\n";
    let broker_alone = VigilConfig::parse_for(text, "v.yaml", Runs::WithoutServices).unwrap();
    assert_eq!(broker_alone.services[0].route.as_deref(), Some("/late"));
    assert_eq!(
        issues(text),
        vec![
            "v.yaml:2:5: services[0].command: command must name a program",
            "v.yaml:2:5: services[0].port: port must be above 0",
        ]
    );
    // Everything else is checked for every command.
    let err = VigilConfig::parse_for("services:\n  - { name: a b }\n", "v.yaml", Runs::WithoutServices)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "v.yaml:2:13: services[0].name: \"a b\": a name must be non-empty, without '/' or whitespace"
    );
}

#[test]
fn a_scale_block_is_read_and_its_mistakes_are_reported_at_their_keys() {
    let ok = "services:\n  - name: api\n    command: [app]\n    port: 18080\n    scale: { min: 1, max: 4, stable_window: 10s }\n";
    let c = VigilConfig::parse(ok, "v.yaml").unwrap();
    let scale = c.services[0].scale.as_ref().unwrap();
    assert_eq!((scale.min, scale.max, scale.stable_window), (1, 4, Duration::from_secs(10)));
    assert_eq!(c.services[0].slots(), 4);
    let bad = "\
collector: { interval: 2s }
services:
  - name: api
    command: [app]
    port: 65534
    instances: 2
    start: on_demand
    scale:
      min: 5
      max: 4
      max_scale_up_rate: 0.5
      panic_window: 1s
      stable_window: 1m
";
    assert_eq!(
        issues(bad),
        [
            "v.yaml:6:16: services[0].instances: a service with `scale:` has no fixed count: use scale.min and scale.max",
            "v.yaml:7:12: services[0].start: a service with `scale:` starts as the autoscaler decides: use scale.min: 0 to start at zero",
            "v.yaml:9:12: services[0].scale.min: min (5) is greater than max (4)",
            "v.yaml:10:12: services[0].scale.max: ports 65534..=65537 do not fit below 65536",
            "v.yaml:11:26: services[0].scale.max_scale_up_rate: must be a finite number greater than 1, got 0.5",
            "v.yaml:12:21: services[0].scale.panic_window: 1s is shorter than the decision tick (2s): it would hold no sample",
        ]
    );
}

#[test]
fn grpc_needs_the_token_off_loopback_and_a_port_of_its_own() {
    assert_eq!(
        issues("grpc:\n  listen: 0.0.0.0:9751\n"),
        vec![
            "v.yaml:2:11: grpc.listen: 0.0.0.0:9751 is not a loopback address: set http.token (a bearer token, \
             the gRPC API's too) to expose the API",
        ]
    );
    // The REST token covers it; a disabled listener needs none and binds nothing.
    assert!(issues("http: { token: t }\ngrpc: { listen: 0.0.0.0:9751 }\n").is_empty());
    assert!(issues("grpc: { enabled: false, listen: 0.0.0.0:9750 }\n").is_empty());
    assert_eq!(
        issues("grpc: { listen: 127.0.0.1:9750 }\n"),
        vec!["v.yaml:1:17: grpc.listen: 127.0.0.1:9750 is bound twice: http.listen and grpc.listen"]
    );
    assert_eq!(
        issues("grpc:\n  listen: 127.0.0.1:7878\n"),
        vec!["v.yaml:2:11: grpc.listen: 127.0.0.1:7878 is bound twice: grpc.listen and broker.listen"]
    );
    assert!(
        issues("grpc: { listen: 127.0.0.1:0 }\nhttp: { listen: 127.0.0.1:0 }\n").is_empty(),
        "port 0 is any port"
    );
}

#[test]
fn notify_is_read() {
    let text = "\
http: { listen: 127.0.0.1:9000 }
notify:
  retry: { initial: 1s, max: 30s }
  give_up_after: 1h
  timeout: 2s
  receivers:
    - name: ops
      webhook:
        url: \"http://127.0.0.1:9099/hook\"
        secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
        headers: { X-Team: ops }
      match: { rule: [tell-*], action: [restart, hibernate, notify], outcome: [succeeded, failed], service: [echo] }
    - name: rotating
      webhook:
        url: http://127.0.0.1:9099/
        secret: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=]
    - name: am
      alertmanager: { url: \"http://127.0.0.1:9093\" }
    - name: tls
      webhook: { url: \"https://hooks.example/in\", secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, ca_file: ca.pem }
";
    let c = VigilConfig::parse(text, "v.yaml").unwrap_or_else(|e| panic!("{e}"));
    let n = &c.notify;
    assert_eq!(n.retry.initial.0, Duration::from_secs(1));
    assert_eq!(n.retry.max.0, Duration::from_secs(30));
    assert_eq!(n.give_up_after.0, Duration::from_secs(3600));
    assert_eq!(n.timeout.0, Duration::from_secs(2));
    assert_eq!(n.external_url_or(c.http.listen), "http://127.0.0.1:9000");
    let Some(ReceiverKind::Webhook(ops)) = n.receivers[0].kind() else { panic!("ops is a webhook") };
    assert_eq!((ops.url.host(), ops.url.port(), ops.url.path()), ("127.0.0.1", 9099, "/hook"));
    assert_eq!(ops.secret.len(), 1);
    assert_eq!(ops.headers.get("X-Team").map(String::as_str), Some("ops"));
    let m = n.receivers[0].matcher.as_ref().unwrap();
    assert!(m.matches("tell-ops", "restart", "failed", "echo"));
    assert!(!m.matches("tell-ops", "restart", "refused", "echo"));
    let Some(ReceiverKind::Webhook(rotating)) = n.receivers[1].kind() else { panic!("a webhook") };
    assert_eq!(rotating.secret.iter().map(|s| s.key().len()).collect::<Vec<_>>(), [24, 32]);
    let Some(ReceiverKind::Alertmanager(am)) = n.receivers[2].kind() else { panic!("am is an alertmanager") };
    assert_eq!(am.url.join("/api/v2/alerts").to_string(), "http://127.0.0.1:9093/api/v2/alerts");
    let Some(ReceiverKind::Webhook(tls)) = n.receivers[3].kind() else { panic!("tls is a webhook") };
    assert_eq!((tls.url.scheme(), tls.url.port()), ("https", 443));
    assert_eq!(tls.ca_file.as_deref(), Some(std::path::Path::new("ca.pem")));
    let with_url =
        VigilConfig::parse("notify: { external_url: \"https://v.example/\" }\n", "v.yaml").unwrap();
    assert_eq!(with_url.notify.external_url_or(with_url.http.listen), "https://v.example");
}

#[test]
fn notify_values_are_refused_where_written() {
    let text = "\
notify:
  retry: { initial: soon }
  receivers:
    - name: a
      webhook: { url: \"ftp://x/hook\", secret: whsec_c2hvcnQ= }
    - name: b
      webhook: { url: \"ftp://x/\", secret: [sekrit] }
      match: { action: [reboot], outcome: [ok], rule: [\"tell-[\"] }
    - name: c
      webhook: { url: \"http://x/\", secret: [] }
";
    assert_eq!(
        issues(text),
        vec![
            "v.yaml:2:21: notify.retry.initial: `soon` is not a duration like 500ms, 1s, 5m, 2h",
            "v.yaml:5:23: notify.receivers[0].webhook.url: `ftp://x/hook` is not an http URL like \
             http://127.0.0.1:9093/path: it must start with http:// or https://",
            "v.yaml:5:47: notify.receivers[0].webhook.secret: the secret decodes to 5 bytes; a webhook secret is \
             24..=64 random bytes",
            "v.yaml:7:23: notify.receivers[1].webhook.url: `ftp://x/` is not an http URL like \
             http://127.0.0.1:9093/path: it must start with http:// or https://",
            "v.yaml:7:43: notify.receivers[1].webhook.secret: a webhook secret is `whsec_` followed by base64 \
             (Standard Webhooks); this one does not start with `whsec_`",
            "v.yaml:8:25: notify.receivers[1].match.action[0]: `reboot` is not an action: one of hibernate, \
             wake, restart, notify, stop, start, workflow",
            "v.yaml:8:44: notify.receivers[1].match.outcome[0]: `ok` is not an outcome: one of succeeded, \
             failed, refused, dry_run",
            "v.yaml:8:56: notify.receivers[1].match.rule[0]: unclosed `[` in glob `tell-[`",
            "v.yaml:10:44: notify.receivers[2].webhook.secret: an empty list of secrets signs nothing: give at \
             least one",
        ]
    );
}

#[test]
fn notify_mistakes_are_located() {
    let text = "\
notify:
  retry: { initial: 0s, max: 0s }
  timeout: 0s
  give_up_after: 0s
  external_url: vigil.local
  receivers:
    - name: ops
      webhook: { url: http://x/, secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, headers: { Webhook-Id: x, \"a b\": y } }
    - name: ops
      alertmanager: { url: http://x/, ca_file: /etc/ca.pem }
      match: { action: [] }
    - name: \"\"
    - name: both
      webhook: { url: http://x/, secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw }
      alertmanager: { url: http://x/ }
";
    assert_eq!(
        issues(text),
        vec![
            "v.yaml:2:21: notify.retry.initial: must be above 0",
            "v.yaml:3:12: notify.timeout: must be above 0",
            "v.yaml:4:18: notify.give_up_after: must be above 0",
            "v.yaml:5:17: notify.external_url: \"vigil.local\" is not a URL like http://vigil.example:9750",
            "v.yaml:8:105: notify.receivers[0].webhook.headers.Webhook-Id: `Webhook-Id` is set by Vigil itself \
             and cannot be configured",
            "v.yaml:8:115: notify.receivers[0].webhook.headers.a b: \"a b\" is not an HTTP header name",
            "v.yaml:9:13: notify.receivers[1].name: receiver `ops` is declared twice (first as \
             notify.receivers[0])",
            "v.yaml:10:48: notify.receivers[1].alertmanager.ca_file: a CA file is for https:// URLs; `http://x/` \
             is plain http",
            "v.yaml:11:16: notify.receivers[1].match.action: an empty list matches nothing: leave `action` out \
             to match every action",
            "v.yaml:12:7: notify.receivers[2]: a receiver needs one of `webhook:` or `alertmanager:`",
            "v.yaml:12:13: notify.receivers[2].name: \"\": a receiver name must be non-empty, without whitespace",
            "v.yaml:15:7: notify.receivers[3].alertmanager: a receiver is either `webhook:` or `alertmanager:`, \
             not both: declare two receivers",
        ]
    );
    assert_eq!(
        issues("notify: { retry: { initial: 2s, max: 1s } }\n"),
        vec!["v.yaml:1:38: notify.retry.max: 1s is shorter than notify.retry.initial (2s)"]
    );
}

#[test]
fn incoming_alerts_may_require_a_signature() {
    let c =
        VigilConfig::parse("alerts: { secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw }\n", "v.yaml").unwrap();
    assert_eq!(c.alerts.secret.map(|s| s.len()), Some(1));
    assert_eq!(VigilConfig::default().alerts.secret, None);
    assert_eq!(
        issues("alerts:\n  secret: sekrit\n  signed: true\n"),
        vec![
            "v.yaml:2:11: alerts.secret: a webhook secret is `whsec_` followed by base64 (Standard Webhooks); \
             this one does not start with `whsec_`",
            "v.yaml:3:3: alerts.signed: unknown field `signed`, expected `secret`",
        ]
    );
}

#[test]
fn hardware_is_read() {
    let dir = std::env::temp_dir().join(format!("vigil-config-hw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let extra = dir.join("mine.yaml");
    std::fs::write(&extra, "patterns: []\n").unwrap();
    let text = format!(
        "hardware:\n  enabled: true\n  sysfs_root: /tmp/sys\n  kmsg: \"\"\n  poll_interval: 30s\n  quiet: 10m\n  \
         patterns: [{}]\n  max_devices: 10\n",
        extra.display()
    );
    let c = VigilConfig::parse(&text, "v.yaml").unwrap_or_else(|e| panic!("{e}"));
    let h = &c.hardware;
    assert_eq!(h.sysfs_root, PathBuf::from("/tmp/sys"));
    assert_eq!(h.kmsg_path(), None, "an empty kmsg path turns the kernel log off");
    assert_eq!(h.poll_interval(), Duration::from_secs(30));
    assert_eq!(h.quiet(), Duration::from_secs(600));
    assert_eq!(h.patterns, vec![extra]);
    assert_eq!(h.max_devices, 10);
    assert_eq!(VigilConfig::default().hardware.kmsg_path(), Some(Path::new("/dev/kmsg")));
    let off = VigilConfig::parse("hardware: { enabled: false }\n", "v.yaml").unwrap();
    assert_eq!(off.hardware.kmsg_path(), None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hardware_mistakes_are_located() {
    let text = "hardware:\n  poll_interval: 500ms\n  quiet: 2s\n  max_devices: 0\n  \
                patterns: [/nonexistent/vigil/patterns.yaml, /]\n";
    assert_eq!(
        issues(text),
        vec![
            "v.yaml:2:18: hardware.poll_interval: 500ms is outside 1s..1h",
            "v.yaml:4:16: hardware.max_devices: 0 is not in 1..=1000000",
            "v.yaml:5:14: hardware.patterns[0]: cannot read pattern file /nonexistent/vigil/patterns.yaml: No such \
             file or directory (os error 2)",
            "v.yaml:5:48: hardware.patterns[1]: cannot read pattern file /: it is a directory; name the files",
        ]
    );
    assert_eq!(
        issues("hardware:\n  poll_interval: 1m\n  quiet: 30s\n"),
        vec!["v.yaml:3:10: hardware.quiet: 30s is shorter than hardware.poll_interval (60s)"]
    );
    assert_eq!(issues("hardware: { quiet: 8d }\n").len(), 1, "days are no unit: refused as a value");
}
