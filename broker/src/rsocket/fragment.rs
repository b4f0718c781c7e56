//! Fragmentation and reassembly (Protocol.md, "Fragmentation And Reassembly"): a request or PAYLOAD
//! too large for one frame is sent as its own frame type with the F flag, followed by PAYLOAD frames,
//! F set on all but the last, with all metadata sent before any data. [`Reassembler`] puts such a
//! sequence back together under per-stream and per-connection byte bounds, since the peer decides how
//! much it sends; [`fragment`] does the split on the way out.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use super::frame::{Body, Frame, Payload};

/// Bookkeeping charged against the connection bound for every stream with a partial, so that many
/// streams of empty fragments cannot grow the map for free.
const PARTIAL_OVERHEAD: usize = 64;
/// Smallest MTU [`fragment`] accepts: room for the largest head (6 + 4 + 3) and some bytes.
const MIN_MTU: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FragmentError {
    #[error("fragmented frame on stream {stream_id} grew to {size} bytes, over the limit of {max}")]
    TooLarge { stream_id: u32, size: usize, max: usize },
    #[error("{kind} frame on stream {stream_id} interrupted a fragmented frame")]
    Interrupted { stream_id: u32, kind: &'static str },
}

/// The first fragment (its type, flags and request N) and what has arrived since.
#[derive(Debug)]
struct Partial {
    first: Frame,
    metadata: Option<BytesMut>,
    data: BytesMut,
    /// C flag of a continuation; the sender puts stream completion on the last fragment.
    complete: bool,
}

impl Partial {
    fn size(&self) -> usize {
        self.metadata.as_ref().map_or(0, BytesMut::len) + self.data.len()
    }

    fn append(&mut self, payload: &Payload) {
        if let Some(m) = &payload.metadata {
            self.metadata.get_or_insert_with(BytesMut::new).extend_from_slice(m);
        }
        self.data.extend_from_slice(&payload.data);
    }

    fn finish(self) -> Frame {
        let Partial { mut first, metadata, data, complete } = self;
        match &mut first.body {
            Body::RequestResponse { follows, .. }
            | Body::RequestFnf { follows, .. }
            | Body::RequestStream { follows, .. } => *follows = false,
            Body::RequestChannel { follows, complete: c, .. }
            | Body::Payload { follows, complete: c, .. } => {
                *follows = false;
                *c |= complete;
            }
            _ => {}
        }
        if let Some(p) = first.payload_mut() {
            *p = Payload { metadata: metadata.map(BytesMut::freeze), data: data.freeze() };
        }
        first
    }
}

/// Reassembles fragmented request and PAYLOAD frames per stream, bounded per stream and per
/// connection.
#[derive(Debug)]
pub struct Reassembler {
    max_per_stream: usize,
    max_total: usize,
    partials: HashMap<u32, Partial>,
    /// Bytes held in `partials`, without the overhead charge.
    buffered: usize,
}

fn is_fragmentable(body: &Body) -> bool {
    matches!(
        body,
        Body::RequestResponse { .. }
            | Body::RequestFnf { .. }
            | Body::RequestStream { .. }
            | Body::RequestChannel { .. }
            | Body::Payload { .. }
    )
}

impl Reassembler {
    pub fn new(max_per_stream: usize, max_total: usize) -> Self {
        Reassembler { max_per_stream, max_total, partials: HashMap::new(), buffered: 0 }
    }

    /// A frame without FOLLOWS for a stream with nothing pending comes straight back, uncopied. A
    /// fragment is buffered (`Ok(None)`); the last one returns the whole frame with `follows` false, the
    /// first fragment's type, flags and initial N, and the metadata and data of all fragments
    /// concatenated (C from the last fragment counts too). Exceeding a bound drops the stream's partial
    /// and returns [`FragmentError::TooLarge`]. CANCEL and ERROR drop the partial and come back as they
    /// are; REQUEST_N and other frames without a payload pass through; a request frame interrupting a
    /// partial is [`FragmentError::Interrupted`] (and drops it).
    pub fn feed(&mut self, frame: Frame) -> Result<Option<Frame>, FragmentError> {
        let stream_id = frame.stream_id;
        if !self.partials.contains_key(&stream_id) {
            if !frame.follows() {
                return Ok(Some(frame));
            }
            let mut partial = Partial {
                first: Frame::new(stream_id, Body::Cancel),
                metadata: None,
                data: BytesMut::new(),
                complete: false,
            };
            if let Some(p) = frame.payload() {
                partial.append(p);
            }
            let mut first = frame;
            if let Some(p) = first.payload_mut() {
                *p = Payload::default();
            }
            partial.first = first;
            return self.store(stream_id, partial);
        }
        match &frame.body {
            Body::Cancel | Body::Error { .. } => {
                self.cancel(stream_id);
                Ok(Some(frame))
            }
            Body::Payload { follows, complete, payload, .. } => {
                let Some(mut partial) = self.remove(stream_id) else { return Ok(Some(frame)) };
                partial.append(payload);
                partial.complete |= *complete;
                if *follows {
                    self.store(stream_id, partial)
                } else {
                    self.check(stream_id, partial).map(Some)
                }
            }
            body if is_fragmentable(body) => {
                self.cancel(stream_id);
                Err(FragmentError::Interrupted { stream_id, kind: frame.kind() })
            }
            _ => Ok(Some(frame)),
        }
    }

    /// CANCEL or ERROR arrived for the stream: drop its partial.
    pub fn cancel(&mut self, stream_id: u32) {
        self.remove(stream_id);
    }

    /// Bytes of metadata and data held in partial frames.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    fn remove(&mut self, stream_id: u32) -> Option<Partial> {
        let partial = self.partials.remove(&stream_id)?;
        self.buffered -= partial.size();
        Some(partial)
    }

    /// Checks the bounds for a partial taken out of the map; on success returns the whole frame.
    fn check(&self, stream_id: u32, partial: Partial) -> Result<Frame, FragmentError> {
        let size = partial.size();
        if size > self.max_per_stream {
            return Err(FragmentError::TooLarge { stream_id, size, max: self.max_per_stream });
        }
        let total = self.buffered + size + (self.partials.len() + 1) * PARTIAL_OVERHEAD;
        if total > self.max_total {
            return Err(FragmentError::TooLarge { stream_id, size: total, max: self.max_total });
        }
        Ok(partial.finish())
    }

    fn store(&mut self, stream_id: u32, partial: Partial) -> Result<Option<Frame>, FragmentError> {
        let size = partial.size();
        let over_stream = size > self.max_per_stream;
        let total = self.buffered + size + (self.partials.len() + 1) * PARTIAL_OVERHEAD;
        if over_stream {
            return Err(FragmentError::TooLarge { stream_id, size, max: self.max_per_stream });
        }
        if total > self.max_total {
            return Err(FragmentError::TooLarge { stream_id, size: total, max: self.max_total });
        }
        self.buffered += size;
        self.partials.insert(stream_id, partial);
        Ok(None)
    }
}

/// Splits a frame whose encoded length exceeds `mtu` (without the length prefix) into fragments per the
/// spec: the first keeps the frame's type and header fields, the rest are PAYLOAD frames; F is set on
/// all but the last; metadata fills the fragments before data. Frames that may not be fragmented
/// (anything but requests and PAYLOAD) and frames that fit come back alone. `mtu` is raised to 64.
/// Fragments are slices of the frame's buffers, not copies.
pub fn fragment(frame: Frame, mtu: usize) -> Vec<Frame> {
    let mtu = mtu.max(MIN_MTU);
    if frame.encoded_len() <= mtu || !is_fragmentable(&frame.body) {
        return vec![frame];
    }
    let stream_id = frame.stream_id;
    let mut first = frame;
    let Some(payload) = first.payload_mut().map(std::mem::take) else { return vec![first] };
    let Payload { mut metadata, mut data } = payload;
    // The first frame's fixed part, measured with an empty payload.
    let first_head = first.encoded_len();
    // Stream completion belongs to the last fragment.
    let complete = match &mut first.body {
        Body::RequestChannel { complete, .. } | Body::Payload { complete, .. } => std::mem::take(complete),
        _ => false,
    };
    let mut frames = Vec::new();
    loop {
        let is_first = frames.is_empty();
        let head = if is_first { first_head } else { 6 };
        let has_metadata = metadata.as_ref().is_some_and(|m| is_first || !m.is_empty());
        let mut room = mtu - head - if has_metadata { 3 } else { 0 };
        let meta_part = if has_metadata {
            metadata.as_mut().map(|m| {
                let take = room.min(m.len());
                room -= take;
                m.split_to(take)
            })
        } else {
            None
        };
        let data_part = data.split_to(room.min(data.len()));
        let last = metadata.as_ref().is_none_or(Bytes::is_empty) && data.is_empty();
        let part = Payload { metadata: meta_part, data: data_part };
        let frame = if is_first {
            let mut f = first.clone();
            set_follows(&mut f.body, !last);
            if let Some(p) = f.payload_mut() {
                *p = part;
            }
            f
        } else {
            Frame::new(
                stream_id,
                Body::Payload { follows: !last, complete: last && complete, next: true, payload: part },
            )
        };
        frames.push(frame);
        if last {
            return frames;
        }
    }
}

fn set_follows(body: &mut Body, value: bool) {
    if let Body::RequestResponse { follows, .. }
    | Body::RequestFnf { follows, .. }
    | Body::RequestStream { follows, .. }
    | Body::RequestChannel { follows, .. }
    | Body::Payload { follows, .. } = body
    {
        *follows = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rsocket::frame::tests::frame_strategy;
    use proptest::prelude::*;

    fn big_request(stream_id: u32, metadata: usize, data: usize) -> Frame {
        Frame::new(
            stream_id,
            Body::RequestStream {
                follows: false,
                initial_n: 7,
                payload: Payload {
                    metadata: Some(Bytes::from(vec![b'm'; metadata])),
                    data: Bytes::from(vec![b'd'; data]),
                },
            },
        )
    }

    fn reassemble(frames: Vec<Frame>) -> Vec<Frame> {
        let mut r = Reassembler::new(1 << 20, 1 << 22);
        let out: Vec<Frame> = frames.into_iter().filter_map(|f| r.feed(f).expect("within bounds")).collect();
        assert_eq!(r.buffered(), 0);
        out
    }

    #[test]
    fn fragments_follow_the_spec() {
        let frames = fragment(big_request(3, 100, 100), 64);
        assert!(frames.len() > 3);
        assert!(frames.iter().all(|f| f.encoded_len() <= 64));
        assert!(matches!(frames[0].body, Body::RequestStream { follows: true, initial_n: 7, .. }));
        for f in &frames[1..] {
            assert!(matches!(f.body, Body::Payload { next: true, .. }));
        }
        assert!(!frames.last().unwrap().follows());
        assert!(frames[..frames.len() - 1].iter().all(Frame::follows));
        // metadata strictly before data
        let mut seen_data = false;
        for f in &frames {
            let p = f.payload().unwrap();
            assert!(!(seen_data && p.metadata.as_ref().is_some_and(|m| !m.is_empty())));
            seen_data |= !p.data.is_empty();
        }
        assert_eq!(reassemble(frames), vec![big_request(3, 100, 100)]);
    }

    #[test]
    fn small_and_unfragmentable_frames_pass() {
        let small = big_request(1, 1, 1);
        assert_eq!(fragment(small.clone(), 64), vec![small.clone()]);
        let mut r = Reassembler::new(10, 10);
        assert_eq!(r.feed(small.clone()), Ok(Some(small)));
        let err = Frame::error(0, crate::rsocket::frame::ErrorCode::CONNECTION_ERROR, "x".repeat(100));
        assert_eq!(fragment(err.clone(), 64), vec![err]);
    }

    #[test]
    fn bounds_are_enforced() {
        let frames = fragment(big_request(1, 0, 500), 64);
        let mut r = Reassembler::new(200, 10_000);
        let mut result = Ok(None);
        for f in frames {
            result = r.feed(f);
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(FragmentError::TooLarge { stream_id: 1, max: 200, .. })));
        assert_eq!(r.buffered(), 0);

        // two streams each within the per-stream bound but together over the connection bound
        let mut r = Reassembler::new(1000, 700);
        for f in fragment(big_request(1, 0, 500), 200).into_iter().take(2) {
            assert_eq!(r.feed(f), Ok(None));
        }
        let mut second = fragment(big_request(3, 0, 500), 200).into_iter();
        assert_eq!(r.feed(second.next().unwrap()), Ok(None));
        assert!(matches!(r.feed(second.next().unwrap()), Err(FragmentError::TooLarge { stream_id: 3, .. })));
        assert!(r.buffered() > 0);
        r.cancel(1);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn cancel_and_interruptions() {
        let mut frames = fragment(big_request(5, 10, 200), 64).into_iter();
        let mut r = Reassembler::new(1000, 10_000);
        assert_eq!(r.feed(frames.next().unwrap()), Ok(None));
        let cancel = Frame::new(5, Body::Cancel);
        assert_eq!(r.feed(cancel.clone()), Ok(Some(cancel)));
        assert_eq!(r.buffered(), 0);
        // a later fragment with F set now opens a new partial, as a fragmented PAYLOAD would
        assert_eq!(r.feed(frames.next().unwrap()), Ok(None));
        r.cancel(5);
        assert_eq!(r.buffered(), 0);

        let mut r = Reassembler::new(1000, 10_000);
        let mut frames = fragment(big_request(7, 10, 200), 64).into_iter();
        assert_eq!(r.feed(frames.next().unwrap()), Ok(None));
        let request_n = Frame::new(7, Body::RequestN { n: 3 });
        assert_eq!(r.feed(request_n.clone()), Ok(Some(request_n)));
        assert_eq!(
            r.feed(big_request(7, 1, 1)),
            Err(FragmentError::Interrupted { stream_id: 7, kind: "REQUEST_STREAM" })
        );
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn plain_payload_without_partial_passes() {
        let mut r = Reassembler::new(10, 10);
        let p = Frame::new(
            2,
            Body::Payload { follows: false, complete: true, next: true, payload: Payload::default() },
        );
        assert_eq!(r.feed(p.clone()), Ok(Some(p)));
    }

    /// A REQUEST_STREAM of 90 bytes of metadata and 100 of data fragmented by the Python `rsocket`
    /// 0.4.20 package (`to_request_stream_frame(3, ..., fragment_size_bytes=64, initial_request_n=5)`,
    /// `get_next_fragment` until None): its continuation PAYLOADs carry N, the last has no F.
    const PY_FRAGMENTS: &str = concat!(
        "000040000000031980000000050000334d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d",
        "4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d0000400000000329a00000274d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d",
        "4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d000102030405060708090a0b0c0d0e0f00003d0000000328a010",
        "1112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40",
        "4142434445460000230000000328204748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f60616263"
    );

    #[test]
    fn reassembles_python_fragments() {
        use tokio_util::codec::Decoder;
        let bytes: Vec<u8> = PY_FRAGMENTS
            .as_bytes()
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect();
        let mut buf = BytesMut::from(&bytes[..]);
        let mut codec = crate::rsocket::frame::FrameCodec::default();
        let mut frames = Vec::new();
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            frames.push(f);
        }
        assert_eq!(frames.len(), 4);
        assert!(matches!(frames[1].body, Body::Payload { follows: true, next: true, complete: false, .. }));
        let whole = Frame::new(
            3,
            Body::RequestStream {
                follows: false,
                initial_n: 5,
                payload: Payload {
                    metadata: Some(Bytes::from(vec![b'M'; 90])),
                    data: Bytes::from((0u8..100).collect::<Vec<u8>>()),
                },
            },
        );
        assert_eq!(reassemble(frames), vec![whole]);
    }

    proptest! {
        #[test]
        fn fragment_then_reassemble_is_identity(frame in frame_strategy(), mtu in 64usize..200) {
            // Frames that are already fragments do not round-trip through a second fragmentation.
            prop_assume!(!frame.follows());
            let frames = fragment(frame.clone(), mtu);
            for f in &frames {
                prop_assert!(f.encoded_len() <= mtu || frames.len() == 1);
            }
            prop_assert_eq!(reassemble(frames), vec![frame]);
        }

        #[test]
        fn big_frames_round_trip(meta in proptest::option::of(0usize..3000), data in 0usize..3000, mtu in 64usize..1000) {
            let mut frame = big_request(9, 0, data);
            frame.payload_mut().unwrap().metadata = meta.map(|n| Bytes::from(vec![1u8; n]));
            let frames = fragment(frame.clone(), mtu);
            prop_assert!(frames.iter().all(|f| f.encoded_len() <= mtu));
            prop_assert_eq!(reassemble(frames), vec![frame]);
        }
    }
}
