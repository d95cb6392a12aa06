//! A log record and its JSON line.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One log line with where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When the line was read, RFC 3339 in UTC in JSON.
    #[serde(with = "rfc3339")]
    pub timestamp: SystemTime,
    /// Service name.
    pub service: String,
    /// Instance id.
    pub instance: String,
    /// Stdout or stderr.
    pub stream: Stream,
    /// The line, without its newline.
    pub line: String,
    /// A piece of a line longer than [`crate::MAX_LINE_BYTES`], with more of it in the
    /// records that follow.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

impl Record {
    /// A record stamped now.
    pub fn now(service: impl Into<String>, instance: impl Into<String>, stream: Stream, line: impl Into<String>) -> Self {
        Record {
            timestamp: SystemTime::now(),
            service: service.into(),
            instance: instance.into(),
            stream,
            line: line.into(),
            partial: false,
        }
    }

    /// The record as one JSON line (with trailing newline). Newlines inside the text are
    /// escaped by JSON, so one record is always one line.
    pub fn to_json_line(&self) -> String {
        // Serialising strings and a timestamp cannot fail.
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Checks that `service` can name a log file: 1 to 128 of `A-Za-z0-9_.-`, starting
/// alphanumeric.
pub fn validate_service(service: &str) -> Result<()> {
    let ok = !service.is_empty()
        && service.len() <= 128
        && service.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && service.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput {
            field: "record service",
            value: service.to_owned(),
            reason: "must be 1 to 128 of A-Za-z0-9_.- starting with a letter or digit".into(),
        })
    }
}

mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_nanos(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_round_trips_and_stays_one_line() {
        let r = Record::now("web", "web-1", Stream::Stderr, "two\nlines \"quoted\"");
        let line = r.to_json_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.contains("\"stream\":\"stderr\""), "{line}");
        let back: Record = serde_json::from_str(&line).expect("parses");
        assert_eq!(back, r);
    }
}
