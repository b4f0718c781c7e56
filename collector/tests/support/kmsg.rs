//! The kernel log as records, read from `/dev/kmsg` (one record per read: `PRI,SEQ,USEC,FLAGS;TEXT`, then
//! ` KEY=VALUE` continuation lines), so a test matches what the kernel printed without depending on how
//! `dmesg` formats it. A reader starts at the end of the log and sees only records written after it opened.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

/// One kernel log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsgRecord {
    pub seq: u64,
    /// Priority and facility (`PRI`): the level is `priority & 7` (3 is KERN_ERR).
    pub priority: u32,
    /// The message, without its continuation lines.
    pub text: String,
}

/// Parses one record as `/dev/kmsg` returns it.
pub fn parse_record(raw: &str) -> Option<KmsgRecord> {
    let (header, rest) = raw.split_once(';')?;
    let mut fields = header.split(',');
    let priority = fields.next()?.parse().ok()?;
    let seq = fields.next()?.parse().ok()?;
    let text = rest.split('\n').next().unwrap_or("").to_string();
    Some(KmsgRecord { seq, priority, text })
}

pub struct Kmsg {
    file: File,
    seen: Vec<KmsgRecord>,
}

impl Kmsg {
    /// Opens the log at its end. Needs root (CI is root); fails with the reason otherwise.
    pub fn open_at_end() -> Result<Kmsg, String> {
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .map_err(|e| format!("cannot open /dev/kmsg (needs root): {e}"))?;
        file.seek(SeekFrom::End(0)).map_err(|e| format!("seeking /dev/kmsg to its end: {e}"))?;
        Ok(Kmsg { file, seen: Vec::new() })
    }

    /// Reads every record available now.
    fn drain(&mut self) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if let Some(r) = parse_record(&String::from_utf8_lossy(&buf[..n])) {
                        self.seen.push(r);
                    }
                }
                // Records were overwritten before we read them; the reader moved on to the oldest left.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => panic!("reading /dev/kmsg: {e}"),
            }
        }
    }

    /// Every record read since the log was opened.
    pub fn records(&mut self) -> &[KmsgRecord] {
        self.drain();
        &self.seen
    }

    /// Polls the log (every 20 ms) until a record matches `pred`, or gives up after `timeout`.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&KmsgRecord) -> bool) -> Option<KmsgRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if let Some(r) = self.seen.iter().find(|r| pred(r)) {
                return Some(r.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
