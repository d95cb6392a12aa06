//! RFC 5424 messages, optionally octet-counted (RFC 6587 section 3.4.1).

use std::io::Write;

use crate::record::Record;

/// The structured-data id of keelson's labels. 32473 is the private enterprise number
/// RFC 5612 reserves for documentation; a site with its own number sets its own id.
pub const SD_ID: &str = "keelson@32473";

/// What goes into every message's header besides the record itself.
#[derive(Clone, Debug)]
pub struct Header5424<'a> {
    /// HOSTNAME when the record has no `node` label (`-` if empty).
    pub hostname: &'a str,
    /// Facility for records without a priority of their own (0 to 23).
    pub facility: u8,
    /// Structured-data id for the container, image and partial labels.
    pub sd_id: &'a str,
}

/// Appends `record` as one RFC 5424 message to `out`, prefixed with its length and a
/// space when `octet_counted`. Header fields are cut to their RFC lengths and anything
/// outside printable US-ASCII in them becomes `_`; MSG is the line's UTF-8 as is.
pub fn encode_5424(out: &mut Vec<u8>, record: &Record, header: &Header5424<'_>, octet_counted: bool) {
    Encoder5424::default().encode(out, record, header, octet_counted);
}

/// [`encode_5424`] for many records: records read together share a timestamp, so its
/// text is formatted once.
#[derive(Debug, Default)]
pub struct Encoder5424 {
    last: Option<(std::time::SystemTime, String)>,
}

impl Encoder5424 {
    /// Appends `record` to `out`, as [`encode_5424`] does.
    pub fn encode(&mut self, out: &mut Vec<u8>, record: &Record, header: &Header5424<'_>, octet_counted: bool) {
        encode_with(out, record, header, octet_counted, self.timestamp(record.timestamp));
    }

    fn timestamp(&mut self, t: std::time::SystemTime) -> &str {
        if self.last.as_ref().is_none_or(|(at, _)| *at != t) {
            self.last = Some((t, humantime::format_rfc3339_micros(t).to_string()));
        }
        self.last.as_ref().map_or("-", |(_, text)| text.as_str())
    }
}

fn encode_with(out: &mut Vec<u8>, record: &Record, header: &Header5424<'_>, octet_counted: bool, timestamp: &str) {
    let start = out.len();
    if octet_counted {
        // Room for the length, filled in once the message is written: up to 10 digits
        // and the space, moved down if the length is shorter.
        out.extend_from_slice(&[b' '; 11]);
    }
    let body = out.len();
    let priority = record.priority.unwrap_or_else(|| header.facility.min(23) * 8 + super::default_severity(record.stream));
    let labels = &*record.labels;
    out.push(b'<');
    out.extend_from_slice(itoa::Buffer::new().format(priority).as_bytes());
    out.extend_from_slice(b">1 ");
    out.extend_from_slice(timestamp.as_bytes());
    out.push(b' ');
    field(out, labels.node.as_deref().unwrap_or(header.hostname), 255);
    out.push(b' ');
    field(out, &labels.service, 48);
    out.push(b' ');
    field(out, &labels.instance, 128);
    out.push(b' ');
    field(out, record.stream.as_str(), 32);
    out.push(b' ');
    let params: [(&str, Option<&str>); 3] =
        [("container", labels.container.as_deref()), ("image", labels.image.as_deref()), ("partial", record.partial.then_some("true"))];
    if params.iter().all(|(_, v)| v.is_none()) {
        out.push(b'-');
    } else {
        out.push(b'[');
        field(out, header.sd_id, 32);
        for (name, value) in params {
            if let Some(value) = value {
                let _ = write!(out, " {name}=\"");
                for b in value.bytes() {
                    // RFC 5424 section 6.3.3: '"', '\' and ']' are escaped in values.
                    if matches!(b, b'"' | b'\\' | b']') {
                        out.push(b'\\');
                    }
                    out.push(b);
                }
                out.push(b'"');
            }
        }
        out.push(b']');
    }
    out.push(b' ');
    out.extend_from_slice(record.line.as_bytes());
    if octet_counted {
        let len = out.len() - body;
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(len).as_bytes();
        let prefix = start + 11 - digits.len() - 1;
        out[prefix..prefix + digits.len()].copy_from_slice(digits);
        // The unused bytes before the prefix go: shift the frame down to `start`.
        if prefix > start {
            out.drain(start..prefix);
        }
    }
}

/// Appends `value` as a header field: 1 to `max` printable US-ASCII characters, `-` when empty.
fn field(out: &mut Vec<u8>, value: &str, max: usize) {
    if value.is_empty() {
        out.push(b'-');
        return;
    }
    out.extend(value.bytes().take(max).map(|b| if (33..=126).contains(&b) { b } else { b'_' }));
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::{Labels, Stream};

    fn header() -> Header5424<'static> {
        Header5424 { hostname: "host1", facility: 1, sd_id: SD_ID }
    }

    #[test]
    fn octet_counted_message_has_every_field() {
        let labels = Arc::new(Labels::new("web", "web-1").with_container("c0]ffee"));
        let mut r = Record::new(labels, Stream::Stderr, "boom");
        r.timestamp = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        r.partial = true;
        let mut out = Vec::new();
        encode_5424(&mut out, &r, &header(), true);
        let text = String::from_utf8(out).expect("utf-8");
        let (len, msg) = text.split_once(' ').expect("length prefix");
        assert_eq!(len.parse::<usize>().expect("number"), msg.len());
        assert_eq!(
            msg,
            "<11>1 2023-11-14T22:13:20.123456Z host1 web web-1 stderr [keelson@32473 container=\"c0\\]ffee\" partial=\"true\"] boom"
        );
    }

    #[test]
    fn header_fields_are_cut_and_cleaned() {
        let labels = Arc::new(Labels::new("a b".repeat(30), "").with_node("nöde"));
        let r = Record::new(labels, Stream::Stdout, "x");
        let mut out = Vec::new();
        encode_5424(&mut out, &r, &header(), false);
        let text = String::from_utf8(out).expect("utf-8");
        let fields: Vec<&str> = text.split(' ').collect();
        assert_eq!(fields[0], "<14>1");
        assert_eq!(fields[2], "n__de", "non-ASCII bytes become _");
        assert_eq!(fields[3].len(), 48);
        assert_eq!(fields[4], "-", "empty PROCID is the nil value");
        assert_eq!(fields[6], "-", "no structured data");
    }

    #[test]
    fn consecutive_frames_parse_back_by_length() {
        let mut out = Vec::new();
        for i in 0..200 {
            encode_5424(&mut out, &Record::now("s", "i", Stream::Stdout, "y".repeat(i * 7)), &header(), true);
        }
        let mut rest = &out[..];
        let mut n = 0;
        while !rest.is_empty() {
            let sp = rest.iter().position(|b| *b == b' ').expect("space");
            let len: usize = std::str::from_utf8(&rest[..sp]).expect("ascii").parse().expect("number");
            assert!(rest[sp + 1..sp + 1 + len].ends_with("y".repeat(n * 7).as_bytes()));
            rest = &rest[sp + 1 + len..];
            n += 1;
        }
        assert_eq!(n, 200);
    }
}
