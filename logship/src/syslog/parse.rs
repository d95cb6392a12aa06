//! Parsing what syslog senders write: RFC 5424, the BSD format of RFC 3164, and anything
//! else as a bare message.

use std::time::SystemTime;

/// One message, parsed as far as it goes. Fields a format does not have, or that are
/// the nil value `-`, are `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Parsed {
    /// PRI (facility × 8 + severity); `None` when the message had none.
    pub priority: Option<u8>,
    /// TIMESTAMP, when it parsed.
    pub timestamp: Option<SystemTime>,
    /// HOSTNAME.
    pub hostname: Option<String>,
    /// APP-NAME (RFC 3164: the tag).
    pub app_name: Option<String>,
    /// PROCID (RFC 3164: the pid in `tag[pid]:`).
    pub procid: Option<String>,
    /// MSGID.
    pub msgid: Option<String>,
    /// STRUCTURED-DATA elements as (id, [(name, value)]), values unescaped.
    pub structured: Vec<(String, Vec<(String, String)>)>,
    /// MSG, without a UTF-8 BOM; invalid UTF-8 replaced.
    pub message: String,
    /// Which format it was.
    pub format: Format,
}

/// How a message was read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// RFC 5424.
    Rfc5424,
    /// RFC 3164 (BSD).
    Rfc3164,
    /// Neither: the whole input is the message.
    #[default]
    Unparsed,
}

/// Parses one syslog message (its framing already removed). Never fails: what is not
/// syslog comes back as [`Format::Unparsed`] with the whole input as the message.
pub fn parse(bytes: &[u8]) -> Parsed {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let Some((priority, rest)) = pri(bytes) else { return unparsed(bytes) };
    if let Some(after) = rest.strip_prefix(b"1 ") {
        if let Some(p) = rfc5424(priority, after) {
            return p;
        }
    }
    rfc3164(priority, rest)
}

fn unparsed(bytes: &[u8]) -> Parsed {
    Parsed { message: text(bytes), ..Parsed::default() }
}

fn text(bytes: &[u8]) -> String {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    String::from_utf8_lossy(bytes).into_owned()
}

/// `<PRI>`: 1 to 3 digits, at most 191.
fn pri(bytes: &[u8]) -> Option<(u8, &[u8])> {
    let rest = bytes.strip_prefix(b"<")?;
    let end = rest.iter().take(4).position(|b| *b == b'>')?;
    if end == 0 || !rest[..end].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value: u16 = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
    (value <= 191).then_some((value as u8, &rest[end + 1..]))
}

/// The next space-separated header field and the rest after its space.
fn field(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(b' ', bytes)?;
    Some((&bytes[..end], &bytes[end + 1..]))
}

fn nil_or(value: &[u8]) -> Option<String> {
    (value != b"-").then(|| String::from_utf8_lossy(value).into_owned())
}

fn rfc5424(priority: u8, bytes: &[u8]) -> Option<Parsed> {
    let (timestamp, rest) = field(bytes)?;
    let (hostname, rest) = field(rest)?;
    let (app_name, rest) = field(rest)?;
    let (procid, rest) = field(rest)?;
    // MSGID may end the message (no SD, no MSG).
    let (msgid, rest) = field(rest).unwrap_or((rest, &[]));
    let (structured, rest) = structured_data(rest)?;
    let message = rest.strip_prefix(b" ").unwrap_or(rest);
    Some(Parsed {
        priority: Some(priority),
        timestamp: (timestamp != b"-")
            .then(|| std::str::from_utf8(timestamp).ok().and_then(|t| humantime::parse_rfc3339_weak(t).ok()))
            .flatten(),
        hostname: nil_or(hostname),
        app_name: nil_or(app_name),
        procid: nil_or(procid),
        msgid: nil_or(msgid),
        structured,
        message: text(message),
        format: Format::Rfc5424,
    })
}

type Elements = Vec<(String, Vec<(String, String)>)>;

/// `-` or one or more `[id name="value" ...]`; `None` if malformed.
fn structured_data(bytes: &[u8]) -> Option<(Elements, &[u8])> {
    if bytes.is_empty() {
        return Some((Vec::new(), bytes));
    }
    if let Some(rest) = bytes.strip_prefix(b"-") {
        return Some((Vec::new(), rest));
    }
    let mut elements = Vec::new();
    let mut rest = bytes;
    while let Some(inner) = rest.strip_prefix(b"[") {
        let id_end = inner.iter().position(|b| *b == b' ' || *b == b']')?;
        let id = String::from_utf8_lossy(&inner[..id_end]).into_owned();
        let mut at = &inner[id_end..];
        let mut params = Vec::new();
        loop {
            if let Some(after) = at.strip_prefix(b"]") {
                rest = after;
                break;
            }
            let after_space = at.strip_prefix(b" ")?;
            let eq = after_space.iter().position(|b| *b == b'=')?;
            let name = String::from_utf8_lossy(&after_space[..eq]).into_owned();
            let mut value_bytes = after_space[eq + 1..].strip_prefix(b"\"")?;
            let mut value = Vec::new();
            loop {
                match value_bytes.first()? {
                    b'\\' if matches!(value_bytes.get(1), Some(b'"' | b'\\' | b']')) => {
                        value.push(value_bytes[1]);
                        value_bytes = &value_bytes[2..];
                    }
                    b'"' => {
                        value_bytes = &value_bytes[1..];
                        break;
                    }
                    b => {
                        value.push(*b);
                        value_bytes = &value_bytes[1..];
                    }
                }
            }
            params.push((name, String::from_utf8_lossy(&value).into_owned()));
            at = value_bytes;
        }
        elements.push((id, params));
    }
    Some((elements, rest))
}

/// `Mmm dd hh:mm:ss HOST TAG[PID]: MSG` (RFC 3164 section 4.1), forgiving: a missing
/// timestamp or host leaves the rest as the message.
fn rfc3164(priority: u8, bytes: &[u8]) -> Parsed {
    let mut p = Parsed { priority: Some(priority), format: Format::Rfc3164, ..Parsed::default() };
    let mut rest = bytes;
    // "Mmm dd hh:mm:ss " is 16 bytes; the day may be space-padded ("Feb  5").
    if rest.len() >= 16 && rest[3] == b' ' && rest[6] == b' ' && rest[9] == b':' && rest[12] == b':' && rest[15] == b' ' {
        p.timestamp = bsd_timestamp(&rest[..15]);
        rest = &rest[16..];
        if let Some((host, after)) = field(rest) {
            // A host is one word without ':' or '['; else it was the tag.
            if !host.is_empty() && !host.contains(&b':') && !host.contains(&b'[') {
                p.hostname = Some(String::from_utf8_lossy(host).into_owned());
                rest = after;
            }
        }
    }
    // TAG: up to 32 alphanumerics (plus common punctuation), then '[pid]' and/or ':'.
    let tag_end = rest.iter().take(48).position(|b| matches!(b, b'[' | b':' | b' '));
    if let Some(end) = tag_end.filter(|e| *e > 0) {
        let tag = &rest[..end];
        let mut after = &rest[end..];
        let mut procid = None;
        if let Some(inside) = after.strip_prefix(b"[") {
            if let Some(close) = inside.iter().position(|b| *b == b']') {
                procid = Some(String::from_utf8_lossy(&inside[..close]).into_owned());
                after = &inside[close + 1..];
            }
        }
        if let Some(message) = after.strip_prefix(b":") {
            p.app_name = Some(String::from_utf8_lossy(tag).into_owned());
            p.procid = procid;
            rest = message.strip_prefix(b" ").unwrap_or(message);
        }
    }
    p.message = text(rest);
    p
}

/// `Mmm dd hh:mm:ss` in the current year (RFC 3164 has none), UTC.
fn bsd_timestamp(t: &[u8]) -> Option<SystemTime> {
    let t = std::str::from_utf8(t).ok()?;
    let month =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"].iter().position(|m| *m == &t[..3])? + 1;
    let day: u32 = t[4..6].trim().parse().ok()?;
    let year = humantime::format_rfc3339(SystemTime::now()).to_string()[..4].to_owned();
    humantime::parse_rfc3339(&format!("{year}-{month:02}-{day:02}T{}Z", &t[7..15])).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc5424_with_structured_data() {
        let p = parse(b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"App\\]lication\"][x@1 a=\"b\"] \xef\xbb\xbfAn application event");
        assert_eq!(p.format, Format::Rfc5424);
        assert_eq!(p.priority, Some(165));
        assert_eq!(p.hostname.as_deref(), Some("mymachine.example.com"));
        assert_eq!(p.app_name.as_deref(), Some("evntslog"));
        assert_eq!(p.procid, None);
        assert_eq!(p.msgid.as_deref(), Some("ID47"));
        assert_eq!(p.structured.len(), 2);
        assert_eq!(p.structured[0].1[1], ("eventSource".to_owned(), "App]lication".to_owned()));
        assert_eq!(p.message, "An application event");
        assert!(p.timestamp.is_some());
    }

    #[test]
    fn rfc5424_with_nothing_after_the_header() {
        let p = parse(b"<34>1 - - - - -");
        assert_eq!((p.format, p.priority, p.message.as_str()), (Format::Rfc5424, Some(34), ""));
        let p = parse(b"<34>1 - host app 12 -");
        assert_eq!((p.procid.as_deref(), p.msgid), (Some("12"), None));
    }

    #[test]
    fn rfc3164_with_host_tag_and_pid() {
        let p = parse(b"<34>Oct 11 22:14:15 mymachine su[230]: 'su root' failed for lonvick on /dev/pts/8");
        assert_eq!(p.format, Format::Rfc3164);
        assert_eq!(p.hostname.as_deref(), Some("mymachine"));
        assert_eq!(p.app_name.as_deref(), Some("su"));
        assert_eq!(p.procid.as_deref(), Some("230"));
        assert_eq!(p.message, "'su root' failed for lonvick on /dev/pts/8");
        assert!(p.timestamp.is_some());
        let p = parse(b"<13>Feb  5 17:32:18 10.0.0.99 Use the BFG!");
        assert_eq!((p.hostname.as_deref(), p.app_name, p.message.as_str()), (Some("10.0.0.99"), None, "Use the BFG!"));
        let p = parse(b"<13>myapp: no timestamp");
        assert_eq!((p.app_name.as_deref(), p.message.as_str()), (Some("myapp"), "no timestamp"));
    }

    #[test]
    fn garbage_is_a_message_never_a_panic() {
        for input in [
            &b""[..],
            b"<",
            b"<>",
            b"<999>x",
            b"<12",
            b"\xff\xfe\x00binary\x01",
            b"<13>1 ",
            b"<13>1 [",
            b"<13>1 - - - - [a b=\"",
            b"<13>1 - - - - [a b=\"c\\\"] m",
        ] {
            let p = parse(input);
            assert!(p.message.len() <= input.len() * 3 + 3, "{input:?}");
        }
        // Random bytes after every prefix the parser branches on.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for prefix in [&b""[..], b"<13>", b"<13>1 ", b"<13>1 - h a p m [i ", b"<13>Oct 11 22:14:15 ", b"<13>Oct 11 22:14:15 host tag["] {
            for _ in 0..5_000 {
                let mut input = prefix.to_vec();
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let alphabet = b" <>[]=\\\"-:1\xc3\xa9\xff";
                input.extend((0..(x % 40)).map(|i| alphabet[((x >> (i % 50)) as usize + i as usize) % alphabet.len()]));
                let _ = parse(&input);
            }
        }
        assert_eq!(parse(b"<999>x").format, Format::Unparsed);
        assert_eq!(parse(b"\xff\xfe").message, "\u{fffd}\u{fffd}");
    }
}
