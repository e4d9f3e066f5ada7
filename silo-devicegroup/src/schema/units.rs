//! Size and duration strings as Go silo writes them.
//!
//! * Sizes: a decimal integer with an optional case-insensitive suffix `b`,
//!   `k`, `m`, `g` or `t` (powers of 1024): `"4096"`, `"4k"`, `"1G"`, `"2t"`.
//!   Plain integers are accepted where a size is expected.
//! * Durations: Go's `time.ParseDuration` syntax — one or more
//!   `<decimal><unit>` terms with units `ns`, `us` (`µs`), `ms`, `s`, `m`, `h`,
//!   e.g. `"100ms"`, `"1h30m"`, `"1.5s"`; `"0"` alone means zero.
//!
//! Formatting produces text both Go silo and this crate accept (no `t`
//! suffix, because Go's `ParseByteValue` lacks it).

use std::fmt;
use std::time::Duration;

/// Why a size or duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitError(pub(crate) String);

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnitError {}

const KIB: u64 = 1024;

/// Parses a size string (`"1g"`, `"4096"`, `"64K"`) into bytes.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let t = text.trim();
    let last = t
        .chars()
        .last()
        .ok_or_else(|| UnitError("empty size".into()))?;
    let (digits, mult) = match last.to_ascii_lowercase() {
        'b' => (&t[..t.len() - 1], 1),
        'k' => (&t[..t.len() - 1], KIB),
        'm' => (&t[..t.len() - 1], KIB.pow(2)),
        'g' => (&t[..t.len() - 1], KIB.pow(3)),
        't' => (&t[..t.len() - 1], KIB.pow(4)),
        _ => (t, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UnitError(format!(
            "invalid size {text:?}: expected an integer with an optional b/k/m/g/t suffix"
        )));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| UnitError(format!("size {text:?} overflows 64 bits")))
}

/// Formats bytes as the shortest exact size string Go silo also accepts
/// (`1073741824` → `"1g"`, `1234567` → `"1234567"`).
pub fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0".into();
    }
    for (suffix, mult) in [("g", KIB.pow(3)), ("m", KIB.pow(2)), ("k", KIB)] {
        if bytes % mult == 0 {
            return format!("{}{suffix}", bytes / mult);
        }
    }
    bytes.to_string()
}

/// Go's `time.Duration` limit: `i64::MAX` nanoseconds (about 292 years).
const MAX_NANOS: u128 = i64::MAX as u128;

/// Parses a Go duration string (`"100ms"`, `"1h30m"`, `"1.5s"`).
/// Negative durations are rejected.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let bad = |why: &str| UnitError(format!("invalid duration {text:?}: {why}"));
    let mut s = text.trim();
    if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s.starts_with('-') {
        return Err(bad("negative durations are not allowed"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &rest[..frac_len];
            s = &rest[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(bad("expected a number"));
        }
        let unit_len = s
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(s.len(), |(i, _)| i);
        let unit = &s[..unit_len];
        s = &s[unit_len..];
        let nanos_per: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(bad("missing unit (ns, us, ms, s, m, h)")),
            _ => return Err(bad("unknown unit (expected ns, us, ms, s, m or h)")),
        };
        let too_big = || bad("too large");
        // Only the first 19 digits matter for any value below the limit.
        let whole: u128 = if int_part.is_empty() {
            0
        } else if int_part.trim_start_matches('0').len() > 20 {
            return Err(too_big());
        } else {
            int_part.parse::<u128>().map_err(|_| too_big())?
        };
        let mut term = whole.checked_mul(nanos_per).ok_or_else(too_big)?;
        // Fraction: accumulate at most 20 significant digits (plenty for ns).
        let mut scale: u128 = 1;
        let mut frac: u128 = 0;
        for d in frac_part.bytes().take(20) {
            frac = frac * 10 + u128::from(d - b'0');
            scale *= 10;
        }
        term += frac * nanos_per / scale;
        total = total.checked_add(term).ok_or_else(too_big)?;
        if total > MAX_NANOS {
            return Err(too_big());
        }
    }
    let secs = (total / 1_000_000_000) as u64;
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Formats a duration with the largest unit that represents it exactly
/// (`90 s` → `"90s"`, `1 h` → `"1h"`, `1.5 s` → `"1500ms"`, zero → `"0s"`).
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    for (unit, per) in [
        ("h", 3_600_000_000_000u128),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if nanos % per == 0 {
            return format!("{}{unit}", nanos / per);
        }
    }
    format!("{nanos}ns")
}

/// Serde adapters: sizes as strings (or integers), durations as strings.
pub(crate) mod serde_impl {
    use super::*;
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size such as \"4k\", \"1g\" or an integer number of bytes")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("negative size {v}")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"100ms\", \"10s\" or \"1h\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
    }

    pub(crate) mod size {
        use super::*;
        pub(crate) fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&format_size(*v))
        }
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            d.deserialize_any(SizeVisitor)
        }
    }

    pub(crate) mod size_opt {
        use super::*;
        pub(crate) fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.serialize_str(&format_size(*v)),
                None => s.serialize_none(),
            }
        }
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<u64>, D::Error> {
            d.deserialize_any(SizeVisitor).map(Some)
        }
    }

    pub(crate) mod duration {
        use super::*;
        pub(crate) fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&format_duration(*v))
        }
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            d.deserialize_str(DurationVisitor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("12b").unwrap(), 12);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        assert_eq!(parse_size(" 2G ").unwrap(), 2 << 30);
        assert_eq!(parse_size("3t").unwrap(), 3 << 40);
        for bad in [
            "",
            "k",
            "1x",
            "-1k",
            "1.5g",
            "1 g",
            "1kb",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("20000000000g").is_err());
    }

    #[test]
    fn size_format_round_trips() {
        for v in [
            0,
            1,
            512,
            4096,
            1234567,
            1 << 20,
            3 << 30,
            5 << 40,
            u64::MAX,
        ] {
            assert_eq!(parse_size(&format_size(v)).unwrap(), v);
        }
        assert_eq!(format_size(1 << 30), "1g");
        assert_eq!(format_size(5 << 40), "5120g");
        assert_eq!(format_size(1234567), "1234567");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration(".5s").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("250µs").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("7ns").unwrap(), Duration::from_nanos(7));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in [
            "",
            "10",
            "-1s",
            "1x",
            "s",
            ".s",
            "1..5s",
            "99999999999999999999999h",
            "3000000h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn duration_format_round_trips() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_micros(3),
            Duration::from_millis(1500),
            Duration::from_secs(90),
            Duration::from_secs(7200),
        ] {
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_millis(100)), "100ms");
    }
}
