//! The kernel's TCP table (`/proc/net/tcp{,6}`): established connections by local port. Until the broker
//! supplies traffic, this is how the healer sees requests at an instance; hibernation also uses it to let
//! open connections finish before it freezes an instance. The autoscaler counts the connections that
//! bypass the broker ([`foreign_connections_now`]).

use std::collections::{HashMap, HashSet};

/// The local address, remote address and inode fields of each ESTABLISHED line of a `/proc/net/tcp` text.
fn established_lines(text: &str) -> impl Iterator<Item = (&str, &str, &str)> {
    text.lines().skip(1).filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(3) != Some(&"01") {
            return None;
        }
        Some((*f.get(1)?, *f.get(2)?, *f.get(9)?))
    })
}

/// The port of a `/proc/net/tcp` address (`0100007F:46A0`).
fn port_of(address: &str) -> Option<u16> {
    u16::from_str_radix(address.rsplit(':').next()?, 16).ok()
}

/// The texts of `/proc/net/tcp` and `/proc/net/tcp6` now (a missing one is left out).
fn tables_now() -> Vec<String> {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().filter_map(|f| std::fs::read_to_string(f).ok()).collect()
}

/// `(local port, remote address:port)` of every ESTABLISHED connection in a `/proc/net/tcp` text.
pub fn established(text: &str) -> Vec<(u16, String)> {
    established_lines(text)
        .filter_map(|(local, remote, _)| Some((port_of(local)?, remote.to_string())))
        .collect()
}

/// Every ESTABLISHED IPv4 and IPv6 connection on the host now.
pub fn established_now() -> Vec<(u16, String)> {
    tables_now().iter().flat_map(|text| established(text)).collect()
}

/// Established connections to local `port` now.
pub fn connections_to(port: u16) -> usize {
    established_now().iter().filter(|(p, _)| *p == port).count()
}

/// One ESTABLISHED connection end: local and remote port, and the socket's inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    pub local_port: u16,
    pub remote_port: u16,
    pub inode: u64,
}

/// Every ESTABLISHED connection end in a `/proc/net/tcp` text.
pub fn ends(text: &str) -> Vec<End> {
    established_lines(text)
        .filter_map(|(local, remote, inode)| {
            Some(End {
                local_port: port_of(local)?,
                remote_port: port_of(remote)?,
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

/// The inodes of this process's own sockets (`/proc/self/fd/N -> socket:[inode]`).
fn own_socket_inodes() -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return HashSet::new() };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Connections to each of `ports` whose client is not this process: traffic that bypasses the broker.
/// The broker's pooled connections and Vigil's readiness probes are this process's own sockets; on
/// loopback both ends of a connection are in the table, so those are told apart by their client end.
pub fn foreign_connections(ends: &[End], own: &HashSet<u64>, ports: &[u16]) -> HashMap<u16, usize> {
    ports
        .iter()
        .map(|&port| {
            let all = ends.iter().filter(|e| e.local_port == port).count();
            let ours = ends.iter().filter(|e| e.remote_port == port && own.contains(&e.inode)).count();
            (port, all.saturating_sub(ours))
        })
        .collect()
}

/// [`foreign_connections`] on the host's tables now.
pub fn foreign_connections_now(ports: &[u16]) -> HashMap<u16, usize> {
    // Our sockets before and after the table is read: one closed or opened meanwhile is still ours.
    let mut own = own_socket_inodes();
    let ends: Vec<End> = tables_now().iter().flat_map(|text| self::ends(text)).collect();
    own.extend(own_socket_inodes());
    foreign_connections(&ends, &own, ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_from_this_process_are_not_foreign() {
        // Port 18080 (0x46A0): one client of ours (inode 3, from 54000) and one from elsewhere (inode 5,
        // from 54001); both client ends are on this host.
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:46A0 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n\
   1: 0100007F:D2F0 0100007F:46A0 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n\
   2: 0100007F:46A0 0100007F:D2F1 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0 20 4 30 10 -1\n\
   3: 0100007F:D2F1 0100007F:46A0 01 00000000:00000000 00:00000000 00000000     0        0 5 1 0 20 4 30 10 -1\n\
   4: 0100007F:46A1 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6 1 0 20 4 30 10 -1\n";
        let ends = ends(text);
        assert_eq!(ends.len(), 4);
        assert_eq!(ends[1], End { local_port: 54000, remote_port: 18080, inode: 3 });
        let counts = foreign_connections(&ends, &HashSet::from([3]), &[18080, 18081]);
        assert_eq!(counts, HashMap::from([(18080, 1), (18081, 0)]));
    }

    #[test]
    fn a_real_connection_of_this_process_is_recognised_as_its_own() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        // The server end is ours too, but it is the client end that says whose connection it is.
        assert_eq!(foreign_connections_now(&[port]), HashMap::from([(port, 0)]));
        assert_eq!(connections_to(port), 1);
    }

    #[test]
    fn established_connections_by_local_port() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:46A0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:46A0 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1\n\
   2: 0100007F:D2F0 0100007F:46A0 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(
            established(text),
            vec![(18080, "0100007F:D2F0".to_string()), (54000, "0100007F:46A0".to_string())]
        );
        assert!(established("garbage\nx y z\n").is_empty());
    }
}
