//! The kernel log as `/dev/kmsg` hands it out (Documentation/ABI/testing/dev-kmsg): one record per
//! `read()`, `PRI,SEQ,TS_USEC,FLAGS[,more];MESSAGE\n`, then continuation lines ` KEY=VALUE\n` (the
//! record's dictionary: `SUBSYSTEM=block`, `DEVICE=+block:7:0`). Bytes that are not printable, and `\`
//! itself, are written as `\xHH` in the message and the values.
//!
//! [`parse_record`] is pure. [`Reader::read_batch`] drains a [`KmsgDevice`] (the real file, or a fake in
//! tests) until the kernel has nothing more, skipping what a durable cursor says was processed before a
//! restart and counting records the kernel overwrote before they were read (`EPIPE`, and the gap in
//! sequence numbers it leaves). [`run`] is the blocking loop of the reader's own thread: `poll()` on the
//! device and on a stop pipe, so it costs nothing while the log is quiet and never sits on the async
//! runtime.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// A record the kernel cannot have written: the text is quoted (cut to 120 bytes).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("kernel log record {record:?} has no `;` between its prefix and its message")]
    NoMessage { record: String },
    #[error("kernel log record prefix {prefix:?}: {why}")]
    BadPrefix { prefix: String, why: &'static str },
}

/// Why the kernel log cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum KmsgError {
    #[error("cannot open the kernel log {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("the kernel log {path} is not a character device (a kmsg device is)")]
    NotADevice { path: String },
}

/// One kernel log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsgRecord {
    /// Syslog level, 0 (emerg) ..= 7 (debug).
    pub level: u8,
    /// Syslog facility: 0 for the kernel, 1 for user space writing to /dev/kmsg.
    pub facility: u8,
    pub seq: u64,
    /// Microseconds since boot (the kernel's `local_clock`).
    pub ts_usec: u64,
    /// The message, unescaped (invalid UTF-8 replaced).
    pub message: String,
    /// The dictionary, in the order the kernel wrote it.
    pub fields: Vec<(String, String)>,
}

impl KmsgRecord {
    /// The dictionary value of `key` (`SUBSYSTEM`, `DEVICE`).
    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn quoted(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned()
}

/// Undoes the kernel's `\xHH` escaping.
fn unescape(bytes: &[u8]) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && bytes.get(i + 1) == Some(&b'x')
            && let (Some(h), Some(l)) =
                (bytes.get(i + 2).and_then(|&b| hex(b)), bytes.get(i + 3).and_then(|&b| hex(b)))
        {
            out.push(h << 4 | l);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses one record as one `read()` of /dev/kmsg returned it.
pub fn parse_record(bytes: &[u8]) -> Result<KmsgRecord, RecordError> {
    let semi = bytes
        .iter()
        .position(|&b| b == b';')
        .ok_or_else(|| RecordError::NoMessage { record: quoted(bytes) })?;
    let (prefix, rest) = (&bytes[..semi], &bytes[semi + 1..]);
    let bad = |why| RecordError::BadPrefix { prefix: quoted(prefix), why };
    let prefix_text = std::str::from_utf8(prefix).map_err(|_| bad("not ASCII"))?;
    // Further comma-separated fields may follow FLAGS in later kernels: ignored, as the ABI says.
    let mut parts = prefix_text.split(',');
    let number = |part: Option<&str>, what| -> Result<u64, RecordError> {
        part.and_then(|p| p.parse().ok()).ok_or_else(|| bad(what))
    };
    let pri = number(parts.next(), "PRI is not a number")?;
    let seq = number(parts.next(), "SEQ is not a number")?;
    let ts_usec = number(parts.next(), "TS_USEC is not a number")?;
    if parts.next().is_none() {
        return Err(bad("no FLAGS field"));
    }
    // The message ends at the first newline; dictionary lines follow, each starting with a space.
    let (message, dict) = match rest.iter().position(|&b| b == b'\n') {
        Some(nl) => (&rest[..nl], &rest[nl + 1..]),
        None => (rest, &[][..]),
    };
    let fields = dict
        .split(|&b| b == b'\n')
        .filter_map(|line| line.strip_prefix(b" "))
        .filter_map(|line| {
            let eq = line.iter().position(|&b| b == b'=')?;
            Some((unescape(&line[..eq]), unescape(&line[eq + 1..])))
        })
        .collect();
    Ok(KmsgRecord {
        level: (pri & 7) as u8,
        facility: u8::try_from(pri >> 3).unwrap_or(u8::MAX),
        seq,
        ts_usec,
        message: unescape(message),
        fields,
    })
}

/// The wall-clock time of a record stamped `ts_usec` after boot: now minus how long ago that was on the
/// monotonic clock (which, like the kernel's log clock, counts from boot).
pub fn wall_clock_ms(ts_usec: u64, now_unix_ms: u64, monotonic_now_usec: u64) -> u64 {
    now_unix_ms.saturating_sub(monotonic_now_usec.saturating_sub(ts_usec) / 1000)
}

/// The monotonic clock now, in microseconds.
pub fn monotonic_now_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec.max(0) as u64).saturating_mul(1_000_000).saturating_add((t.tv_nsec.max(0) as u64) / 1000)
}

/// Where records come from: the kmsg file (one record per `read`), or a fake.
pub trait KmsgDevice {
    /// One record into `buf`, as `read(2)` on /dev/kmsg: `WouldBlock` when there is none yet, `BrokenPipe`
    /// when records were overwritten since the last read (the next read returns the oldest left).
    fn read_record(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

impl KmsgDevice for File {
    fn read_record(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }
}

/// Room for the largest record the kernel hands out (CONSOLE_EXT_LOG_MAX is 8 KiB) with margin: a smaller
/// buffer makes the read fail with `EINVAL`.
pub const RECORD_BUFFER: usize = 16 * 1024;

/// How a batch ended.
#[derive(Debug)]
pub enum BatchEnd {
    /// Nothing more for now: wait until the device is readable.
    WouldBlock,
    /// A read returned nothing: the file ended (not a kmsg device), so there is nothing to wait for.
    Eof,
    /// The read failed in a way retrying cannot fix (`EINVAL`: a record larger than the buffer; or any
    /// other error).
    Failed(io::Error),
}

/// What one batch brought.
#[derive(Debug)]
pub struct Batch {
    /// New records, oldest first (those at or before the cursor are left out).
    pub records: Vec<KmsgRecord>,
    /// Records the kernel overwrote before they were read (gaps in sequence numbers).
    pub lost: u64,
    /// Records that did not parse, with why.
    pub malformed: Vec<RecordError>,
    /// Records read but skipped as processed before a restart.
    pub skipped: u64,
    /// The last sequence number seen so far (this batch's or an earlier one's): the cursor to keep.
    pub last_seq: Option<u64>,
    pub end: BatchEnd,
}

/// Drains a kmsg device record by record, remembering the last sequence number seen.
#[derive(Debug)]
pub struct Reader {
    /// The last record's sequence number (seen or, after a restart in the same boot, processed before).
    last_seq: Option<u64>,
    /// Records up to this one were processed before a restart.
    skip_through: Option<u64>,
    /// Records read per batch at most, so one batch never holds the whole ring in memory at once.
    max_batch: usize,
}

impl Reader {
    /// A reader that skips records up to `cursor` (the last one processed in this boot, if any).
    pub fn new(cursor: Option<u64>) -> Reader {
        Reader { last_seq: cursor, skip_through: cursor, max_batch: 512 }
    }

    /// The last sequence number seen.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Reads until the device has nothing more (or `max_batch` records were read: then `end` is
    /// `WouldBlock` and the caller reads again at once, as the device is still readable).
    pub fn read_batch(&mut self, dev: &mut dyn KmsgDevice, buf: &mut [u8]) -> Batch {
        let mut batch = Batch {
            records: Vec::new(),
            lost: 0,
            malformed: Vec::new(),
            skipped: 0,
            last_seq: self.last_seq,
            end: BatchEnd::WouldBlock,
        };
        while batch.records.len() < self.max_batch {
            match dev.read_record(buf) {
                Ok(0) => {
                    batch.end = BatchEnd::Eof;
                    return batch;
                }
                Ok(n) => match parse_record(&buf[..n.min(buf.len())]) {
                    Ok(record) => {
                        if let Some(last) = self.last_seq
                            && record.seq > last + 1
                        {
                            batch.lost += record.seq - last - 1;
                        }
                        // A sequence number going back means the log was cleared or restarted: follow it.
                        self.last_seq = Some(record.seq);
                        batch.last_seq = self.last_seq;
                        if self.skip_through.is_some_and(|s| record.seq <= s) {
                            batch.skipped += 1;
                        } else {
                            self.skip_through = None;
                            batch.records.push(record);
                        }
                    }
                    Err(e) => batch.malformed.push(e),
                },
                // Overwritten records: the next read returns the oldest one left, and the gap in sequence
                // numbers says how many were lost.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    batch.end = BatchEnd::WouldBlock;
                    return batch;
                }
                Err(e) => {
                    batch.end = BatchEnd::Failed(e);
                    return batch;
                }
            }
        }
        batch
    }
}

/// Opens the kmsg device for non-blocking reads from its oldest record.
pub fn open(path: &Path) -> Result<File, KmsgError> {
    let shown = || path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| KmsgError::Open { path: shown(), source })?;
    let is_char_device = file
        .metadata()
        .map(|m| m.file_type().is_char_device())
        .map_err(|source| KmsgError::Open { path: shown(), source })?;
    if !is_char_device {
        return Err(KmsgError::NotADevice { path: shown() });
    }
    Ok(file)
}

/// Why [`run`] returned.
#[derive(Debug)]
pub enum Stopped {
    /// The stop pipe's other end was closed.
    Asked,
    /// The device can no longer be read.
    Failed(String),
}

/// The reader thread's loop: drains `file` into `on_batch`, then sleeps in `poll()` until it is readable
/// again or `stop` (a pipe's read end) is closed by its writer.
pub fn run(
    file: &mut File,
    reader: &mut Reader,
    stop: &impl AsFd,
    mut on_batch: impl FnMut(Batch),
) -> Stopped {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut buf = vec![0u8; RECORD_BUFFER];
    loop {
        let batch = reader.read_batch(file, &mut buf);
        let end = match &batch.end {
            BatchEnd::WouldBlock => None,
            BatchEnd::Eof => Some(Stopped::Failed("the kernel log ended (it is not a kmsg device)".into())),
            BatchEnd::Failed(e) => Some(Stopped::Failed(format!("reading the kernel log failed: {e}"))),
        };
        on_batch(batch);
        if let Some(end) = end {
            return end;
        }
        let (readable, asked) = loop {
            let mut fds = [PollFd::new(file, PollFlags::IN), PollFd::new(stop, PollFlags::IN)];
            match poll(&mut fds, None) {
                Ok(_) => break (!fds[0].revents().is_empty(), !fds[1].revents().is_empty()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Stopped::Failed(format!("waiting on the kernel log failed: {e}")),
            }
        };
        if asked {
            return Stopped::Asked;
        }
        debug_assert!(readable);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    #[test]
    fn a_record_with_continuation_lines() {
        let raw = b"6,339,5140900,-;NET: Registered protocol family 10\n SUBSYSTEM=net\n DEVICE=n1\n";
        let r = parse_record(raw).unwrap();
        assert_eq!((r.level, r.facility, r.seq, r.ts_usec), (6, 0, 339, 5_140_900));
        assert_eq!(r.message, "NET: Registered protocol family 10");
        assert_eq!(r.field("SUBSYSTEM"), Some("net"));
        assert_eq!(r.field("DEVICE"), Some("n1"));
        assert_eq!(r.field("MISSING"), None);
    }

    #[test]
    fn the_abi_examples_parse() {
        // Documentation/ABI/testing/dev-kmsg's own examples, and one with a future field after FLAGS.
        let r = parse_record(b"7,160,424069,-;pci_root PNP0A03:00: host bridge window [io  0x0000-0x0cf7] (ignored)\n SUBSYSTEM=acpi\n DEVICE=+acpi:PNP0A03:00\n").unwrap();
        assert_eq!(r.field("DEVICE"), Some("+acpi:PNP0A03:00"));
        let r = parse_record(b"6,339,5140900,-,caller=T1;NET: Registered protocol family 10\n").unwrap();
        assert_eq!(r.message, "NET: Registered protocol family 10");
        // A user-space write: facility 1 (user), level 3.
        let r = parse_record(b"11,12,100,-;vigil test: I/O error, dev loop7\n").unwrap();
        assert_eq!((r.facility, r.level), (1, 3));
    }

    #[test]
    fn escapes_are_undone() {
        let r = parse_record(b"4,1,2,-;tab\\x09here \\x5c back \\xzz kept\n K=a\\x20b\n").unwrap();
        assert_eq!(r.message, "tab\there \\ back \\xzz kept");
        assert_eq!(r.field("K"), Some("a b"));
        // A truncated escape at the end stays as written.
        assert_eq!(parse_record(b"4,1,2,-;end\\x4").unwrap().message, "end\\x4");
    }

    #[test]
    fn malformed_records_say_why() {
        assert_eq!(parse_record(b"garbage"), Err(RecordError::NoMessage { record: "garbage".into() }));
        let e = parse_record(b"x,1,2,-;m").unwrap_err().to_string();
        assert!(e.contains("\"x,1,2,-\"") && e.contains("PRI"), "{e}");
        assert!(parse_record(b"6,1,2;no flags").is_err());
        assert!(parse_record(b"6,-1,2,-;negative seq").is_err());
    }

    #[test]
    fn record_times_become_wall_clock() {
        // Logged 2 s after boot, now is 10 s after boot: 8 s ago.
        assert_eq!(wall_clock_ms(2_000_000, 1_000_000, 10_000_000), 992_000);
        // A stamp "in the future" (clock skew) is now.
        assert_eq!(wall_clock_ms(20_000_000, 1_000_000, 10_000_000), 1_000_000);
        assert!(monotonic_now_usec() > 0);
    }

    /// Plays back reads as a kmsg device would answer them.
    struct Fake(VecDeque<io::Result<Vec<u8>>>);

    impl KmsgDevice for Fake {
        fn read_record(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.pop_front() {
                Some(Ok(bytes)) => {
                    buf[..bytes.len()].copy_from_slice(&bytes);
                    Ok(bytes.len())
                }
                Some(Err(e)) => Err(e),
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    fn rec(seq: u64) -> io::Result<Vec<u8>> {
        Ok(format!("3,{seq},{},-;message {seq}\n", seq * 10).into_bytes())
    }

    fn seqs(b: &Batch) -> Vec<u64> {
        b.records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn overwritten_records_are_counted_as_lost_and_reading_goes_on() {
        let mut dev = Fake(VecDeque::from([
            rec(1),
            rec(2),
            Err(io::Error::from_raw_os_error(libc::EPIPE)),
            rec(7),
            rec(8),
        ]));
        let mut reader = Reader::new(None);
        let mut buf = vec![0; RECORD_BUFFER];
        let b = reader.read_batch(&mut dev, &mut buf);
        assert_eq!(seqs(&b), [1, 2, 7, 8]);
        assert_eq!(b.lost, 4, "records 3..=6 were overwritten");
        assert!(matches!(b.end, BatchEnd::WouldBlock));
        assert_eq!(reader.last_seq(), Some(8));
    }

    #[test]
    fn a_cursor_skips_what_was_processed_and_sees_what_was_lost_meanwhile() {
        let mut buf = vec![0; RECORD_BUFFER];
        let mut reader = Reader::new(Some(5));
        let b = reader.read_batch(&mut Fake(VecDeque::from([rec(3), rec(4), rec(5), rec(6)])), &mut buf);
        assert_eq!((seqs(&b), b.skipped, b.lost), (vec![6], 3, 0));
        // Down while records 6..=9 were overwritten: the ring now starts at 10.
        let mut reader = Reader::new(Some(5));
        let b = reader.read_batch(&mut Fake(VecDeque::from([rec(10), rec(11)])), &mut buf);
        assert_eq!((seqs(&b), b.lost), (vec![10, 11], 4));
    }

    #[test]
    fn malformed_records_and_failures_end_or_continue_as_they_should() {
        let mut buf = vec![0; RECORD_BUFFER];
        let mut reader = Reader::new(None);
        let b = reader.read_batch(
            &mut Fake(VecDeque::from([
                Ok(b"junk".to_vec()),
                rec(1),
                Err(io::Error::from_raw_os_error(libc::EINVAL)),
            ])),
            &mut buf,
        );
        assert_eq!((seqs(&b), b.malformed.len()), (vec![1], 1));
        assert!(matches!(b.end, BatchEnd::Failed(ref e) if e.raw_os_error() == Some(libc::EINVAL)));
        let b = reader.read_batch(&mut Fake(VecDeque::from([Ok(Vec::new())])), &mut buf);
        assert!(matches!(b.end, BatchEnd::Eof));
    }

    #[test]
    fn a_batch_is_bounded() {
        let mut buf = vec![0; RECORD_BUFFER];
        let mut reader = Reader::new(None);
        let mut dev = Fake((1..=600).map(rec).collect());
        assert_eq!(reader.read_batch(&mut dev, &mut buf).records.len(), 512);
        assert_eq!(reader.read_batch(&mut dev, &mut buf).records.len(), 88);
    }

    #[test]
    fn a_regular_file_is_refused() {
        let e = open(Path::new("/proc/self/status")).unwrap_err().to_string();
        assert!(e.contains("not a character device"), "{e}");
        let e = open(Path::new("/nonexistent/kmsg")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/kmsg"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_are_refused_without_panicking(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_record(&bytes);
        }

        #[test]
        fn an_escaped_message_comes_back(message in "[ -~\t\u{1}]{0,80}") {
            let escaped: String = message
                .bytes()
                .map(|b| if b == b'\\' || !(0x20..0x7f).contains(&b) { format!("\\x{b:02x}") } else { (b as char).to_string() })
                .collect();
            let r = parse_record(format!("6,1,1,-;{escaped}\n").as_bytes()).unwrap();
            proptest::prop_assert_eq!(r.message, message);
        }
    }
}
