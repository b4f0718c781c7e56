use std::collections::BTreeMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use vigil_core::VigilConfig;

use super::*;
use crate::engine::{Outcome, Refusal};

fn decision(rule: &str, action: &'static str, service: &str, outcome: Outcome) -> Decision {
    Decision {
        unix_ms: 1_700_000_000_000,
        rule: rule.into(),
        action,
        service: service.into(),
        instance_id: format!("{service}-0"),
        held_seconds: 0.0,
        inputs: None,
        outcome,
    }
}

fn config(yaml: &str) -> NotifyConfig {
    VigilConfig::parse(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}")).notify
}

const RECEIVERS: &str = "\
notify:
  receivers:
    - name: named-only
      alertmanager: { url: http://127.0.0.1:1 }
    - name: failures
      webhook: { url: http://127.0.0.1:1/, secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw }
      match: { outcome: [failed] }
    - name: echo-restarts
      webhook: { url: http://127.0.0.1:1/, secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw }
      match: { action: [restart], service: [\"echo*\"], rule: [\"tell-*\"] }
";

#[test]
fn routes_are_the_named_receivers_plus_every_match() {
    let c = config(RECEIVERS);
    let receivers = || c.receivers.iter().map(|r| (r.name.as_str(), r.matcher.as_ref()));
    let failed = || Outcome::Failed { seconds: 1.0, error: "x".into() };
    let ok = Outcome::Succeeded { seconds: 1.0 };
    // Nothing named, nothing matched.
    assert!(route(receivers(), &decision("idle", "hibernate", "echo", ok.clone()), &[]).is_empty());
    // Named: always, even without a matcher; a receiver without `match` gets nothing else.
    assert_eq!(
        route(receivers(), &decision("idle", "hibernate", "echo", ok.clone()), &["named-only"]),
        ["named-only"]
    );
    // Matched by outcome alone.
    assert_eq!(route(receivers(), &decision("idle", "wake", "api", failed()), &[]), ["failures"]);
    // Every list of the matcher must take it.
    assert_eq!(
        route(receivers(), &decision("tell-ops", "restart", "echo2", ok.clone()), &[]),
        ["echo-restarts"]
    );
    assert!(route(receivers(), &decision("other", "restart", "echo", ok.clone()), &[]).is_empty());
    assert!(route(receivers(), &decision("tell-ops", "restart", "api", ok.clone()), &[]).is_empty());
    // Named and matched: once, in config order.
    assert_eq!(
        route(
            receivers(),
            &decision("tell-ops", "restart", "echo", failed()),
            &["echo-restarts", "named-only"]
        ),
        ["named-only", "failures", "echo-restarts"]
    );
    let refused = Outcome::Refused { reason: Refusal::RateLimited };
    assert!(route(receivers(), &decision("tell-ops", "hibernate", "echo", refused), &[]).is_empty());
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vigil-notify-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A receiver answering each request with the next status of `statuses` (then 200), and reporting the
/// `webhook-id` of each request it saw.
async fn scripted_receiver(statuses: Vec<u16>) -> (u16, tokio::sync::mpsc::UnboundedReceiver<(u16, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut statuses = statuses.into_iter();
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head and the body (Content-Length), then answer and close.
            let (head_end, length) = loop {
                let Ok(n) = conn.read(&mut chunk).await else { break (0, 0) };
                if n == 0 {
                    break (0, 0);
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    break (end + 4, length);
                }
            };
            if head_end == 0 {
                continue;
            }
            while buf.len() < head_end + length {
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
            let id = head
                .lines()
                .find_map(|l| l.strip_prefix("webhook-id:").map(|v| v.trim().to_string()))
                .unwrap_or_default();
            let status = statuses.next().unwrap_or(200);
            let _ = tx.send((status, id));
            let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno");
            let _ = conn.write_all(reply.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_what_may_succeed_and_drops_what_never_will() {
    let (port, mut seen) = scripted_receiver(vec![503, 429, 400, 200]).await;
    let dir = temp_dir("classes");
    let audit = Arc::new(AuditLog::open(&dir).unwrap());
    let yaml = format!(
        "notify:\n  retry: {{ initial: 10ms, max: 20ms }}\n  receivers:\n    - name: hook\n      webhook: {{ url: \
         \"http://127.0.0.1:{port}/\", secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw }}\n"
    );
    let notifier = Notifier::open(audit, &config(&yaml), "http://127.0.0.1:9750").unwrap();
    let labels = BTreeMap::new();
    let first = Notice::firing("a", "s", "s-0", &labels, 1);
    let second = Notice::firing("b", "s", "s-0", &labels, 2);
    let items = vec![("hook".to_string(), first), ("hook".to_string(), second)];
    let n = notifier.clone();
    let ids = tokio::task::spawn_blocking(move || n.enqueue(&items)).await.unwrap().unwrap();
    assert_eq!(notifier.queued()["hook"], 2);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = notifier.spawn(stop_rx);
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(tokio::time::timeout(Duration::from_secs(10), seen.recv()).await.unwrap().unwrap());
    }
    // 503 and 429 are retried with the same id; 400 drops the first; the second is then delivered.
    assert_eq!(
        got,
        [(503, ids[0].clone()), (429, ids[0].clone()), (400, ids[0].clone()), (200, ids[1].clone())]
    );
    // Wait for the removal that follows the 200.
    let deadline = Instant::now() + Duration::from_secs(10);
    while notifier.queued()["hook"] != 0 {
        assert!(Instant::now() < deadline, "the delivered notice stays queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut registry = prometheus_client::registry::Registry::default();
    notifier.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "vigil_notifications_sent_total{receiver=\"hook\"} 1",
        "vigil_notifications_failed_total{receiver=\"hook\"} 3",
        "vigil_notifications_dropped_total{receiver=\"hook\",reason=\"rejected\"} 1",
        "vigil_notifications_queued{receiver=\"hook\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
    }
    stop_tx.send_replace(true);
    task.await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_older_than_give_up_after_is_dropped_unsent() {
    let (port, mut seen) = scripted_receiver(vec![]).await;
    let dir = temp_dir("expired");
    let audit = Arc::new(AuditLog::open(&dir).unwrap());
    let yaml = format!(
        "notify:\n  give_up_after: 1m\n  receivers:\n    - name: am\n      alertmanager: {{ url: \
         \"http://127.0.0.1:{port}\" }}\n"
    );
    let notifier = Notifier::open(audit.clone(), &config(&yaml), "http://x").unwrap();
    let old = Notice::firing("a", "s", "s-0", &BTreeMap::new(), 1).created_at(notice::now_ms() - 120_000);
    let fresh = Notice::resolved("a", "s", "s-0", &BTreeMap::new(), 1, 2);
    // Through the audit's own transaction, as the healer queues a decision's notices.
    let n = notifier.clone();
    tokio::task::spawn_blocking(move || {
        audit.append_with(&serde_json::json!({"n": 1}), |tx, _| {
            n.enqueue_in(tx, "am", &old)?;
            n.enqueue_in(tx, "am", &fresh).map(drop)
        })
    })
    .await
    .unwrap()
    .unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = notifier.spawn(stop_rx);
    notifier.wake();
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await.unwrap().unwrap();
    assert_eq!(status, 200);
    stop_tx.send_replace(true);
    task.await.unwrap();
    assert!(seen.try_recv().is_err(), "only the fresh notice was posted");
    let mut registry = prometheus_client::registry::Registry::default();
    notifier.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("vigil_notifications_dropped_total{receiver=\"am\",reason=\"expired\"} 1"),
        "{text}"
    );
    assert!(matches!(
        notifier.enqueue_in(
            &notifier.inner.audit.database().begin_write().unwrap(),
            "nobody",
            &Notice::firing("a", "s", "s-0", &BTreeMap::new(), 1)
        ),
        Err(NotifyError::UnknownReceiver { .. })
    ));
    let _ = std::fs::remove_dir_all(dir);
}
