//! RSocket 1.0 frames (Protocol.md, "Framing" and "Frame Types"): a typed [`Frame`], a zero-copy
//! [`decode`] of one frame's bytes, an encoder that hands back the data part so it can be written without
//! copying, and a [`FrameCodec`] for the 24-bit length-prefixed byte stream used over TCP. Everything here
//! is a pure function of its input; a decoder of outside bytes never panics and never allocates more than
//! the bytes it was given.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Largest frame the 24-bit TCP length prefix allows.
pub const MAX_FRAME_LEN: usize = 0xFF_FFFF;

/// Length of the frame header: stream id (4) + type and flags (2).
const HEADER_LEN: usize = 6;
/// Largest value of a 24-bit length field.
const MAX_U24: usize = 0xFF_FFFF;
const MASK_31: u32 = 0x7FFF_FFFF;
const MASK_63: u64 = 0x7FFF_FFFF_FFFF_FFFF;

const TYPE_SETUP: u8 = 0x01;
const TYPE_LEASE: u8 = 0x02;
const TYPE_KEEPALIVE: u8 = 0x03;
const TYPE_REQUEST_RESPONSE: u8 = 0x04;
const TYPE_REQUEST_FNF: u8 = 0x05;
const TYPE_REQUEST_STREAM: u8 = 0x06;
const TYPE_REQUEST_CHANNEL: u8 = 0x07;
const TYPE_REQUEST_N: u8 = 0x08;
const TYPE_CANCEL: u8 = 0x09;
const TYPE_PAYLOAD: u8 = 0x0A;
const TYPE_ERROR: u8 = 0x0B;
const TYPE_METADATA_PUSH: u8 = 0x0C;
const TYPE_RESUME: u8 = 0x0D;
const TYPE_RESUME_OK: u8 = 0x0E;
const TYPE_EXT: u8 = 0x3F;

const FLAG_IGNORE: u16 = 0x200;
const FLAG_METADATA: u16 = 0x100;
const FLAG_FOLLOWS: u16 = 0x80;
const FLAG_RESUME: u16 = 0x80;
const FLAG_RESPOND: u16 = 0x80;
const FLAG_LEASE: u16 = 0x40;
const FLAG_COMPLETE: u16 = 0x40;
const FLAG_NEXT: u16 = 0x20;

/// Metadata and data of a request, a response or a SETUP.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Payload {
    /// `None` when the M flag is clear; `Some(empty)` is a present but empty metadata.
    pub metadata: Option<Bytes>,
    pub data: Bytes,
}

impl Payload {
    fn encoded_len(&self) -> usize {
        self.metadata.as_ref().map_or(0, |m| 3 + m.len()) + self.data.len()
    }
}

/// An ERROR frame's error code (Protocol.md, "Error Codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    pub const INVALID_SETUP: ErrorCode = ErrorCode(0x0000_0001);
    pub const UNSUPPORTED_SETUP: ErrorCode = ErrorCode(0x0000_0002);
    pub const REJECTED_SETUP: ErrorCode = ErrorCode(0x0000_0003);
    pub const REJECTED_RESUME: ErrorCode = ErrorCode(0x0000_0004);
    pub const CONNECTION_ERROR: ErrorCode = ErrorCode(0x0000_0101);
    pub const CONNECTION_CLOSE: ErrorCode = ErrorCode(0x0000_0102);
    pub const APPLICATION_ERROR: ErrorCode = ErrorCode(0x0000_0201);
    pub const REJECTED: ErrorCode = ErrorCode(0x0000_0202);
    pub const CANCELED: ErrorCode = ErrorCode(0x0000_0203);
    pub const INVALID: ErrorCode = ErrorCode(0x0000_0204);

    /// The spec's name of the code; codes the spec leaves to applications are "APPLICATION_DEFINED".
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::INVALID_SETUP => "INVALID_SETUP",
            ErrorCode::UNSUPPORTED_SETUP => "UNSUPPORTED_SETUP",
            ErrorCode::REJECTED_SETUP => "REJECTED_SETUP",
            ErrorCode::REJECTED_RESUME => "REJECTED_RESUME",
            ErrorCode::CONNECTION_ERROR => "CONNECTION_ERROR",
            ErrorCode::CONNECTION_CLOSE => "CONNECTION_CLOSE",
            ErrorCode::APPLICATION_ERROR => "APPLICATION_ERROR",
            ErrorCode::REJECTED => "REJECTED",
            ErrorCode::CANCELED => "CANCELED",
            ErrorCode::INVALID => "INVALID",
            ErrorCode(0x0301..=0xFFFF_FFFE) => "APPLICATION_DEFINED",
            _ => "RESERVED",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:X})", self.name(), self.0)
    }
}

/// The SETUP frame's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    pub major: u16,
    pub minor: u16,
    /// The L flag: the client will honor LEASE.
    pub lease: bool,
    pub keepalive_ms: u32,
    pub lifetime_ms: u32,
    /// Present exactly when the R (resume enable) flag is set.
    pub resume_token: Option<Bytes>,
    pub metadata_mime: String,
    pub data_mime: String,
    pub payload: Payload,
}

/// Everything of a frame but its stream id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Setup(Setup),
    Lease {
        ttl_ms: u32,
        requests: u32,
        metadata: Option<Bytes>,
    },
    Keepalive {
        respond: bool,
        last_position: u64,
        data: Bytes,
    },
    RequestResponse {
        follows: bool,
        payload: Payload,
    },
    RequestFnf {
        follows: bool,
        payload: Payload,
    },
    RequestStream {
        follows: bool,
        initial_n: u32,
        payload: Payload,
    },
    RequestChannel {
        follows: bool,
        complete: bool,
        initial_n: u32,
        payload: Payload,
    },
    RequestN {
        n: u32,
    },
    Cancel,
    Payload {
        follows: bool,
        complete: bool,
        next: bool,
        payload: Payload,
    },
    /// The error data is decoded as UTF-8 lossily: it is a message for people and logs.
    Error {
        code: ErrorCode,
        message: String,
    },
    MetadataPush {
        metadata: Bytes,
    },
    Resume {
        major: u16,
        minor: u16,
        token: Bytes,
        last_received_server_position: u64,
        first_available_client_position: u64,
    },
    ResumeOk {
        last_received_client_position: u64,
    },
    Ext {
        ignore: bool,
        extended_type: u32,
        payload: Payload,
    },
}

/// One RSocket frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// 31 bits; the top bit is dropped on the wire.
    pub stream_id: u32,
    pub body: Body,
}

impl Frame {
    pub fn new(stream_id: u32, body: Body) -> Frame {
        Frame { stream_id, body }
    }

    pub fn error(stream_id: u32, code: ErrorCode, message: impl Into<String>) -> Frame {
        Frame { stream_id, body: Body::Error { code, message: message.into() } }
    }

    /// The payload of SETUP, request, PAYLOAD and EXT frames.
    pub fn payload(&self) -> Option<&Payload> {
        match &self.body {
            Body::Setup(Setup { payload, .. })
            | Body::RequestResponse { payload, .. }
            | Body::RequestFnf { payload, .. }
            | Body::RequestStream { payload, .. }
            | Body::RequestChannel { payload, .. }
            | Body::Payload { payload, .. }
            | Body::Ext { payload, .. } => Some(payload),
            _ => None,
        }
    }

    pub fn payload_mut(&mut self) -> Option<&mut Payload> {
        match &mut self.body {
            Body::Setup(Setup { payload, .. })
            | Body::RequestResponse { payload, .. }
            | Body::RequestFnf { payload, .. }
            | Body::RequestStream { payload, .. }
            | Body::RequestChannel { payload, .. }
            | Body::Payload { payload, .. }
            | Body::Ext { payload, .. } => Some(payload),
            _ => None,
        }
    }

    /// The F flag: more fragments of this request or payload follow.
    pub fn follows(&self) -> bool {
        match self.body {
            Body::RequestResponse { follows, .. }
            | Body::RequestFnf { follows, .. }
            | Body::RequestStream { follows, .. }
            | Body::RequestChannel { follows, .. }
            | Body::Payload { follows, .. } => follows,
            _ => false,
        }
    }

    /// The spec's name of the frame type, for logs and errors.
    pub fn kind(&self) -> &'static str {
        type_name(self.frame_type())
    }

    fn frame_type(&self) -> u8 {
        match self.body {
            Body::Setup(_) => TYPE_SETUP,
            Body::Lease { .. } => TYPE_LEASE,
            Body::Keepalive { .. } => TYPE_KEEPALIVE,
            Body::RequestResponse { .. } => TYPE_REQUEST_RESPONSE,
            Body::RequestFnf { .. } => TYPE_REQUEST_FNF,
            Body::RequestStream { .. } => TYPE_REQUEST_STREAM,
            Body::RequestChannel { .. } => TYPE_REQUEST_CHANNEL,
            Body::RequestN { .. } => TYPE_REQUEST_N,
            Body::Cancel => TYPE_CANCEL,
            Body::Payload { .. } => TYPE_PAYLOAD,
            Body::Error { .. } => TYPE_ERROR,
            Body::MetadataPush { .. } => TYPE_METADATA_PUSH,
            Body::Resume { .. } => TYPE_RESUME,
            Body::ResumeOk { .. } => TYPE_RESUME_OK,
            Body::Ext { .. } => TYPE_EXT,
        }
    }

    fn flags(&self) -> u16 {
        fn bit(set: bool, flag: u16) -> u16 {
            if set { flag } else { 0 }
        }
        let metadata = |p: &Payload| bit(p.metadata.is_some(), FLAG_METADATA);
        match &self.body {
            Body::Setup(s) => {
                metadata(&s.payload) | bit(s.resume_token.is_some(), FLAG_RESUME) | bit(s.lease, FLAG_LEASE)
            }
            Body::Lease { metadata, .. } => bit(metadata.is_some(), FLAG_METADATA),
            Body::Keepalive { respond, .. } => bit(*respond, FLAG_RESPOND),
            Body::RequestResponse { follows, payload }
            | Body::RequestFnf { follows, payload }
            | Body::RequestStream { follows, payload, .. } => metadata(payload) | bit(*follows, FLAG_FOLLOWS),
            Body::RequestChannel { follows, complete, payload, .. } => {
                metadata(payload) | bit(*follows, FLAG_FOLLOWS) | bit(*complete, FLAG_COMPLETE)
            }
            Body::Payload { follows, complete, next, payload } => {
                metadata(payload)
                    | bit(*follows, FLAG_FOLLOWS)
                    | bit(*complete, FLAG_COMPLETE)
                    | bit(*next, FLAG_NEXT)
            }
            Body::MetadataPush { .. } => FLAG_METADATA,
            Body::Ext { ignore, payload, .. } => metadata(payload) | bit(*ignore, FLAG_IGNORE),
            Body::RequestN { .. } | Body::Cancel | Body::Error { .. } | Body::Resume { .. } => 0,
            Body::ResumeOk { .. } => 0,
        }
    }

    /// Frame length without the 3-byte length prefix.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match &self.body {
                Body::Setup(s) => {
                    12 + s.resume_token.as_ref().map_or(0, |t| 2 + t.len().min(u16::MAX as usize))
                        + 1
                        + s.metadata_mime.len().min(u8::MAX as usize)
                        + 1
                        + s.data_mime.len().min(u8::MAX as usize)
                        + s.payload.encoded_len()
                }
                Body::Lease { metadata, .. } => 8 + metadata.as_ref().map_or(0, Bytes::len),
                Body::Keepalive { data, .. } => 8 + data.len(),
                Body::RequestResponse { payload, .. } | Body::RequestFnf { payload, .. } => {
                    payload.encoded_len()
                }
                Body::RequestStream { payload, .. }
                | Body::RequestChannel { payload, .. }
                | Body::Ext { payload, .. } => 4 + payload.encoded_len(),
                Body::RequestN { .. } => 4,
                Body::Cancel => 0,
                Body::Payload { payload, .. } => payload.encoded_len(),
                Body::Error { message, .. } => 4 + message.len(),
                Body::MetadataPush { metadata } => metadata.len(),
                Body::Resume { token, .. } => 4 + 2 + token.len().min(u16::MAX as usize) + 16,
                Body::ResumeOk { .. } => 8,
            }
    }
}

fn type_name(frame_type: u8) -> &'static str {
    match frame_type {
        TYPE_SETUP => "SETUP",
        TYPE_LEASE => "LEASE",
        TYPE_KEEPALIVE => "KEEPALIVE",
        TYPE_REQUEST_RESPONSE => "REQUEST_RESPONSE",
        TYPE_REQUEST_FNF => "REQUEST_FNF",
        TYPE_REQUEST_STREAM => "REQUEST_STREAM",
        TYPE_REQUEST_CHANNEL => "REQUEST_CHANNEL",
        TYPE_REQUEST_N => "REQUEST_N",
        TYPE_CANCEL => "CANCEL",
        TYPE_PAYLOAD => "PAYLOAD",
        TYPE_ERROR => "ERROR",
        TYPE_METADATA_PUSH => "METADATA_PUSH",
        TYPE_RESUME => "RESUME",
        TYPE_RESUME_OK => "RESUME_OK",
        TYPE_EXT => "EXT",
        _ => "UNKNOWN",
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("{kind} frame of {len} bytes is too short")]
    TooShort { kind: &'static str, len: usize },
    #[error("unknown frame type 0x{0:02X} without the IGNORE flag")]
    UnknownType(u8),
    #[error("{kind} frame on stream {stream_id}, which that frame type may not use")]
    InvalidStreamId { kind: &'static str, stream_id: u32 },
    #[error("{kind} frame declares {len} bytes of metadata but only {available} follow")]
    MetadataLength { kind: &'static str, len: usize, available: usize },
    #[error("SETUP frame's MIME type {mime:?} is not UTF-8")]
    NonUtf8Mime { mime: String },
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
}

impl DecodeError {
    /// The error code of the ERROR frame a receiver sends back before closing the connection: a
    /// malformed SETUP is INVALID_SETUP, anything else CONNECTION_ERROR.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::NonUtf8Mime { .. } => ErrorCode::INVALID_SETUP,
            DecodeError::TooShort { kind: "SETUP", .. }
            | DecodeError::InvalidStreamId { kind: "SETUP", .. }
            | DecodeError::MetadataLength { kind: "SETUP", .. } => ErrorCode::INVALID_SETUP,
            _ => ErrorCode::CONNECTION_ERROR,
        }
    }
}

/// Reads fields off a frame, checking the length before every read so outside bytes cannot make it
/// panic; slices share the frame's buffer.
struct Reader {
    buf: Bytes,
    kind: &'static str,
    frame_len: usize,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::TooShort { kind: self.kind, len: self.frame_len })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u24(&mut self) -> Result<usize, DecodeError> {
        self.need(3)?;
        Ok(self.buf.get_uint(3) as usize)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u31(&mut self) -> Result<u32, DecodeError> {
        Ok(self.u32()? & MASK_31)
    }
    fn u63(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_u64() & MASK_63)
    }
    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    fn mime(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u8()?);
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| DecodeError::NonUtf8Mime { mime: String::from_utf8_lossy(&raw).into_owned() })
    }
    /// Metadata (with its 24-bit length when the M flag is set) followed by data to the end.
    fn payload(&mut self, has_metadata: bool) -> Result<Payload, DecodeError> {
        let metadata = if has_metadata {
            let len = self.u24()?;
            let available = self.buf.remaining();
            if len > available {
                return Err(DecodeError::MetadataLength { kind: self.kind, len, available });
            }
            Some(self.buf.split_to(len))
        } else {
            None
        };
        Ok(Payload { metadata, data: self.rest() })
    }
}

/// Decodes one frame (bytes after the 24-bit length prefix). Zero-copy: metadata and data are slices of
/// `frame`. `Ok(None)` means an unknown frame type with the IGNORE flag set, or a malformed frame with
/// the IGNORE flag set, which the spec lets a receiver skip.
pub fn decode(frame: Bytes) -> Result<Option<Frame>, DecodeError> {
    let frame_len = frame.len();
    if frame_len < HEADER_LEN {
        return Err(DecodeError::TooShort { kind: "UNKNOWN", len: frame_len });
    }
    let mut r = Reader { buf: frame, kind: "UNKNOWN", frame_len };
    let stream_id = r.u32()? & MASK_31;
    let type_and_flags = r.u16()?;
    let frame_type = (type_and_flags >> 10) as u8;
    let flags = type_and_flags & 0x3FF;
    let ignore = flags & FLAG_IGNORE != 0;
    r.kind = type_name(frame_type);
    match decode_body(&mut r, frame_type, flags, stream_id) {
        Ok(Some(body)) => Ok(Some(Frame { stream_id, body })),
        Ok(None) if ignore => Ok(None),
        Ok(None) => Err(DecodeError::UnknownType(frame_type)),
        // "the receiver MUST send an ERROR[CONNECTION_ERROR] ... unless the frame's IGNORE flag is set"
        Err(DecodeError::TooShort { .. } | DecodeError::MetadataLength { .. }) if ignore => Ok(None),
        Err(e) => Err(e),
    }
}

/// `Ok(None)` for an unknown frame type.
fn decode_body(
    r: &mut Reader,
    frame_type: u8,
    flags: u16,
    stream_id: u32,
) -> Result<Option<Body>, DecodeError> {
    let has = |flag: u16| flags & flag != 0;
    let connection_only = matches!(
        frame_type,
        TYPE_SETUP | TYPE_LEASE | TYPE_KEEPALIVE | TYPE_METADATA_PUSH | TYPE_RESUME | TYPE_RESUME_OK
    );
    let stream_only = matches!(
        frame_type,
        TYPE_REQUEST_RESPONSE
            | TYPE_REQUEST_FNF
            | TYPE_REQUEST_STREAM
            | TYPE_REQUEST_CHANNEL
            | TYPE_REQUEST_N
            | TYPE_CANCEL
            | TYPE_PAYLOAD
    );
    if (connection_only && stream_id != 0) || (stream_only && stream_id == 0) {
        return Err(DecodeError::InvalidStreamId { kind: r.kind, stream_id });
    }
    let body = match frame_type {
        TYPE_SETUP => {
            let major = r.u16()?;
            let minor = r.u16()?;
            let keepalive_ms = r.u31()?;
            let lifetime_ms = r.u31()?;
            let resume_token = if has(FLAG_RESUME) {
                let len = usize::from(r.u16()?);
                Some(r.take(len)?)
            } else {
                None
            };
            let metadata_mime = r.mime()?;
            let data_mime = r.mime()?;
            let payload = r.payload(has(FLAG_METADATA))?;
            Body::Setup(Setup {
                major,
                minor,
                lease: has(FLAG_LEASE),
                keepalive_ms,
                lifetime_ms,
                resume_token,
                metadata_mime,
                data_mime,
                payload,
            })
        }
        TYPE_LEASE => {
            let ttl_ms = r.u31()?;
            let requests = r.u31()?;
            // LEASE carries only metadata, so there is no metadata length field.
            let metadata = has(FLAG_METADATA).then(|| r.rest());
            Body::Lease { ttl_ms, requests, metadata }
        }
        TYPE_KEEPALIVE => {
            let last_position = r.u63()?;
            Body::Keepalive { respond: has(FLAG_RESPOND), last_position, data: r.rest() }
        }
        TYPE_REQUEST_RESPONSE => {
            Body::RequestResponse { follows: has(FLAG_FOLLOWS), payload: r.payload(has(FLAG_METADATA))? }
        }
        TYPE_REQUEST_FNF => {
            Body::RequestFnf { follows: has(FLAG_FOLLOWS), payload: r.payload(has(FLAG_METADATA))? }
        }
        TYPE_REQUEST_STREAM => {
            let initial_n = r.u31()?;
            Body::RequestStream {
                follows: has(FLAG_FOLLOWS),
                initial_n,
                payload: r.payload(has(FLAG_METADATA))?,
            }
        }
        TYPE_REQUEST_CHANNEL => {
            let initial_n = r.u31()?;
            Body::RequestChannel {
                follows: has(FLAG_FOLLOWS),
                complete: has(FLAG_COMPLETE),
                initial_n,
                payload: r.payload(has(FLAG_METADATA))?,
            }
        }
        TYPE_REQUEST_N => Body::RequestN { n: r.u31()? },
        TYPE_CANCEL => Body::Cancel,
        TYPE_PAYLOAD => Body::Payload {
            follows: has(FLAG_FOLLOWS),
            complete: has(FLAG_COMPLETE),
            next: has(FLAG_NEXT),
            payload: r.payload(has(FLAG_METADATA))?,
        },
        TYPE_ERROR => {
            let code = ErrorCode(r.u32()?);
            Body::Error { code, message: String::from_utf8_lossy(&r.rest()).into_owned() }
        }
        // METADATA_PUSH carries only metadata, so there is no metadata length field.
        TYPE_METADATA_PUSH => Body::MetadataPush { metadata: r.rest() },
        TYPE_RESUME => {
            let major = r.u16()?;
            let minor = r.u16()?;
            let len = usize::from(r.u16()?);
            let token = r.take(len)?;
            Body::Resume {
                major,
                minor,
                token,
                last_received_server_position: r.u63()?,
                first_available_client_position: r.u63()?,
            }
        }
        TYPE_RESUME_OK => Body::ResumeOk { last_received_client_position: r.u63()? },
        TYPE_EXT => {
            let extended_type = r.u31()?;
            Body::Ext { ignore: has(FLAG_IGNORE), extended_type, payload: r.payload(has(FLAG_METADATA))? }
        }
        _ => return Ok(None),
    };
    Ok(Some(body))
}

fn put_u24(out: &mut BytesMut, n: usize) {
    out.put_uint((n & MAX_U24) as u64, 3);
}

/// Metadata with its length field; the data is left to the caller.
fn put_payload_head(out: &mut BytesMut, payload: &Payload) {
    if let Some(metadata) = &payload.metadata {
        put_u24(out, metadata.len());
        out.put_slice(metadata);
    }
}

/// Strings and tokens longer than their length field are cut so the frame stays well-formed;
/// `encoded_len` counts the same way.
fn put_short_bytes(out: &mut BytesMut, bytes: &[u8]) {
    let len = bytes.len().min(usize::from(u8::MAX));
    out.put_u8(len as u8);
    out.put_slice(bytes.get(..len).unwrap_or_default());
}

fn put_token(out: &mut BytesMut, token: &[u8]) {
    let len = token.len().min(usize::from(u16::MAX));
    out.put_u16(len as u16);
    out.put_slice(token.get(..len).unwrap_or_default());
}

/// Writes the 24-bit length prefix, header and everything except the data of a frame that has a
/// payload, and returns that data so the caller can write it without copying (vectored write). For
/// frames without a payload data part it returns an empty `Bytes`.
///
/// The caller must keep `frame.encoded_len()` within [`MAX_FRAME_LEN`] (the [`FrameCodec`] encoder
/// checks; [`super::fragment::fragment`] splits larger frames): the prefix cannot say more.
pub fn encode_head(frame: &Frame, out: &mut BytesMut) -> Bytes {
    let len = frame.encoded_len();
    let data = frame.payload().map(|p| p.data.clone()).unwrap_or_default();
    out.reserve(3 + len - data.len());
    put_u24(out, len);
    out.put_u32(frame.stream_id & MASK_31);
    out.put_u16((u16::from(frame.frame_type()) << 10) | frame.flags());
    match &frame.body {
        Body::Setup(s) => {
            out.put_u16(s.major);
            out.put_u16(s.minor);
            out.put_u32(s.keepalive_ms & MASK_31);
            out.put_u32(s.lifetime_ms & MASK_31);
            if let Some(token) = &s.resume_token {
                put_token(out, token);
            }
            put_short_bytes(out, s.metadata_mime.as_bytes());
            put_short_bytes(out, s.data_mime.as_bytes());
            put_payload_head(out, &s.payload);
        }
        Body::Lease { ttl_ms, requests, metadata } => {
            out.put_u32(ttl_ms & MASK_31);
            out.put_u32(requests & MASK_31);
            if let Some(metadata) = metadata {
                out.put_slice(metadata);
            }
        }
        Body::Keepalive { last_position, data, .. } => {
            out.put_u64(last_position & MASK_63);
            out.put_slice(data);
        }
        Body::RequestResponse { payload, .. } | Body::RequestFnf { payload, .. } => {
            put_payload_head(out, payload);
        }
        Body::RequestStream { initial_n, payload, .. } | Body::RequestChannel { initial_n, payload, .. } => {
            out.put_u32(initial_n & MASK_31);
            put_payload_head(out, payload);
        }
        Body::RequestN { n } => out.put_u32(n & MASK_31),
        Body::Cancel => {}
        Body::Payload { payload, .. } => put_payload_head(out, payload),
        Body::Error { code, message } => {
            out.put_u32(code.0);
            out.put_slice(message.as_bytes());
        }
        Body::MetadataPush { metadata } => out.put_slice(metadata),
        Body::Resume {
            major,
            minor,
            token,
            last_received_server_position,
            first_available_client_position,
        } => {
            out.put_u16(*major);
            out.put_u16(*minor);
            put_token(out, token);
            out.put_u64(last_received_server_position & MASK_63);
            out.put_u64(first_available_client_position & MASK_63);
        }
        Body::ResumeOk { last_received_client_position } => {
            out.put_u64(last_received_client_position & MASK_63)
        }
        Body::Ext { extended_type, payload, .. } => {
            out.put_u32(extended_type & MASK_31);
            put_payload_head(out, payload);
        }
    }
    data
}

/// [`encode_head`] with the data appended: the whole frame with its length prefix.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let data = encode_head(frame, out);
    out.extend_from_slice(&data);
}

/// The 24-bit length-prefixed frame stream of TCP, as a tokio codec.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    max_frame_len: usize,
}

impl FrameCodec {
    /// `max_frame_len` bounds incoming frames (without the prefix); it is capped at [`MAX_FRAME_LEN`].
    pub fn new(max_frame_len: usize) -> Self {
        FrameCodec { max_frame_len: max_frame_len.min(MAX_FRAME_LEN) }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(MAX_FRAME_LEN)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        // Loops so that ignorable frames are skipped without waiting for more input.
        loop {
            let Some(prefix) = src.get(..3) else {
                return Ok(None);
            };
            let len = prefix.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b));
            if len > self.max_frame_len {
                return Err(DecodeError::FrameTooLarge { len, max: self.max_frame_len }.into());
            }
            if src.len() < 3 + len {
                // `len` was checked against the limit just above, so this reservation is bounded.
                src.reserve(3 + len - src.len());
                return Ok(None);
            }
            src.advance(3);
            let bytes = src.split_to(len).freeze();
            if let Some(frame) = decode(bytes)? {
                return Ok(Some(frame));
            }
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    /// Frames above the wire limit are refused rather than sent with a wrong length prefix.
    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = frame.encoded_len();
        if len > MAX_FRAME_LEN {
            return Err(DecodeError::FrameTooLarge { len, max: MAX_FRAME_LEN }.into());
        }
        encode(frame, dst);
        Ok(())
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Encoder::<&Frame>::encode(self, &frame, dst)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(frame: &Frame) -> BytesMut {
        let mut out = BytesMut::new();
        encode(frame, &mut out);
        out
    }

    fn roundtrip(frame: &Frame) -> Frame {
        let mut out = encoded(frame);
        assert_eq!(out.len(), 3 + frame.encoded_len(), "{frame:?}");
        let mut codec = FrameCodec::default();
        let decoded = codec.decode(&mut out).expect("decodes").expect("complete");
        assert!(out.is_empty());
        decoded
    }

    fn bytes_strategy(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn payload_strategy() -> impl Strategy<Value = Payload> {
        (proptest::option::of(bytes_strategy(64)), bytes_strategy(64))
            .prop_map(|(metadata, data)| Payload { metadata, data })
    }

    pub(crate) fn frame_strategy() -> impl Strategy<Value = Frame> {
        let stream = 1..=MASK_31;
        let u31 = 0..=MASK_31;
        let u63 = 0..=MASK_63;
        prop_oneof![
            (
                any::<(u16, u16, bool)>(),
                (u31.clone(), u31.clone()),
                proptest::option::of(bytes_strategy(20)),
                "[a-z/.+-]{0,40}",
                "[a-z/.+-]{0,40}",
                payload_strategy()
            )
                .prop_map(
                    |((major, minor, lease), (keepalive_ms, lifetime_ms), resume_token, m, d, payload)| {
                        Frame::new(
                            0,
                            Body::Setup(Setup {
                                major,
                                minor,
                                lease,
                                keepalive_ms,
                                lifetime_ms,
                                resume_token,
                                metadata_mime: m,
                                data_mime: d,
                                payload,
                            }),
                        )
                    }
                ),
            (u31.clone(), u31.clone(), proptest::option::of(bytes_strategy(32))).prop_map(
                |(ttl_ms, requests, metadata)| Frame::new(0, Body::Lease { ttl_ms, requests, metadata })
            ),
            (any::<bool>(), u63.clone(), bytes_strategy(32)).prop_map(|(respond, last_position, data)| {
                Frame::new(0, Body::Keepalive { respond, last_position, data })
            }),
            (stream.clone(), any::<bool>(), payload_strategy())
                .prop_map(|(s, follows, payload)| Frame::new(s, Body::RequestResponse { follows, payload })),
            (stream.clone(), any::<bool>(), payload_strategy())
                .prop_map(|(s, follows, payload)| Frame::new(s, Body::RequestFnf { follows, payload })),
            (stream.clone(), any::<bool>(), u31.clone(), payload_strategy()).prop_map(
                |(s, follows, initial_n, payload)| Frame::new(
                    s,
                    Body::RequestStream { follows, initial_n, payload }
                )
            ),
            (stream.clone(), any::<(bool, bool)>(), u31.clone(), payload_strategy()).prop_map(
                |(s, (follows, complete), initial_n, payload)| Frame::new(
                    s,
                    Body::RequestChannel { follows, complete, initial_n, payload }
                )
            ),
            (stream.clone(), u31.clone()).prop_map(|(s, n)| Frame::new(s, Body::RequestN { n })),
            stream.clone().prop_map(|s| Frame::new(s, Body::Cancel)),
            (stream.clone(), any::<(bool, bool, bool)>(), payload_strategy()).prop_map(
                |(s, (follows, complete, next), payload)| Frame::new(
                    s,
                    Body::Payload { follows, complete, next, payload }
                )
            ),
            (u31.clone(), any::<u32>(), ".{0,40}").prop_map(|(s, code, message)| Frame::error(
                s,
                ErrorCode(code),
                message
            )),
            bytes_strategy(64).prop_map(|metadata| Frame::new(0, Body::MetadataPush { metadata })),
            (any::<(u16, u16)>(), bytes_strategy(20), u63.clone(), u63.clone()).prop_map(
                |((major, minor), token, a, b)| Frame::new(
                    0,
                    Body::Resume {
                        major,
                        minor,
                        token,
                        last_received_server_position: a,
                        first_available_client_position: b,
                    }
                )
            ),
            u63.prop_map(|p| Frame::new(0, Body::ResumeOk { last_received_client_position: p })),
            (u31.clone(), any::<bool>(), u31, payload_strategy()).prop_map(
                |(s, ignore, extended_type, payload)| Frame::new(
                    s,
                    Body::Ext { ignore, extended_type, payload }
                )
            ),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(frame in frame_strategy()) {
            prop_assert_eq!(roundtrip(&frame), frame);
        }

        #[test]
        fn encode_head_plus_data_is_encode(frame in frame_strategy()) {
            let mut head = BytesMut::new();
            let data = encode_head(&frame, &mut head);
            head.extend_from_slice(&data);
            prop_assert_eq!(head, encoded(&frame));
        }

        #[test]
        fn decode_of_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(Bytes::from(bytes));
        }

        #[test]
        fn decode_of_mutated_frames_never_panics(
            frame in frame_strategy(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
        ) {
            let mut bytes = encoded(&frame).split_off(3).to_vec();
            for (at, x) in flips {
                let n = bytes.len();
                if let Some(b) = bytes.get_mut(at % n) {
                    *b ^= x;
                }
            }
            bytes.truncate(cut % (bytes.len() + 1));
            let _ = decode(Bytes::from(bytes));
        }

        #[test]
        fn codec_over_arbitrary_streams_never_panics(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..10),
            max in 0usize..100,
        ) {
            let mut codec = FrameCodec::new(max);
            let mut buf = BytesMut::new();
            for chunk in chunks {
                buf.extend_from_slice(&chunk);
                while let Ok(Some(_)) = codec.decode(&mut buf) {}
                // Bounded by what the stream held and the largest frame allowed, up to BytesMut's growth by
                // doubling: never by a length prefix beyond `max`.
                prop_assert!(buf.capacity() <= 2 * (3 + 100 + 64 * 10 + 64), "capacity {}", buf.capacity());
            }
        }

        #[test]
        fn codec_splits_a_stream_of_frames(frames in proptest::collection::vec(frame_strategy(), 0..8), step in 1usize..50) {
            let mut wire = BytesMut::new();
            for f in &frames {
                encode(f, &mut wire);
            }
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                buf.extend_from_slice(chunk);
                while let Some(f) = codec.decode(&mut buf).expect("valid stream") {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, frames);
        }
    }

    #[test]
    fn header_layout_matches_the_spec() {
        let frame = Frame::new(
            5,
            Body::Payload {
                follows: true,
                complete: true,
                next: true,
                payload: Payload { metadata: Some(Bytes::from_static(b"m")), data: Bytes::from_static(b"d") },
            },
        );
        // length 11; stream 5; type 0x0A<<10 | M|F|C|N = 0x2800|0x100|0x80|0x40|0x20 = 0x29E0
        assert_eq!(&encoded(&frame)[..], b"\x00\x00\x0b\x00\x00\x00\x05\x29\xe0\x00\x00\x01md");
    }

    #[test]
    fn setup_flags_and_layout() {
        let setup = Frame::new(
            0,
            Body::Setup(Setup {
                major: 1,
                minor: 0,
                lease: true,
                keepalive_ms: 500,
                lifetime_ms: 600_000,
                resume_token: Some(Bytes::from_static(b"tk")),
                metadata_mime: "a".into(),
                data_mime: "b".into(),
                payload: Payload::default(),
            }),
        );
        let bytes = encoded(&setup);
        assert_eq!(
            &bytes[..],
            b"\x00\x00\x1a\x00\x00\x00\x00\x04\xc0\x00\x01\x00\x00\x00\x00\x01\xf4\x00\x09\x27\xc0\x00\x02tk\x01a\x01b"
        );
    }

    #[test]
    fn stream_id_rules() {
        let keepalive = b"\x00\x00\x00\x01\x0c\x80\x00\x00\x00\x00\x00\x00\x00\x00";
        assert_eq!(
            decode(Bytes::from_static(keepalive)),
            Err(DecodeError::InvalidStreamId { kind: "KEEPALIVE", stream_id: 1 })
        );
        let request_n = b"\x00\x00\x00\x00\x20\x00\x00\x00\x00\x01";
        assert_eq!(
            decode(Bytes::from_static(request_n)),
            Err(DecodeError::InvalidStreamId { kind: "REQUEST_N", stream_id: 0 })
        );
        let setup = b"\x00\x00\x00\x03\x04\x00";
        let err = decode(Bytes::from_static(setup)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::INVALID_SETUP);
    }

    #[test]
    fn unknown_types_are_skipped_only_with_ignore() {
        // type 0x20 without and with the I flag
        assert_eq!(
            decode(Bytes::from_static(b"\x00\x00\x00\x00\x80\x00")),
            Err(DecodeError::UnknownType(0x20))
        );
        assert_eq!(decode(Bytes::from_static(b"\x00\x00\x00\x00\x82\x00")), Ok(None));
        let mut codec = FrameCodec::default();
        let mut buf =
            BytesMut::from(&b"\x00\x00\x06\x00\x00\x00\x00\x82\x00\x00\x00\x06\x00\x00\x00\x01\x24\x00"[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::new(1, Body::Cancel)));
    }

    #[test]
    fn metadata_length_is_checked() {
        // REQUEST_FNF with M set, metadata length 5 but 1 byte left
        let bytes = b"\x00\x00\x00\x01\x15\x00\x00\x00\x05x";
        let err = decode(Bytes::from_static(bytes)).unwrap_err();
        assert_eq!(err, DecodeError::MetadataLength { kind: "REQUEST_FNF", len: 5, available: 1 });
        assert_eq!(err.code(), ErrorCode::CONNECTION_ERROR);
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut codec = FrameCodec::new(1000);
        let mut buf = BytesMut::from(&b"\xff\xff\xff\x00"[..]);
        match codec.decode(&mut buf) {
            Err(CodecError::Decode(DecodeError::FrameTooLarge { len: 0xFF_FFFF, max: 1000 })) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.capacity() < 1000);
    }

    #[test]
    fn error_frame_is_lossy_utf8() {
        let bytes = b"\x00\x00\x00\x01\x2c\x00\x00\x00\x02\x01bad\xff";
        let frame = decode(Bytes::from_static(bytes)).unwrap().unwrap();
        assert_eq!(frame, Frame::error(1, ErrorCode::APPLICATION_ERROR, "bad\u{fffd}"));
        assert_eq!(ErrorCode::APPLICATION_ERROR.name(), "APPLICATION_ERROR");
        assert_eq!(ErrorCode(0x1234).name(), "APPLICATION_DEFINED");
    }

    #[test]
    fn decoded_payload_shares_the_input_buffer() {
        let frame = Frame::new(
            1,
            Body::RequestResponse {
                follows: false,
                payload: Payload {
                    metadata: Some(Bytes::from_static(b"meta")),
                    data: Bytes::from_static(b"data"),
                },
            },
        );
        let input = encoded(&frame).split_off(3).freeze();
        let range = input.as_ptr_range();
        let decoded = decode(input.clone()).unwrap().unwrap();
        let data = &decoded.payload().unwrap().data;
        assert!(range.contains(&data.as_ptr()));
    }
}
