//! RFC 3339 date-times as the spec writes them: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.

use chrono::{DateTime, FixedOffset, SecondsFormat};

/// Formats `t` in RFC 3339, `Z` for UTC, fractional seconds only when present.
pub fn format_rfc3339(t: &DateTime<FixedOffset>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// True when `s` is an RFC 3339 §5.6 `date-time` as the spec's Go validator reads it (Go's
/// `time.RFC3339`): `T` and `Z` upper case, seconds up to 59 (no leap second), a date that
/// exists in the calendar.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            part.iter()
                .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')),
        )
    };
    let (Some(year), Some(month), Some(day)) = (digits(0..4), digits(5..7), digits(8..10)) else {
        return false;
    };
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || b.get(10) != Some(&b'T') {
        return false;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days_in_month {
        return false;
    }
    let (Some(hour), Some(minute), Some(second)) = (digits(11..13), digits(14..16), digits(17..19))
    else {
        return false;
    };
    if b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
        return false;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            let (Some(oh), Some(om)) = (digits(i + 1..i + 3), digits(i + 4..i + 6)) else {
                return false;
            };
            b.get(i + 3) == Some(&b':') && oh <= 23 && om <= 59 && i + 6 == b.len()
        }
        _ => false,
    }
}

/// serde adapter for a required RFC 3339 date-time.
pub mod serde_rfc3339 {
    use chrono::{DateTime, FixedOffset};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the time in RFC 3339.
    pub fn serialize<S: Serializer>(t: &DateTime<FixedOffset>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_rfc3339(t))
    }

    /// Reads an RFC 3339 time.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<FixedOffset>, D::Error> {
        let text = String::deserialize(d)?;
        if !super::is_rfc3339(&text) {
            return Err(serde::de::Error::custom(format!(
                "{text:?} is not an RFC 3339 date-time"
            )));
        }
        DateTime::parse_from_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

/// serde adapter for an optional RFC 3339 date-time.
pub mod serde_rfc3339_opt {
    use chrono::{DateTime, FixedOffset};
    use serde::{Deserializer, Serializer};

    /// Writes the time in RFC 3339 (callers skip `None`).
    pub fn serialize<S: Serializer>(
        t: &Option<DateTime<FixedOffset>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::serde_rfc3339::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    /// Reads an RFC 3339 time.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DateTime<FixedOffset>>, D::Error> {
        super::serde_rfc3339::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses() {
        for good in [
            "2025-01-01T00:00:00Z",
            "2024-02-29T23:59:59.123+05:30",
            // modctl's file times: nanoseconds and a local offset.
            "2025-06-03T10:11:12.123456789+08:00",
            "1999-12-31T23:59:59-00:00",
        ] {
            assert!(is_rfc3339(good), "{good}");
        }
        for bad in [
            "2025-01-01",
            "2025/01/01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-01-01T24:00:00Z",
            "2025-01-01T00:00:00",
            "2025-01-01T00:00:00.Z",
            "2025-01-01T00:00:00+0100",
            "2025-13-01T00:00:00Z",
            // Go's time.RFC3339 (the spec's validator) refuses these, which RFC 3339 allows.
            "2025-01-01t00:00:00z",
            "2025-01-01T00:00:00z",
            "2016-12-31T23:59:60Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }

    #[test]
    fn formats_with_z() {
        let t = DateTime::parse_from_rfc3339("2025-01-02T03:04:05+00:00").expect("date");
        assert_eq!(format_rfc3339(&t), "2025-01-02T03:04:05Z");
    }
}
