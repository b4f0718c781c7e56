//! Values that refuse, as they are read, what they cannot be: each `Deserialize` impl here checks its
//! value and names it in the message, so a mistake is reported where it is written (with the line and
//! column of the value) instead of by a check somewhere after parsing.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, de};

/// Why a value was refused; each names the value as written.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ValueError {
    #[error("`{text}` is not a duration like 500ms, 1s, 5m, 2h")]
    NotADuration { text: String },
    #[error("`{text}` has no unit: write it as 500ms, 1s, 5m or 2h")]
    NoUnit { text: String },
    #[error("`{text}` is out of range")]
    DurationOutOfRange { text: String },
    #[error("{value} is not a fraction in 0..=1")]
    NotAFraction { value: f64 },
    #[error("{value} is not a CPU quota in (0, 64] cores")]
    NotACpuQuota { value: f64 },
    #[error("{list:?} is not a CPU list: {reason}")]
    NotACpuList { list: String, reason: &'static str },
    #[error("`{text}` is not a socket address like 127.0.0.1:9750")]
    NotASocketAddress { text: String },
    #[error("`{text}` is not an http URL like http://127.0.0.1:9093/path: {reason}")]
    NotAnHttpUrl { text: String, reason: &'static str },
}

/// A duration written as `500ms`, `1s`, `5m`, `2h` (fractions allowed: `1.5s`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> Self {
        HumanDuration(Duration::from_secs(secs))
    }
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl FromStr for HumanDuration {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        parse_duration(s).map(HumanDuration)
    }
}

/// Parses `<number><unit>` with unit ms, s, m or h.
pub fn parse_duration(text: &str) -> Result<Duration, ValueError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| ValueError::NotADuration { text: text.to_string() })?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(ValueError::NoUnit { text: text.to_string() }),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(ValueError::DurationOutOfRange { text: text.to_string() });
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A share of something, in `0..=1`.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Fraction(f64);

impl Fraction {
    pub const ONE: Fraction = Fraction(1.0);
    pub const HALF: Fraction = Fraction(0.5);

    pub fn new(value: f64) -> Result<Fraction, ValueError> {
        if (0.0..=1.0).contains(&value) {
            Ok(Fraction(value))
        } else {
            Err(ValueError::NotAFraction { value })
        }
    }
    pub const fn get(self) -> f64 {
        self.0
    }
}

impl fmt::Display for Fraction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// CPU time as cores (0.05: 5 % of one CPU), in `(0, 64]`.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct CpuQuota(f64);

impl CpuQuota {
    /// What a hibernated instance gets unless configured: 5 % of one CPU.
    pub const STANDBY: CpuQuota = CpuQuota(0.05);

    pub fn new(cores: f64) -> Result<CpuQuota, ValueError> {
        if cores > 0.0 && cores <= 64.0 {
            Ok(CpuQuota(cores))
        } else {
            Err(ValueError::NotACpuQuota { value: cores })
        }
    }
    pub const fn cores(self) -> f64 {
        self.0
    }
}

impl fmt::Display for CpuQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A kernel cpu list (`0-3,5`), kept as written (it is written to `cpuset.cpus` as is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(String);

impl CpuList {
    pub fn new(list: &str) -> Result<CpuList, ValueError> {
        parse_cpu_list(list)?;
        Ok(CpuList(list.trim().to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The CPU numbers, in order.
    pub fn cpus(&self) -> Vec<u32> {
        parse_cpu_list(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses a kernel cpu list (`"0-3,5"`) into CPU numbers, in order.
pub fn parse_cpu_list(list: &str) -> Result<Vec<u32>, ValueError> {
    let invalid = |reason| ValueError::NotACpuList { list: list.into(), reason };
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let first: u32 = first.trim().parse().map_err(|_| invalid("expected CPU numbers like 0-3,5"))?;
        let last: u32 = last.trim().parse().map_err(|_| invalid("expected CPU numbers like 0-3,5"))?;
        if last < first {
            return Err(invalid("range ends before it starts"));
        }
        if last - first > 65_535 {
            return Err(invalid("range too large"));
        }
        cpus.extend(first..=last);
    }
    Ok(cpus)
}

/// Writes CPU numbers as a kernel cpu list, ranges folded: `[0, 1, 2, 5]` → `"0-2,5"`. Unsorted or repeated
/// numbers are sorted and counted once.
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let first = sorted[i];
        let mut last = first;
        while i + 1 < sorted.len() && sorted[i + 1] == last + 1 {
            i += 1;
            last = sorted[i];
        }
        parts.push(if first == last { first.to_string() } else { format!("{first}-{last}") });
        i += 1;
    }
    parts.join(",")
}

/// A socket address to listen on or connect to, `ip:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Addr(pub SocketAddr);

impl Addr {
    pub const fn get(self) -> SocketAddr {
        self.0
    }
    /// 127.0.0.1:`port`.
    pub const fn loopback(port: u16) -> Addr {
        Addr(SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), port))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Addr {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Addr, ValueError> {
        s.trim().parse().map(Addr).map_err(|_| ValueError::NotASocketAddress { text: s.to_string() })
    }
}

impl From<Addr> for SocketAddr {
    fn from(a: Addr) -> SocketAddr {
        a.0
    }
}

/// An `http://` or `https://` URL to post to, `scheme://host[:port][/path]`: the host (a name, an IPv4
/// address or a bracketed IPv6 one), the port (80 or 443 unless written) and the path with its query (`/`
/// unless written). Anything an HTTP/1.1 client could not use as written is refused here, so a URL that
/// loads is one that can be posted to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    text: String,
    https: bool,
    host: String,
    port: u16,
    path: String,
}

impl HttpUrl {
    /// The URL as written (trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }
    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }
    pub fn is_https(&self) -> bool {
        self.https
    }
    /// The host as written in the URL (an IPv6 address keeps its brackets).
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The path and query, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The URL with every part explicit: `scheme://host:port/path`.
    pub fn full(&self) -> String {
        format!("{}://{}:{}{}", self.scheme(), self.host, self.port, self.path)
    }
    /// This URL with `suffix` appended to its path (one `/` between them, any query kept after it), e.g.
    /// Alertmanager's `/api/v2/alerts` below a base URL.
    pub fn join(&self, suffix: &str) -> HttpUrl {
        let (base, query) =
            self.path.split_once('?').map_or((self.path.as_str(), None), |(b, q)| (b, Some(q)));
        let mut path = format!("{}/{}", base.trim_end_matches('/'), suffix.trim_start_matches('/'));
        if let Some(q) = query {
            path = format!("{path}?{q}");
        }
        let mut joined = HttpUrl {
            text: String::new(),
            https: self.https,
            host: self.host.clone(),
            port: self.port,
            path,
        };
        joined.text = joined.full();
        joined
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for HttpUrl {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<HttpUrl, ValueError> {
        let text = s.trim();
        let bad = |reason| ValueError::NotAnHttpUrl { text: s.to_string(), reason };
        let scheme_is =
            |scheme: &str| text.get(..scheme.len()).is_some_and(|p| p.eq_ignore_ascii_case(scheme));
        let (https, rest) = if scheme_is("https://") {
            (true, &text[8..])
        } else if scheme_is("http://") {
            (false, &text[7..])
        } else {
            return Err(bad("it must start with http:// or https://"));
        };
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it contains whitespace"));
        }
        if text.contains('#') {
            return Err(bad("a fragment (#...) is never sent"));
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not supported: use the receiver's headers"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or_else(|| bad("an IPv6 host has no closing `]`"))?;
            addr.parse::<std::net::Ipv6Addr>().map_err(|_| bad("the IPv6 host is not an address"))?;
            (&authority[..addr.len() + 2], after.strip_prefix(':'))
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("it names no host"));
        }
        if !host.starts_with('[')
            && !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(bad("the host has characters a host name cannot have"));
        }
        let port = match port {
            None if https => 443,
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(bad("the port is not a number in 1..=65535")),
            },
        };
        let path = if path.is_empty() {
            "/".to_string()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        Ok(HttpUrl { text: text.to_string(), https, host: host.to_string(), port, path })
    }
}

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d)
    }
}

/// For `#[serde(deserialize_with = "socket_addr")]` on a `SocketAddr` field: the address as [`Addr`]
/// reads it, refused with the text as written.
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    Addr::deserialize(d).map(Addr::get)
}

fn from_text<'de, D: Deserializer<'de>, T: FromStr<Err = ValueError>>(d: D) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(de::Error::custom)
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d)
    }
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d)
    }
}

impl<'de> Deserialize<'de> for CpuList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        CpuList::new(&text).map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Fraction::new(f64::deserialize(d)?).map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for CpuQuota {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        CpuQuota::new(f64::deserialize(d)?).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `value` as a `T` from the YAML `v: <value>`, the message of a refusal as `Err`.
    fn read<T: serde::de::DeserializeOwned>(value: &str) -> Result<T, String> {
        #[derive(Deserialize)]
        struct V<T> {
            v: T,
        }
        let doc = crate::yaml::Document::parse(&format!("v: {value}\n"), "t.yaml").map_err(|e| e.message)?;
        match doc.deserialize::<V<T>>() {
            (Some(v), issues) if issues.is_empty() => Ok(v.v),
            (_, issues) => Err(issues.into_iter().map(|i| i.to_string()).collect::<Vec<_>>().join("\n")),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(read::<HumanDuration>("10s"), Ok(HumanDuration::from_secs(10)));
        assert_eq!(
            read::<HumanDuration>("5"),
            Err("t.yaml:1:4: v: `5` has no unit: write it as 500ms, 1s, 5m or 2h".into())
        );
        assert_eq!(
            read::<HumanDuration>("soon"),
            Err("t.yaml:1:4: v: `soon` is not a duration like 500ms, 1s, 5m, 2h".into())
        );
        assert_eq!(
            read::<HumanDuration>("5d"),
            Err("t.yaml:1:4: v: `5d` has no unit: write it as 500ms, 1s, 5m or 2h".into())
        );
        assert_eq!(
            read::<HumanDuration>("2000000000s"),
            Err("t.yaml:1:4: v: `2000000000s` is out of range".into())
        );
    }

    #[test]
    fn fractions() {
        assert_eq!(read::<Fraction>("0").map(Fraction::get), Ok(0.0));
        assert_eq!(read::<Fraction>("0.25").map(Fraction::get), Ok(0.25));
        assert_eq!(read::<Fraction>("1").map(Fraction::get), Ok(1.0));
        assert_eq!(read::<Fraction>("1.5"), Err("t.yaml:1:4: v: 1.5 is not a fraction in 0..=1".into()));
        assert_eq!(read::<Fraction>("-0.1"), Err("t.yaml:1:4: v: -0.1 is not a fraction in 0..=1".into()));
        assert!(read::<Fraction>("half").unwrap_err().contains("invalid type: string \"half\""));
        assert!(Fraction::new(f64::NAN).is_err());
    }

    #[test]
    fn cpu_quotas() {
        assert_eq!(read::<CpuQuota>("0.05").map(CpuQuota::cores), Ok(0.05));
        assert_eq!(read::<CpuQuota>("64").map(CpuQuota::cores), Ok(64.0));
        assert_eq!(read::<CpuQuota>("0"), Err("t.yaml:1:4: v: 0 is not a CPU quota in (0, 64] cores".into()));
        assert_eq!(
            read::<CpuQuota>("65"),
            Err("t.yaml:1:4: v: 65 is not a CPU quota in (0, 64] cores".into())
        );
        assert!(CpuQuota::new(f64::NAN).is_err());
    }

    #[test]
    fn cpu_lists_are_written_with_ranges_folded() {
        assert_eq!(format_cpu_list(&[5, 0, 1, 2, 2]), "0-2,5");
        assert_eq!(format_cpu_list(&[3]), "3");
        assert_eq!(format_cpu_list(&[]), "");
        assert_eq!(format_cpu_list(&[0, 2, 4]), "0,2,4");
        for list in ["0-3,5", "1", "0,2-7,9-10"] {
            assert_eq!(format_cpu_list(&parse_cpu_list(list).unwrap()), list);
        }
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("3").unwrap(), vec![3]);
        assert_eq!(parse_cpu_list("0-2,5\n").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("1,,2").is_err());
        assert_eq!(read::<CpuList>("\"1\"").map(|c| c.cpus()), Ok(vec![1]));
        // A plain number is a list of one CPU.
        assert_eq!(read::<CpuList>("1").map(|c| c.as_str().to_string()), Ok("1".into()));
        assert_eq!(read::<CpuList>("0-3,5").map(|c| c.cpus()), Ok(vec![0, 1, 2, 3, 5]));
        assert_eq!(
            read::<CpuList>("2-1"),
            Err("t.yaml:1:4: v: \"2-1\" is not a CPU list: range ends before it starts".into())
        );
        assert_eq!(
            read::<CpuList>("a"),
            Err("t.yaml:1:4: v: \"a\" is not a CPU list: expected CPU numbers like 0-3,5".into())
        );
    }

    #[test]
    fn http_urls() {
        let u: HttpUrl = "http://127.0.0.1:9099/hook".parse().unwrap();
        assert_eq!((u.host(), u.port(), u.path()), ("127.0.0.1", 9099, "/hook"));
        let u: HttpUrl = "http://am.local".parse().unwrap();
        assert_eq!((u.host(), u.port(), u.path()), ("am.local", 80, "/"));
        assert_eq!(u.join("/api/v2/alerts").to_string(), "http://am.local:80/api/v2/alerts");
        let u: HttpUrl = "http://[::1]:9093/base/?a=1".parse().unwrap();
        assert_eq!((u.host(), u.port(), u.path()), ("[::1]", 9093, "/base/?a=1"));
        assert_eq!(u.join("api/v2/alerts").path(), "/base/api/v2/alerts?a=1");
        let u: HttpUrl = "http://h:1?x".parse().unwrap();
        assert_eq!(u.path(), "/?x");
        let u: HttpUrl = "HTTPS://hooks.example/in".parse().unwrap();
        assert_eq!((u.scheme(), u.host(), u.port(), u.path()), ("https", "hooks.example", 443, "/in"));
        assert_eq!(u.join("x").to_string(), "https://hooks.example:443/in/x");
        assert_eq!(
            read::<HttpUrl>("ftp://x/hook"),
            Err("t.yaml:1:4: v: `ftp://x/hook` is not an http URL like http://127.0.0.1:9093/path: it must start \
                 with http:// or https://"
                .into())
        );
        for (text, reason) in [
            ("ftp://x/", "it must start with http:// or https://"),
            ("https://", "it names no host"),
            ("http://", "it names no host"),
            ("http://:80/", "it names no host"),
            ("http://a b/", "it contains whitespace"),
            ("http://x/#top", "a fragment (#...) is never sent"),
            ("http://u:p@x/", "credentials in the URL are not supported: use the receiver's headers"),
            ("http://x:0/", "the port is not a number in 1..=65535"),
            ("http://x:99999/", "the port is not a number in 1..=65535"),
            ("http://x:/", "the port is not a number in 1..=65535"),
            ("http://[::1/", "an IPv6 host has no closing `]`"),
            ("http://[zz]/", "the IPv6 host is not an address"),
            ("http://a%20b/", "the host has characters a host name cannot have"),
        ] {
            assert_eq!(
                text.parse::<HttpUrl>(),
                Err(ValueError::NotAnHttpUrl { text: text.into(), reason }),
                "{text}"
            );
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(read::<Addr>("127.0.0.1:9750"), Ok(Addr::loopback(9750)));
        assert_eq!(read::<Addr>("\"[::1]:80\"").map(|a| a.to_string()), Ok("[::1]:80".into()));
        assert_eq!(
            read::<Addr>("localhost:80"),
            Err("t.yaml:1:4: v: `localhost:80` is not a socket address like 127.0.0.1:9750".into())
        );
        assert_eq!(
            read::<Addr>("127.0.0.1"),
            Err("t.yaml:1:4: v: `127.0.0.1` is not a socket address like 127.0.0.1:9750".into())
        );
    }
}
