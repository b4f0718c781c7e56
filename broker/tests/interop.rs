//! Interoperability with a foreign RSocket implementation: the PyPI `rsocket` package (0.4.20) as both the
//! requester (`client.py`) and the service (`service.py`), talking through a real broker over TCP.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Peer, client, client_within, metric, start_broker, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_stream_channel_and_fire_and_forget_with_routing() {
    let broker = start_broker("").await;
    let addr = broker.rsocket_addr();
    let _svc = Peer::service(addr, "echo", "v1", "echo-a", &[]).await;

    let out = client(addr, &["echo"], &["rr", "hello"]).await;
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["instance_id"], "echo-a");
    assert_eq!(out[0]["echo"], "hello");
    assert_eq!(out[0]["version"], "v1");
    // The request's own composite metadata reaches the instance.
    let entries: Vec<&str> =
        out[0]["metadata_entries"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(entries.contains(&"message/x.rsocket.routing.v0"), "{entries:?}");

    let out = client(addr, &["echo"], &["stream", "3"]).await;
    assert_eq!(out, vec![Value::from("echo-a:0"), Value::from("echo-a:1"), Value::from("echo-a:2")]);

    let out = client(addr, &["echo"], &["channel", "a", "b", "c"]).await;
    assert_eq!(out, vec![Value::from("A"), Value::from("B"), Value::from("C")]);

    let out = client(addr, &["echo"], &["fnf", "x"]).await;
    assert_eq!(out.len(), 1, "{out:?}");
    // Fire-and-forget has no answer: poll the service's count until it arrives.
    let mut count = Value::Null;
    for _ in 0..20 {
        count = client(addr, &["echo"], &["rr", "fnf-count"]).await.remove(0);
        if count == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count, 1);

    let text = metric(&broker);
    assert!(
        text.contains("vigil_broker_requests_total{service=\"echo\",version=\"v1\",outcome=\"ok\"}"),
        "{text}"
    );
    assert!(text.contains("vigil_broker_connections{role=\"instance\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_and_application_errors_come_back_as_rsocket_errors() {
    let broker = start_broker("").await;
    let addr = broker.rsocket_addr();
    let _svc = Peer::service(addr, "flaky", "v1", "flaky-0", &["--fail-every", "2"]).await;

    let out = client(addr, &["nowhere"], &["rr", "x"]).await;
    assert_eq!(out[0]["error"]["code"], 0x204, "{out:?}");
    assert!(out[0]["error"]["message"].as_str().unwrap().contains("nowhere"), "{out:?}");

    let out = client(addr, &["flaky"], &["rr", "x", "--count", "4"]).await;
    let errors = out.iter().filter(|v| v.get("error").is_some()).count();
    assert_eq!((out.len(), errors), (4, 2), "{out:?}");
    assert_eq!(out[1]["error"]["code"], 0x201, "{out:?}");
    // Application errors never eject the instance: it still serves.
    let out = client(addr, &["flaky"], &["rr", "x"]).await;
    assert_eq!(out[0]["instance_id"], "flaky-0", "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_shifts_by_weight_pins_by_version_and_sticks_by_key() {
    let broker = start_broker(
        "  splits:\n    - { name: default, service: echo, weights: { v1: 80, v2: 20 } }\n    - { name: sticky, service: echo, weights: { v1: 50, v2: 50 }, sticky: true }\n",
    )
    .await;
    let addr = broker.rsocket_addr();
    let _a = Peer::service(addr, "echo", "v1", "echo-v1", &[]).await;
    let _b = Peer::service(addr, "echo", "v2", "echo-v2", &[]).await;

    let n = 600;
    let out = client(addr, &["echo"], &["rr", "x", "--count", &n.to_string()]).await;
    assert_eq!(out.len(), n);
    let v2 = out.iter().filter(|v| v["version"] == "v2").count();
    // Binomial(600, 0.2): mean 120, sd 9.8; ±4 sd.
    assert!((81..=159).contains(&v2), "v2 got {v2} of {n}");

    let out = client(addr, &["echo", "version=v2"], &["rr", "x", "--count", "20"]).await;
    assert!(out.iter().all(|v| v["version"] == "v2"), "{out:?}");

    for key in ["alice", "bob", "carol"] {
        let out =
            client(addr, &["echo", "alias=sticky", &format!("key={key}")], &["rr", "x", "--count", "10"])
                .await;
        let first = out[0]["version"].clone();
        assert!(out.iter().all(|v| v["version"] == first), "{key}: {out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_service_without_instances_is_held_and_answered_once() {
    let broker = start_broker("services:\n  - { name: late }\n").await;
    let addr = broker.rsocket_addr();
    let waiting = tokio::spawn(async move { client(addr, &["late"], &["rr", "held"]).await });
    support::wait_for(|| metric(&broker).contains("vigil_broker_queued{service=\"late\"} 1")).await;
    let _svc = Peer::service(addr, "late", "v1", "late-0", &[]).await;
    let out = waiting.await.unwrap();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["echo"], "held");
    let text = metric(&broker);
    assert!(text.contains("vigil_broker_queued{service=\"late\"} 0"), "{text}");
    assert!(
        text.contains("vigil_broker_requests_total{service=\"late\",version=\"v1\",outcome=\"ok\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("vigil_broker_queue_wait_seconds_count{service=\"late\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_queue_is_rejected_cleanly() {
    let broker = start_broker("  queue: { max_per_service: 3 }\nservices:\n  - { name: late }\n").await;
    let addr = broker.rsocket_addr();
    let mut clients = Vec::new();
    for i in 0..8 {
        clients.push(tokio::spawn(async move { client(addr, &["late"], &["rr", &format!("r{i}")]).await }));
    }
    support::wait_for(|| {
        metric(&broker)
            .contains("vigil_broker_requests_total{service=\"late\",version=\"none\",outcome=\"rejected\"} 5")
    })
    .await;
    let _svc = Peer::service(addr, "late", "v1", "late-0", &[]).await;
    let mut answered = 0;
    let mut rejected = 0;
    for c in clients {
        let out = c.await.unwrap();
        assert_eq!(out.len(), 1, "{out:?}");
        match out[0]["error"]["code"].as_u64() {
            Some(0x202) => rejected += 1,
            None if out[0]["instance_id"] == "late-0" => answered += 1,
            _ => panic!("unexpected {out:?}"),
        }
    }
    assert_eq!((answered, rejected), (3, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_change_at_run_time_without_dropping_requests() {
    let dir = std::env::temp_dir().join(format!("vigil-splits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("vigil.yaml");
    let config = |v1: u32, v2: u32| {
        format!(
            "broker:\n  listen: 127.0.0.1:0\n  http: {{ enabled: false }}\n  splits:\n    - {{ name: default, service: echo, weights: {{ v1: {v1}, v2: {v2} }} }}\n"
        )
    };
    std::fs::write(&file, config(100, 0)).unwrap();
    let parsed = vigil_broker::config::BrokerFile::load(&file).unwrap();
    let broker = vigil_broker::Broker::start(parsed, Some(file.clone())).await.unwrap();
    let addr = broker.rsocket_addr();
    let _a = Peer::service(addr, "echo", "v1", "echo-v1", &[]).await;
    let _b = Peer::service(addr, "echo", "v2", "echo-v2", &[]).await;

    let n = 10_000;
    // A busy machine runs the 10,000 requests slowly: the load has minutes, the changes wait for conditions.
    let load = tokio::spawn(async move {
        client_within(addr, &["echo"], &["rr", "x", "--count", &n.to_string()], 300).await
    });
    wait_for(|| metric(&broker).contains("vigil_broker_requests_total{service=\"echo\",version=\"v1\""))
        .await;
    // A mistake first: it is refused and the split in force stays.
    std::fs::write(&file, "broker:\n  splits: [{ name: default, service: echo, weights: { v1: 0 } }]\n")
        .unwrap();
    wait_for(|| metric(&broker).contains("vigil_broker_config_reloads_total{outcome=\"rejected\"} 1")).await;
    assert!(!load.is_finished(), "the load ended before the change: make it longer");
    std::fs::write(&file, config(0, 100)).unwrap();
    let started = std::time::Instant::now();
    let out = load.await.unwrap();
    eprintln!("load ended {:?} after the change", started.elapsed());
    assert_eq!(out.len(), n);
    assert!(out.iter().all(|v| v.get("error").is_none()), "a request failed during the change");
    let versions: Vec<&str> = out.iter().map(|v| v["version"].as_str().unwrap_or("?")).collect();
    let switched = versions.iter().position(|v| *v == "v2").expect("the new split took effect");
    assert!(switched > 0, "the first requests went to v1");
    assert!(versions[switched..].iter().all(|v| *v == "v2"), "after the change only v2");
    let _ = std::fs::remove_dir_all(&dir);
}
