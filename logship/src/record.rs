//! A log record, the labels saying where it came from, and its JSON line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which stream a line came from. Lines read from files and syslog are `Stdout`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    #[default]
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// `"stdout"` or `"stderr"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Where records come from. One `Labels` is shared (through an `Arc`) by every record of
/// the same origin, so a record costs its line, not its labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Labels {
    /// Service (job group, program, application) name.
    pub service: String,
    /// Instance of the service (task id, replica name, process id).
    #[serde(default)]
    pub instance: String,
    /// Docker container id, when the line came from a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Container image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Node (host) the line was produced on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Any other labels (a file's path, a syslog peer, user labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

impl Labels {
    /// Labels naming `service` and `instance` only.
    pub fn new(service: impl Into<String>, instance: impl Into<String>) -> Self {
        Labels { service: service.into(), instance: instance.into(), ..Labels::default() }
    }

    /// With the container id.
    pub fn with_container(mut self, container: impl Into<String>) -> Self {
        self.container = Some(container.into());
        self
    }

    /// With the image.
    pub fn with_image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// With the node.
    pub fn with_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// With one more label.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }
}

/// One log line with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// When the line was written (from the source when it says, else when it was read).
    pub timestamp: SystemTime,
    /// Where the line came from.
    pub labels: Arc<Labels>,
    /// Stdout or stderr.
    pub stream: Stream,
    /// The line, without its newline.
    pub line: String,
    /// A piece of a line longer than the source's line limit, with more of it in the
    /// records that follow (Docker's 16 KiB pieces, [`crate::MAX_LINE_BYTES`]).
    pub partial: bool,
    /// The syslog priority (facility × 8 + severity) when the line came with one.
    pub priority: Option<u8>,
    /// Fields parsed out of the line (by [`crate::transform::ParseJson`]).
    pub fields: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

impl Record {
    /// A record of `line` from `labels`, stamped now.
    pub fn new(labels: Arc<Labels>, stream: Stream, line: impl Into<String>) -> Self {
        Record { timestamp: SystemTime::now(), labels, stream, line: line.into(), partial: false, priority: None, fields: None }
    }

    /// A record stamped now, with labels naming `service` and `instance` only.
    pub fn now(service: impl Into<String>, instance: impl Into<String>, stream: Stream, line: impl Into<String>) -> Self {
        Record::new(Arc::new(Labels::new(service, instance)), stream, line)
    }

    /// The service label.
    pub fn service(&self) -> &str {
        &self.labels.service
    }

    /// The instance label.
    pub fn instance(&self) -> &str {
        &self.labels.instance
    }

    /// The record as one JSON line (with trailing newline). Newlines inside the text are
    /// escaped by JSON, so one record is always one line.
    pub fn to_json_line(&self) -> String {
        let mut s = String::with_capacity(self.line.len() + 128);
        self.write_json(&mut s);
        s.push('\n');
        s
    }

    /// Appends the record as JSON (no newline) to `out`.
    pub fn write_json(&self, out: &mut String) {
        let wire = RecordJson {
            timestamp: humantime::format_rfc3339_nanos(self.timestamp).to_string(),
            labels: std::borrow::Cow::Borrowed(&*self.labels),
            stream: self.stream,
            line: std::borrow::Cow::Borrowed(&self.line),
            partial: self.partial,
            priority: self.priority,
            fields: self.fields.as_deref().map(std::borrow::Cow::Borrowed),
        };
        // Serialising strings, numbers and maps of JSON values cannot fail.
        if let Ok(text) = serde_json::to_string(&wire) {
            out.push_str(&text);
        }
    }

    /// Parses one JSON line written by [`Record::to_json_line`].
    pub fn from_json(text: &str) -> Result<Record> {
        let wire: RecordJson<'static> = serde_json::from_str(text.trim_end()).map_err(|e| Error::InvalidInput {
            field: "record JSON",
            value: text.chars().take(200).collect(),
            reason: e.to_string(),
        })?;
        let timestamp = humantime::parse_rfc3339(&wire.timestamp).map_err(|e| Error::InvalidInput {
            field: "record timestamp",
            value: wire.timestamp.clone(),
            reason: e.to_string(),
        })?;
        Ok(Record {
            timestamp,
            labels: Arc::new(wire.labels.into_owned()),
            stream: wire.stream,
            line: wire.line.into_owned(),
            partial: wire.partial,
            priority: wire.priority,
            fields: wire.fields.map(|f| Box::new(f.into_owned())),
        })
    }
}

/// The JSON shape of a record: labels flattened beside the line, so a line reads
/// `{"timestamp":…,"service":"web","instance":"web-1","stream":"stdout","line":"…"}`.
#[derive(Serialize, Deserialize)]
struct RecordJson<'a> {
    timestamp: String,
    #[serde(flatten)]
    labels: std::borrow::Cow<'a, Labels>,
    #[serde(default)]
    stream: Stream,
    line: std::borrow::Cow<'a, str>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    partial: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fields: Option<std::borrow::Cow<'a, serde_json::Map<String, serde_json::Value>>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_round_trips_and_stays_one_line() {
        let labels = Arc::new(Labels::new("web", "web-1").with_container("c0ffee").with_node("n1").with("path", "/x"));
        let mut r = Record::new(labels, Stream::Stderr, "two\nlines \"quoted\"");
        r.partial = true;
        r.priority = Some(11);
        let line = r.to_json_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.contains("\"stream\":\"stderr\"") && line.contains("\"service\":\"web\""), "{line}");
        let back = Record::from_json(&line).expect("parses");
        assert_eq!(back, r);
    }

    #[test]
    fn bad_json_names_the_value() {
        match Record::from_json("{not json") {
            Err(Error::InvalidInput { field: "record JSON", value, .. }) => assert_eq!(value, "{not json"),
            other => panic!("{other:?}"),
        }
    }
}
