//! The broker's protocol rules, exercised over TCP with raw frames from our own codec: SETUP checks,
//! RESUME and LEASE refused, keepalive and lifetime, stream-id rules, malformed input, fragmentation,
//! REQUEST_N and CANCEL relayed with rewritten stream ids, and an instance that vanishes mid-request.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use vigil_broker::rsocket::fragment::fragment;
use vigil_broker::rsocket::frame::{Body, ErrorCode, Frame, FrameCodec, Payload};
use vigil_broker::rsocket::metadata::{self, Entry, mime};

use support::{Wire, connect, setup_frame};

fn register(service: &str, id: &str) -> Bytes {
    let json = format!(r#"{{"service":"{service}","version":"v1","instance_id":"{id}","capacity":8}}"#);
    metadata::composite(&[Entry { mime: mime::REGISTER.into(), value: Bytes::from(json) }])
}

fn route(tags: &[&str]) -> Bytes {
    metadata::composite(&[Entry { mime: mime::ROUTING.into(), value: metadata::routing(tags) }])
}

async fn next(wire: &mut Wire) -> Option<Frame> {
    match tokio::time::timeout(Duration::from_secs(5), wire.next()).await {
        Ok(Some(Ok(f))) => Some(f),
        Ok(None) => None,
        Ok(Some(Err(e))) => panic!("decode error: {e}"),
        Err(_) => panic!("no frame within 5 s"),
    }
}

/// Skips KEEPALIVEs.
async fn next_on_stream(wire: &mut Wire) -> Frame {
    loop {
        let f = next(wire).await.expect("a frame");
        if !matches!(f.body, Body::Keepalive { .. }) {
            return f;
        }
    }
}

fn error_code(f: &Frame) -> Option<ErrorCode> {
    match &f.body {
        Body::Error { code, .. } => Some(*code),
        _ => None,
    }
}

/// The connection answers one ERROR on stream 0 with `code`, then closes.
async fn expect_closed_with(wire: &mut Wire, code: ErrorCode) {
    let f = next(wire).await.expect("an ERROR frame before the close");
    assert_eq!((f.stream_id, error_code(&f)), (0, Some(code)), "{f:?}");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), wire.next()).await {
            Ok(None) | Ok(Some(Err(_))) => return,
            Ok(Some(Ok(f))) if matches!(f.body, Body::Error { .. }) => continue,
            other => panic!("expected the connection to close, got {other:?}"),
        }
    }
}

fn payload(data: &'static str, metadata: Option<Bytes>) -> Payload {
    Payload { metadata, data: Bytes::from_static(data.as_bytes()) }
}

#[tokio::test]
async fn garbage_gets_an_error_frame_and_a_closed_connection() {
    let broker = support::start_broker("").await;
    let mut raw = TcpStream::connect(broker.rsocket_addr()).await.unwrap();
    // A 6-byte frame of reserved type 0x3F without the ignore flag.
    raw.write_all(&[0, 0, 6, 0, 0, 0, 0, 0xFC, 0]).await.unwrap();
    let mut wire = Framed::new(raw, FrameCodec::default());
    let f = next(&mut wire).await.expect("an ERROR frame");
    assert_eq!(f.stream_id, 0);
    assert!(matches!(error_code(&f), Some(ErrorCode::INVALID_SETUP | ErrorCode::CONNECTION_ERROR)), "{f:?}");
}

#[tokio::test]
async fn resume_and_lease_are_refused_with_the_spec_errors() {
    let broker = support::start_broker("").await;
    let addr = broker.rsocket_addr();
    let resume = Frame::new(
        0,
        Body::Resume {
            major: 1,
            minor: 0,
            token: Bytes::from_static(b"tok"),
            last_received_server_position: 0,
            first_available_client_position: 0,
        },
    );
    let mut wire = connect(addr, resume).await;
    expect_closed_with(&mut wire, ErrorCode::REJECTED_RESUME).await;

    let mut setup = setup_frame(10_000, None);
    if let Body::Setup(s) = &mut setup.body {
        s.lease = true;
    }
    let mut wire = connect(addr, setup).await;
    expect_closed_with(&mut wire, ErrorCode::UNSUPPORTED_SETUP).await;

    let mut wire =
        connect(addr, Frame::new(1, Body::RequestResponse { follows: false, payload: payload("x", None) }))
            .await;
    expect_closed_with(&mut wire, ErrorCode::INVALID_SETUP).await;
}

#[tokio::test]
async fn keepalive_is_answered_and_a_silent_peer_is_cut_off_after_its_lifetime() {
    let broker = support::start_broker("").await;
    let mut wire = connect(broker.rsocket_addr(), setup_frame(600, None)).await;
    wire.send(Frame::new(
        0,
        Body::Keepalive { respond: true, last_position: 0, data: Bytes::from_static(b"k") },
    ))
    .await
    .unwrap();
    let f = next(&mut wire).await.unwrap();
    assert_eq!(f.body, Body::Keepalive { respond: false, last_position: 0, data: Bytes::from_static(b"k") });
    let started = std::time::Instant::now();
    expect_closed_with(&mut wire, ErrorCode::CONNECTION_ERROR).await;
    assert!(started.elapsed() >= Duration::from_millis(500), "{:?}", started.elapsed());
}

#[tokio::test]
async fn requests_on_even_stream_ids_are_a_connection_error() {
    let broker = support::start_broker("").await;
    let mut wire = connect(broker.rsocket_addr(), setup_frame(10_000, None)).await;
    wire.send(Frame::new(
        2,
        Body::RequestResponse { follows: false, payload: payload("x", Some(route(&["a"]))) },
    ))
    .await
    .unwrap();
    expect_closed_with(&mut wire, ErrorCode::CONNECTION_ERROR).await;
}

#[tokio::test]
async fn a_request_without_routing_is_invalid_and_the_connection_stays() {
    let broker = support::start_broker("").await;
    let mut wire = connect(broker.rsocket_addr(), setup_frame(10_000, None)).await;
    wire.send(Frame::new(1, Body::RequestResponse { follows: false, payload: payload("x", None) }))
        .await
        .unwrap();
    let f = next_on_stream(&mut wire).await;
    assert_eq!((f.stream_id, error_code(&f)), (1, Some(ErrorCode::INVALID)), "{f:?}");
    wire.send(Frame::new(0, Body::Keepalive { respond: true, last_position: 0, data: Bytes::new() }))
        .await
        .unwrap();
    assert!(matches!(next(&mut wire).await.unwrap().body, Body::Keepalive { .. }));
}

#[tokio::test]
async fn fragments_are_reassembled_and_stream_frames_are_relayed_with_rewritten_ids() {
    let broker = support::start_broker("").await;
    let addr = broker.rsocket_addr();
    let mut instance = connect(addr, setup_frame(10_000, Some(register("frag", "frag-0")))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut requester = connect(addr, setup_frame(10_000, None)).await;

    // A 300 KiB request in 64 KiB fragments arrives whole.
    let big = Bytes::from(vec![7u8; 300 << 10]);
    let request = Frame::new(
        5,
        Body::RequestStream {
            follows: false,
            initial_n: 2,
            payload: Payload { metadata: Some(route(&["frag"])), data: big.clone() },
        },
    );
    for f in fragment(request, 64 << 10) {
        requester.send(f).await.unwrap();
    }
    let got = next_on_stream(&mut instance).await;
    let Body::RequestStream { follows: false, initial_n: 2, payload: whole } = &got.body else {
        panic!("{got:?}")
    };
    assert_eq!(whole.data, big);
    assert_eq!(got.stream_id % 2, 0, "the broker opens even streams towards instances");
    let inner = got.stream_id;

    requester.send(Frame::new(5, Body::RequestN { n: 7 })).await.unwrap();
    let f = next_on_stream(&mut instance).await;
    assert_eq!((f.stream_id, &f.body), (inner, &Body::RequestN { n: 7 }));

    instance
        .send(Frame::new(
            inner,
            Body::Payload { follows: false, complete: false, next: true, payload: payload("one", None) },
        ))
        .await
        .unwrap();
    let f = next_on_stream(&mut requester).await;
    assert_eq!(f.stream_id, 5);
    assert_eq!(f.payload().unwrap().data, Bytes::from_static(b"one"));

    requester.send(Frame::new(5, Body::Cancel)).await.unwrap();
    let f = next_on_stream(&mut instance).await;
    assert_eq!((f.stream_id, &f.body), (inner, &Body::Cancel));
}

#[tokio::test]
async fn an_instance_that_vanishes_mid_request_gets_its_requester_a_retryable_error() {
    let broker = support::start_broker("").await;
    let addr = broker.rsocket_addr();
    let mut instance = connect(addr, setup_frame(10_000, Some(register("gone", "gone-0")))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut requester = connect(addr, setup_frame(10_000, None)).await;
    requester
        .send(Frame::new(
            1,
            Body::RequestResponse { follows: false, payload: payload("x", Some(route(&["gone"]))) },
        ))
        .await
        .unwrap();
    let _ = next_on_stream(&mut instance).await;
    drop(instance);
    let f = next_on_stream(&mut requester).await;
    assert_eq!((f.stream_id, error_code(&f)), (1, Some(ErrorCode::REJECTED)), "{f:?}");
    let text = support::metric(&broker);
    assert!(
        text.contains("vigil_broker_requests_total{service=\"gone\",version=\"v1\",outcome=\"failure\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_one_item_channel_ends_when_the_responder_completes() {
    let broker = support::start_broker("").await;
    let addr = broker.rsocket_addr();
    let mut instance = connect(addr, setup_frame(10_000, Some(register("chan", "chan-0")))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut requester = connect(addr, setup_frame(10_000, None)).await;
    let request = Body::RequestChannel {
        follows: false,
        complete: true,
        initial_n: 1,
        payload: payload("only", Some(route(&["chan"]))),
    };
    requester.send(Frame::new(1, request)).await.unwrap();
    let got = next_on_stream(&mut instance).await;
    let done = Body::Payload { follows: false, complete: true, next: true, payload: payload("ONLY", None) };
    instance.send(Frame::new(got.stream_id, done)).await.unwrap();
    let f = next_on_stream(&mut requester).await;
    assert_eq!(f.stream_id, 1);
    let text = support::metric(&broker);
    assert!(
        text.contains("vigil_broker_requests_total{service=\"chan\",version=\"v1\",outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(text.contains("vigil_broker_inflight{service=\"chan\"} 0"), "{text}");
}

#[tokio::test]
async fn a_broker_with_a_token_refuses_a_setup_without_it() {
    let broker = support::start_broker("  token: s3cret\n").await;
    let addr = broker.rsocket_addr();
    let mut wire = connect(addr, setup_frame(10_000, None)).await;
    expect_closed_with(&mut wire, ErrorCode::REJECTED_SETUP).await;

    let token = |t: &'static str| {
        metadata::composite(&[Entry { mime: mime::TOKEN.into(), value: Bytes::from_static(t.as_bytes()) }])
    };
    let mut wire = connect(addr, setup_frame(10_000, Some(token("wrong")))).await;
    expect_closed_with(&mut wire, ErrorCode::REJECTED_SETUP).await;

    let mut wire = connect(addr, setup_frame(10_000, Some(token("s3cret")))).await;
    wire.send(Frame::new(0, Body::Keepalive { respond: true, last_position: 0, data: Bytes::new() }))
        .await
        .unwrap();
    assert!(matches!(next(&mut wire).await.unwrap().body, Body::Keepalive { .. }), "accepted with the token");
}
