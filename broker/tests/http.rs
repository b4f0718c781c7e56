//! The HTTP trigger over real sockets: a real upstream HTTP server behind a real broker, requests over
//! HTTP/1.1 and HTTP/2 (prior knowledge), routing misses, a dead upstream and an oversized body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vigil_broker::Broker;
use vigil_broker::config::BrokerFile;
use vigil_broker::conn::{Conn, ConnSettings, Out, Target};
use vigil_broker::rsocket::frame::{Body, ErrorCode, Frame, Payload};
use vigil_broker::rsocket::metadata;

/// The upstream answers every request with what it saw, as JSON.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let header = |name: &str| {
                        req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
                    };
                    let seen = json!({
                        "method": req.method().as_str(),
                        "path": req.uri().path_and_query().map(|p| p.as_str()),
                        "host": header("host"),
                        "x_forwarded_for": header("x-forwarded-for"),
                        "x_forwarded_host": header("x-forwarded-host"),
                        "x_forwarded_proto": header("x-forwarded-proto"),
                        "via": header("via"),
                        "x_custom": header("x-custom"),
                        "connection_private": header("x-private"),
                        "authorization": header("authorization"),
                    });
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let mut seen = seen;
                    seen["body_len"] = json!(body.len());
                    let response = Response::builder()
                        .header("content-type", "application/json")
                        .header("x-upstream", "yes")
                        .body(Full::new(Bytes::from(seen.to_string())))
                        .expect("response");
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A loopback address with nothing listening on it.
async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

async fn broker(service: &str, upstream: SocketAddr) -> Broker {
    let yaml = format!(
        "broker:\n  listen: 127.0.0.1:0\n  http: {{ listen: 127.0.0.1:0, max_body_bytes: 1024, request_timeout: 5s }}\n  upstreams:\n    - {{ service: {service}, address: \"{upstream}\", route: /{service} }}\n"
    );
    let file = BrokerFile::parse(&yaml, "t.yaml").expect("config");
    Broker::start(file, None).await.expect("broker starts")
}

struct Answer {
    status: StatusCode,
    version: Version,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn send(http2: bool, request: Request<Full<Bytes>>) -> Answer {
    let client = Client::builder(TokioExecutor::new()).http2_only(http2).build_http::<Full<Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("answer in time")
        .expect("request");
    let status = response.status();
    let version = response.version();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    Answer { status, version, headers, body }
}

fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).expect("request")
}

fn assert_json_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.headers.get("content-type").map(|v| v.as_bytes()), Some(&b"application/json"[..]));
    let body = answer.json();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

fn metrics(broker: &Broker) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &broker.metrics_registry()).expect("encode");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_are_proxied_with_forwarding_headers() {
    let broker = broker("echo", upstream().await).await;
    let trigger = broker.http_addr().expect("HTTP trigger");

    let mut request = get(trigger, "/echo/x?q=1");
    request.headers_mut().insert("x-custom", "kept".parse().expect("value"));
    request.headers_mut().insert("connection", "x-private".parse().expect("value"));
    request.headers_mut().insert("x-private", "hop only".parse().expect("value"));
    let answer = send(false, request).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.version, Version::HTTP_11);
    assert_eq!(answer.headers.get("x-upstream").map(|v| v.as_bytes()), Some(&b"yes"[..]));
    let seen = answer.json();
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["path"], "/echo/x?q=1");
    assert_eq!(seen["x_forwarded_for"], "127.0.0.1");
    assert_eq!(seen["x_forwarded_host"], format!("{trigger}"));
    assert_eq!(seen["host"], format!("{trigger}"));
    assert_eq!(seen["x_forwarded_proto"], "http");
    assert_eq!(seen["via"], "1.1 vigil");
    assert_eq!(seen["x_custom"], "kept");
    assert_eq!(seen["connection_private"], Value::Null);

    // The prefix itself, and a body within the limit.
    let request = Request::post(format!("http://{trigger}/echo"))
        .body(Full::new(Bytes::from(vec![7u8; 1000])))
        .expect("req");
    let answer = send(false, request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["path"], "/echo");
    assert_eq!(answer.json()["body_len"], 1000);

    let text = metrics(&broker);
    assert!(
        text.contains("vigil_broker_requests_total{service=\"echo\",version=\"v1\",outcome=\"ok\"} 2\n"),
        "{text}"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_requests_are_proxied() {
    let broker = broker("echo", upstream().await).await;
    let trigger = broker.http_addr().expect("HTTP trigger");

    let answer = send(true, get(trigger, "/echo/h2")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.version, Version::HTTP_2);
    let seen = answer.json();
    assert_eq!(seen["path"], "/echo/h2");
    assert_eq!(seen["via"], "2 vigil");
    assert_eq!(seen["x_forwarded_for"], "127.0.0.1");
    // HTTP/2 has no Host header; the instance gets the :authority as its Host.
    assert_eq!(seen["host"], format!("{trigger}"));

    let missing = send(true, get(trigger, "/nothing")).await;
    assert_json_error(&missing, StatusCode::NOT_FOUND, "no_route");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_paths_get_a_json_404() {
    let broker = broker("echo", upstream().await).await;
    let trigger = broker.http_addr().expect("HTTP trigger");
    for path in ["/", "/nothing", "/echoes", "/ech"] {
        let answer = send(false, get(trigger, path)).await;
        assert_json_error(&answer, StatusCode::NOT_FOUND, "no_route");
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_is_a_502_and_counts_as_a_failure() {
    let broker = broker("down", dead_address().await).await;
    let trigger = broker.http_addr().expect("HTTP trigger");

    let answer = send(false, get(trigger, "/down/x")).await;
    assert_json_error(&answer, StatusCode::BAD_GATEWAY, "bad_gateway");

    let text = metrics(&broker);
    assert!(
        text.contains("vigil_broker_requests_total{service=\"down\",version=\"v1\",outcome=\"failure\"} 1\n"),
        "{text}"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_refused_with_413() {
    let broker = broker("echo", upstream().await).await;
    let trigger = broker.http_addr().expect("HTTP trigger");

    // Declared length over the limit.
    let request = Request::post(format!("http://{trigger}/echo"))
        .body(Full::new(Bytes::from(vec![1u8; 4096])))
        .expect("req");
    let answer = send(false, request).await;
    assert_json_error(&answer, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");

    // Chunked, so the limit is only found while reading.
    let mut stream = TcpStream::connect(trigger).await.expect("connect");
    let chunk = vec![b'a'; 2000];
    let mut raw = format!(
        "POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n",
        chunk.len()
    )
    .into_bytes();
    raw.extend_from_slice(&chunk);
    raw.extend_from_slice(b"\r\n0\r\n\r\n");
    stream.write_all(&raw).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("\"body_too_large\""), "{out}");

    // Nothing reached the instance.
    let text = metrics(&broker);
    assert!(!text.contains("vigil_broker_requests_total{service=\"echo\""), "{text}");
    broker.shutdown().await;
}

/// An RSocket instance of `rs`, registered with the hub like a connection that sent a registration: the
/// broker's frames to it arrive on the receiver, and its answers go in through `on_frame`.
fn rsocket_instance(broker: &Broker) -> (std::sync::Arc<Conn>, tokio::sync::mpsc::UnboundedReceiver<Out>) {
    let settings = std::sync::Arc::new(ConnSettings {
        max_frame_bytes: 1 << 20,
        max_reassembly_per_stream: 1 << 20,
        max_reassembly_per_connection: 1 << 20,
        max_pending_write_bytes: 1 << 20,
        setup_timeout: Duration::from_secs(5),
        http_timeout: Duration::from_secs(5),
        token: None,
    });
    let (conn, rx) = Conn::local(broker.hub().clone(), settings);
    broker.hub().add_instance("rs", "v1", "rs-1", 10, true, Target::Rsocket(conn.clone()));
    (conn, rx)
}

async fn next_request(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Out>) -> Frame {
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a request in time") {
        Some(Out::Frame(f)) => f,
        _ => panic!("the instance's connection closed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_rsocket_instances_are_carried_as_request_response() {
    let yaml = "broker:\n  listen: 127.0.0.1:0\n  http: { listen: 127.0.0.1:0, request_timeout: 5s }\nservices:\n  - { name: rs, route: /rs }\n";
    let broker =
        Broker::start(BrokerFile::parse(yaml, "t.yaml").expect("config"), None).await.expect("broker");
    let trigger = broker.http_addr().expect("HTTP trigger");
    let (instance, mut rx) = rsocket_instance(&broker);

    let mut request = Request::post(format!("http://{trigger}/rs/call"))
        .body(Full::new(Bytes::from_static(b"ping")))
        .expect("req");
    request.headers_mut().insert("x-vigil-key", "user-7".parse().expect("value"));
    request.headers_mut().insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().expect("value"),
    );
    let answer = tokio::spawn(send(false, request));

    let frame = next_request(&mut rx).await;
    let Body::RequestResponse { payload, .. } = &frame.body else {
        panic!("not a request-response: {frame:?}")
    };
    assert_eq!(payload.data, Bytes::from_static(b"ping"));
    let meta =
        metadata::request_meta(metadata::mime::COMPOSITE, payload.metadata.as_ref()).expect("metadata");
    let route = meta.route.expect("routing entry");
    assert_eq!(route.service, "rs");
    assert_eq!(route.key.as_deref(), Some("user-7"));
    let reply = Payload { metadata: None, data: Bytes::from_static(b"pong") };
    instance.on_frame(Frame::new(
        frame.stream_id,
        Body::Payload { follows: false, complete: true, next: true, payload: reply },
    ));

    let answer = answer.await.expect("client task");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, Bytes::from_static(b"pong"));

    // An application error from the instance is a 500 with its message.
    let answer = tokio::spawn(send(
        false,
        Request::post(format!("http://{trigger}/rs")).body(Full::new(Bytes::new())).expect("req"),
    ));
    let frame = next_request(&mut rx).await;
    instance.on_frame(Frame::error(frame.stream_id, ErrorCode::APPLICATION_ERROR, "no such user"));
    let answer = answer.await.expect("client task");
    assert_json_error(&answer, StatusCode::INTERNAL_SERVER_ERROR, "application_error");
    assert!(answer.json()["error"]["message"].as_str().is_some_and(|m| m.contains("no such user")));

    // A client that gives up cancels the request at the instance.
    let mut client = TcpStream::connect(trigger).await.expect("connect");
    client
        .write_all(b"POST /rs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("send");
    let frame = next_request(&mut rx).await;
    drop(client);
    let cancel = next_request(&mut rx).await;
    assert_eq!(cancel.stream_id, frame.stream_id);
    assert!(matches!(cancel.body, Body::Cancel), "{cancel:?}");

    let text = metrics(&broker);
    for outcome in ["ok", "app_error", "cancelled"] {
        let line =
            format!("vigil_broker_requests_total{{service=\"rs\",version=\"v1\",outcome=\"{outcome}\"}} 1\n");
        assert!(text.contains(&line), "{line} in {text}");
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_a_service_without_instances_wait_then_get_a_retryable_503() {
    let yaml = "broker:\n  listen: 127.0.0.1:0\n  http: { listen: 127.0.0.1:0 }\n  queue: { timeout: 300ms, max_per_service: 1 }\nservices:\n  - { name: idle, route: /idle }\n";
    let broker =
        Broker::start(BrokerFile::parse(yaml, "t.yaml").expect("config"), None).await.expect("broker");
    let trigger = broker.http_addr().expect("HTTP trigger");

    let waiting = tokio::spawn(send(false, get(trigger, "/idle/a")));
    // The first waits in the queue (of one place), so the second is refused at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while broker.hub().queued().get("idle").copied().unwrap_or(0) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the first request never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let full = send(false, get(trigger, "/idle/b")).await;
    assert_json_error(&full, StatusCode::SERVICE_UNAVAILABLE, "queue_full");
    assert_eq!(full.headers.get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));

    let timed_out = waiting.await.expect("client task");
    assert_json_error(&timed_out, StatusCode::SERVICE_UNAVAILABLE, "timeout");
    assert!(timed_out.headers.contains_key("retry-after"));
    assert!(broker.hub().queued().is_empty());

    let text = metrics(&broker);
    for outcome in ["rejected", "timeout"] {
        let line = format!(
            "vigil_broker_requests_total{{service=\"idle\",version=\"none\",outcome=\"{outcome}\"}} 1\n"
        );
        assert!(text.contains(&line), "{line} in {text}");
    }
    broker.shutdown().await;
}

/// The trigger's workers share their port with SO_REUSEPORT; a second broker (or anything else) on the same
/// port must still be refused, not handed half the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_port_in_use_is_an_error_even_for_a_second_broker() {
    let config = |port: u16| {
        let yaml = format!("broker:\n  listen: 127.0.0.1:0\n  http: {{ listen: 127.0.0.1:{port} }}\n");
        BrokerFile::parse(&yaml, "t.yaml").expect("config")
    };
    let first = Broker::start(config(0), None).await.expect("first broker");
    let port = first.http_addr().expect("trigger").port();
    let err = Broker::start(config(port), None).await.err().expect("the port is taken");
    assert!(
        err.to_string().starts_with(&format!("cannot listen on 127.0.0.1:{port} (HTTP trigger)")),
        "{err}"
    );
    first.shutdown().await;
}

/// With `broker.token` set, a request needs `Authorization: Bearer <token>`, and the instance never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_a_token_refuses_requests_without_it() {
    let up = upstream().await;
    let yaml = format!(
        "broker:\n  listen: 127.0.0.1:0\n  token: s3cret\n  http: {{ listen: 127.0.0.1:0 }}\n  upstreams:\n    - {{ service: echo, address: \"{up}\", route: /echo }}\n"
    );
    let broker =
        Broker::start(BrokerFile::parse(&yaml, "t.yaml").expect("config"), None).await.expect("broker");
    let addr = broker.http_addr().expect("trigger");
    let answer = send(false, get(addr, "/echo")).await;
    assert_json_error(&answer, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(answer.headers.get("www-authenticate").map(|v| v.as_bytes()), Some(&b"Bearer"[..]));
    let mut wrong = get(addr, "/echo");
    wrong.headers_mut().insert("authorization", http::HeaderValue::from_static("Bearer s3creT"));
    assert_json_error(&send(false, wrong).await, StatusCode::UNAUTHORIZED, "unauthorized");

    let mut right = get(addr, "/echo");
    right.headers_mut().insert("authorization", http::HeaderValue::from_static("Bearer s3cret"));
    let answer = send(false, right).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["authorization"], Value::Null, "the token stays at the broker");
    broker.shutdown().await;
}
