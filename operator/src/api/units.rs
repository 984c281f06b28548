//! Durations, sizes and timestamps as they are written in a `DatabaseCutover`.
//!
//! The spec keeps them as strings (`30s`, `16MiB`, `2026-12-01T02:00:00Z`) because that is what
//! people write. The CEL rules below reject malformed values at admission, and the parsers here
//! accept exactly the same language, so a value the API server accepted always parses.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// CEL rule for one duration: one or more `<number><unit>` groups, units `ms`, `s`, `m`, `h`.
pub const DURATION_RULE: &str = "self.matches('^([0-9]+([.][0-9]+)?(ms|s|m|h))+$')";
/// The same rule for every element of a list of durations.
pub const DURATION_LIST_RULE: &str = "self.all(d, d.matches('^([0-9]+([.][0-9]+)?(ms|s|m|h))+$'))";
/// What a person sees when a duration is malformed.
pub const DURATION_MESSAGE: &str = "must be a duration such as 30s, 5m, 1h30m or 500ms";

/// CEL rule for a byte size: a whole number with an optional unit.
pub const SIZE_RULE: &str = "self.matches('^[0-9]+(B|kB|KiB|MB|MiB|GB|GiB)?$')";
/// What a person sees when a size is malformed.
pub const SIZE_MESSAGE: &str = "must be a size such as 16MiB, 512kB or 1048576 (bytes)";

/// CEL rule for an RFC 3339 timestamp.
pub const TIMESTAMP_RULE: &str = "self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$')";
/// What a person sees when a timestamp is malformed.
pub const TIMESTAMP_MESSAGE: &str = "must be an RFC 3339 timestamp such as 2026-12-01T02:00:00Z";

/// A value in the spec that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UnitError {
    /// Not a duration.
    #[error("{0:?} {DURATION_MESSAGE}")]
    Duration(String),
    /// Not a size.
    #[error("{0:?} {SIZE_MESSAGE}")]
    Size(String),
    /// Not a timestamp.
    #[error("{0:?} {TIMESTAMP_MESSAGE}")]
    Timestamp(String),
}

/// Parses `30s`, `5m`, `1h30m`, `1.5h`, `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let err = || UnitError::Duration(text.to_owned());
    if text.is_empty() {
        return Err(err());
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let (number, tail) = rest.split_at(number_len);
        if number.is_empty()
            || number.starts_with('.')
            || number.ends_with('.')
            || number.matches('.').count() > 1
        {
            return Err(err());
        }
        let value: f64 = number.parse().map_err(|_| err())?;
        let (seconds, unit_len) = if tail.starts_with("ms") {
            (0.001, 2)
        } else if tail.starts_with('s') {
            (1.0, 1)
        } else if tail.starts_with('m') {
            (60.0, 1)
        } else if tail.starts_with('h') {
            (3600.0, 1)
        } else {
            return Err(err());
        };
        total += value * seconds;
        rest = &tail[unit_len..];
    }
    // A value too large for a Duration is refused, never a panic.
    Duration::try_from_secs_f64(total).map_err(|_| err())
}

/// Parses `16MiB`, `512kB`, `1048576`.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let err = || UnitError::Size(text.to_owned());
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if digits == 0 {
        return Err(err());
    }
    let value: u64 = text[..digits].parse().map_err(|_| err())?;
    let factor: u64 = match &text[digits..] {
        "" | "B" => 1,
        "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(err()),
    };
    value.checked_mul(factor).ok_or_else(err)
}

/// Parses an RFC 3339 timestamp.
pub fn parse_timestamp(text: &str) -> Result<jiff::Timestamp, UnitError> {
    let well_formed = text.len() >= 20 && text.as_bytes()[10] == b'T';
    text.parse::<jiff::Timestamp>()
        .ok()
        .filter(|_| well_formed)
        .ok_or_else(|| UnitError::Timestamp(text.to_owned()))
}

/// The regular expression of a duration (the schema's `pattern`; the CEL rule says the same).
pub const DURATION_PATTERN: &str = "^([0-9]+([.][0-9]+)?(ms|s|m|h))+$";
/// The regular expression of a byte size.
pub const SIZE_PATTERN: &str = "^[0-9]+(B|kB|KiB|MB|MiB|GB|GiB)?$";
/// The regular expression of an RFC 3339 timestamp.
pub const TIMESTAMP_PATTERN: &str =
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$";

/// Declares a spec value kept as the text people wrote (so an object is always readable, even
/// one stored before a stricter schema) whose schema carries the pattern, and which is parsed
/// once into its typed value when the spec is validated.
macro_rules! text_value {
    ($(#[$doc:meta])* $name:ident, $pattern:expr, $parsed:ty, $parse:path) => {
        $(#[$doc])*
        #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The value as written.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The typed value, or what is wrong with the text.
            pub fn parse(&self) -> Result<$parsed, UnitError> {
                $parse(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                Self(text.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(text: String) -> Self {
                Self(text)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn inline_schema() -> bool {
                true
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({"type": "string", "pattern": $pattern})
            }
        }
    };
}

text_value!(
    /// A duration as people write it: `30s`, `5m`, `1h30m`, `250ms`.
    HumanDuration,
    DURATION_PATTERN,
    Duration,
    parse_duration
);
text_value!(
    /// A byte size as people write it: `16MiB`, `512kB`, `1048576`.
    ByteSize,
    SIZE_PATTERN,
    u64,
    parse_size
);
text_value!(
    /// An RFC 3339 timestamp: `2026-12-01T02:00:00Z`.
    Rfc3339,
    TIMESTAMP_PATTERN,
    jiff::Timestamp,
    parse_timestamp
);

/// Renders a byte count for people: `0 B`, `512 kB`, `16.0 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_people_write() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
    }

    #[test]
    fn durations_too_large_are_refused_not_a_panic() {
        let huge = "99999999999999999999999h";
        assert_eq!(
            parse_duration(huge),
            Err(UnitError::Duration(huge.to_owned()))
        );
    }

    #[test]
    fn patterns_and_rules_say_the_same() {
        for (pattern, rule) in [
            (DURATION_PATTERN, DURATION_RULE),
            (SIZE_PATTERN, SIZE_RULE),
            (TIMESTAMP_PATTERN, TIMESTAMP_RULE),
        ] {
            assert!(rule.contains(pattern), "{rule} / {pattern}");
        }
    }

    #[test]
    fn malformed_durations_are_named_in_the_error() {
        for bad in [
            "", "banana", "30", "s", "5 m", "1d", ".5s", "5.s", "1..2s", "-5s", "5m3",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert_eq!(err, UnitError::Duration(bad.to_owned()), "{bad}");
            assert!(err.to_string().contains("30s, 5m"), "{err}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("512kB"), Ok(512_000));
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        for bad in ["", "MiB", "16 MiB", "16mib", "-1", "1.5MiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn timestamps() {
        let t = parse_timestamp("2026-12-01T02:00:00Z").unwrap();
        assert_eq!(t.to_string(), "2026-12-01T02:00:00Z");
        assert!(parse_timestamp("2026-12-01T03:00:00+01:00").is_ok());
        assert!(parse_timestamp("tomorrow").is_err());
        assert!(parse_timestamp("2026-12-01").is_err());
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }

    /// The CEL rules and the parsers must agree on the language; the e2e suite sends the same
    /// examples through the real API server. Here: every unit the parsers know is in the rules.
    #[test]
    fn rules_name_the_units_the_parsers_accept() {
        for unit in ["ms", "s", "m", "h"] {
            assert!(DURATION_RULE.contains(unit));
            assert!(DURATION_LIST_RULE.contains(unit));
        }
        for unit in ["kB", "KiB", "MB", "MiB", "GB", "GiB"] {
            assert!(SIZE_RULE.contains(unit));
        }
    }
}
