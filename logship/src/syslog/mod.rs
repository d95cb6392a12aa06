//! Syslog on the wire: RFC 5424 messages, RFC 6587 framing, and parsing of what syslog
//! senders write (RFC 5424 and the older BSD format of RFC 3164).

mod encode;
mod parse;

pub use encode::{encode_5424, Encoder5424, Header5424, SD_ID};
pub use parse::{parse, Format, Parsed};

/// Facility `user` (1), for records that carry no priority of their own.
pub const FACILITY_USER: u8 = 1;

/// The severity of a record without a priority: stderr is `err` (3), stdout `info` (6).
pub fn default_severity(stream: crate::Stream) -> u8 {
    match stream {
        crate::Stream::Stdout => 6,
        crate::Stream::Stderr => 3,
    }
}
