//! The kernel's TCP table (`/proc/net/tcp{,6}`): established connections by local port. Until the broker
//! supplies traffic, this is how the healer sees requests at an instance; hibernation also uses it to let
//! open connections finish before it freezes an instance.

/// `(local port, remote address:port)` of every ESTABLISHED connection in a `/proc/net/tcp` text.
pub fn established(text: &str) -> Vec<(u16, String)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1)?;
            let remote = f.next()?;
            let state = f.next()?;
            if state != "01" {
                return None;
            }
            let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            Some((port, remote.to_string()))
        })
        .collect()
}

/// Every ESTABLISHED IPv4 and IPv6 connection on the host now.
pub fn established_now() -> Vec<(u16, String)> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| established(&text))
        .collect()
}

/// Established connections to local `port` now.
pub fn connections_to(port: u16) -> usize {
    established_now().iter().filter(|(p, _)| *p == port).count()
}

#[cfg(test)]
mod tests {
    use super::*;

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
