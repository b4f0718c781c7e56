//! RFC 3339 timestamps, the way Alertmanager and Prometheus write them (`2026-12-02T05:20:01.123456789Z`,
//! or with an offset such as `+01:00`), to and from milliseconds since the Unix epoch. Go's zero time
//! (`0001-01-01T00:00:00Z`), which Alertmanager sends for "no end", is a valid timestamp before the epoch:
//! [`parse_rfc3339_ms`] gives it as a negative number, and callers decide what it means.

/// Days from 1970-01-01 to the given civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day counted from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Milliseconds since the Unix epoch at `t` (0 for a clock set before 1970).
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds since the Unix epoch now.
pub fn now_unix_ms() -> u64 {
    unix_ms(std::time::SystemTime::now())
}

/// Formats milliseconds since the epoch as UTC RFC 3339 with milliseconds: `2026-12-02T05:20:01.123Z`.
pub fn format_rfc3339_ms(unix_ms: i64) -> String {
    let (days, ms_of_day) = (unix_ms.div_euclid(86_400_000), unix_ms.rem_euclid(86_400_000));
    let (y, mo, d) = civil_from_days(days);
    let secs = ms_of_day / 1000;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms_of_day % 1000
    )
}

/// Parses an RFC 3339 timestamp into milliseconds since the epoch (fractions beyond milliseconds are
/// truncated). The message says what is wrong.
pub fn parse_rfc3339_ms(text: &str) -> Result<i64, String> {
    let bad = |why: &str| format!("{text:?} is not an RFC 3339 timestamp ({why}), e.g. 2026-12-02T05:20:01Z");
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Result<u32, String> {
        let s = b.get(range.clone()).ok_or_else(|| bad("too short"))?;
        if !s.iter().all(u8::is_ascii_digit) {
            return Err(bad("expected digits"));
        }
        Ok(s.iter().fold(0, |n, c| n * 10 + u32::from(c - b'0')))
    };
    let sep = |at: usize, want: &[u8]| -> Result<(), String> {
        match b.get(at) {
            Some(c) if want.contains(c) => Ok(()),
            _ => Err(bad(&format!("expected {:?} at position {}", want[0] as char, at + 1))),
        }
    };
    let year = i64::from(digits(0..4)?);
    sep(4, b"-")?;
    let month = digits(5..7)?;
    sep(7, b"-")?;
    let day = digits(8..10)?;
    sep(10, b"Tt ")?;
    let (hour, minute) = (digits(11..13)?, digits(14..16)?);
    sep(13, b":")?;
    sep(16, b":")?;
    let second = digits(17..19)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad("no such time"));
    }
    let mut at = 19;
    let mut millis = 0i64;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 3 {
                millis = millis * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return Err(bad("no digits after the decimal point"));
        }
        for _ in (at - start)..3 {
            millis *= 10;
        }
    }
    let offset_minutes: i64 = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if at + 6 == b.len() => {
            let (h, m) = (digits(at + 1..at + 3)?, digits(at + 4..at + 6)?);
            sep(at + 3, b":")?;
            if h > 23 || m > 59 {
                return Err(bad("no such offset"));
            }
            let minutes = i64::from(h * 60 + m);
            if sign == b'+' { minutes } else { -minutes }
        }
        _ => return Err(bad("expected Z or an offset such as +01:00 at the end")),
    };
    // A leap second (:60) counts as the last millisecond of its minute's end.
    let seconds = days_from_civil(year, month, day) * 86_400
        + i64::from(hour) * 3600
        + i64::from(minute) * 60
        + i64::from(second.min(59))
        - offset_minutes * 60;
    Ok(seconds * 1000 + if second == 60 { 999 } else { millis })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339_ms("2026-12-02T05:20:01.123456789Z"), Ok(1_796_188_801_123));
        assert_eq!(parse_rfc3339_ms("2026-12-02T06:20:01.123+01:00"), Ok(1_796_188_801_123));
        assert_eq!(parse_rfc3339_ms("2026-12-02T05:20:01.5Z"), Ok(1_796_188_801_500));
        assert_eq!(parse_rfc3339_ms("2024-02-29T00:00:00Z"), Ok(1_709_164_800_000));
        assert_eq!(parse_rfc3339_ms("0001-01-01T00:00:00Z"), Ok(-62_135_596_800_000));
        assert_eq!(format_rfc3339_ms(1_796_188_801_123), "2026-12-02T05:20:01.123Z");
        assert_eq!(format_rfc3339_ms(-62_135_596_800_000), "0001-01-01T00:00:00.000Z");
    }

    #[test]
    fn refuses_what_is_not_a_timestamp() {
        for bad in [
            "",
            "2026-12-02",
            "2026-13-02T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-12-02T24:00:00Z",
            "2026-12-02T05:20:01",
            "2026-12-02T05:20:01.Z",
            "2026-12-02T05:20:01Zjunk",
            "2026-12-02T05:20:01+0100",
            "yesterday",
        ] {
            assert!(parse_rfc3339_ms(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn formatting_then_parsing_is_the_identity(ms in -62_135_596_800_000i64..253_402_300_799_999) {
            proptest::prop_assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)), Ok(ms));
        }
    }
}
