//! Feeds arbitrary bytes to the RSocket frame codec, the reassembler and the metadata parsers: none of
//! them may panic, and every frame the codec accepts must encode back to bytes that decode to it.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use vigil_broker::rsocket::fragment::{Reassembler, fragment};
use vigil_broker::rsocket::frame::{self, FrameCodec};
use vigil_broker::rsocket::metadata::{self, mime};

fn metadata_parsers(bytes: &Bytes) {
    let _ = metadata::parse_composite(bytes);
    let _ = metadata::parse_routing(bytes);
    let _ = metadata::Zipkin::parse(bytes);
    let _ = metadata::request_meta(mime::COMPOSITE, Some(bytes));
    let _ = metadata::request_meta(mime::ROUTING, Some(bytes));
    let _ = metadata::registration(mime::COMPOSITE, Some(bytes));
    let _ = metadata::registration(mime::REGISTER, Some(bytes));
    if let Ok(s) = std::str::from_utf8(bytes) {
        let _ = metadata::TraceParent::parse(s);
    }
}

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    let _ = frame::decode(input.clone());
    metadata_parsers(&input);

    // A small limit so that the length-prefix check is exercised too.
    let mut codec = FrameCodec::new(64 * 1024);
    let mut reassembler = Reassembler::new(16 * 1024, 64 * 1024);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(decoded)) = codec.decode(&mut buf) {
        let mut out = BytesMut::new();
        frame::encode(&decoded, &mut out);
        assert_eq!(out.len(), 3 + decoded.encoded_len());
        let again = frame::decode(out.split_off(3).freeze());
        assert_eq!(again, Ok(Some(decoded.clone())));
        if let Some(m) = decoded.payload().and_then(|p| p.metadata.as_ref()) {
            metadata_parsers(m);
        }
        for piece in fragment(decoded.clone(), 64) {
            let _ = reassembler.feed(piece);
        }
        let _ = reassembler.feed(decoded);
    }
});
