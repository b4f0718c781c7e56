//! A load generator for the autoscaler's tests and benchmark: closed-loop HTTP clients, each sending one
//! request at a time through the broker's trigger until stopped, recording every answer (status, the
//! request's id, its latency).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the load generator saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Ids of requests answered, by status.
    pub answered: BTreeMap<u16, Vec<String>>,
    /// Requests that got no HTTP answer (connection refused or cut).
    pub unanswered: usize,
    /// When each answered request was sent (since the load began) and how long it took.
    pub latencies: Vec<(Duration, Duration)>,
}

/// `clients` closed-loop clients against the trigger at `target`, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    report: Arc<Mutex<Report>>,
}

impl Load {
    pub fn start(target: Arc<Mutex<SocketAddr>>, clients: usize, tag: &str) -> Load {
        let began = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        let threads = (0..clients)
            .map(|c| {
                let (stop, report, target, tag) =
                    (stop.clone(), report.clone(), target.clone(), tag.to_string());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let id = format!("{tag}-{c}-{n}");
                        let addr = *target.lock().unwrap();
                        let sent = Instant::now();
                        match one_request(addr, &id) {
                            Some(status) => {
                                let mut r = report.lock().unwrap();
                                r.latencies.push((sent - began, sent.elapsed()));
                                r.answered.entry(status).or_default().push(id);
                            }
                            None => {
                                report.lock().unwrap().unanswered += 1;
                                // Vigil is away (the restart test): try again shortly, not in a hot loop.
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                })
            })
            .collect();
        Load { stop, threads, report }
    }

    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        std::mem::take(&mut *self.report.lock().unwrap())
    }
}

/// One GET through the trigger; its status, or `None` without an answer.
pub fn one_request(addr: SocketAddr, id: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(s, "GET /work?id={id} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    std::str::from_utf8(out.get(9..12)?).ok()?.parse().ok()
}
