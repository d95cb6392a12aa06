//! Request checks made before routing, and header hygiene: the host a request is for,
//! paths an upstream could read differently from the router, hop-by-hop headers.

use http::header::{HeaderMap, HeaderName, CONNECTION, HOST};

/// Headers that describe one hop's connection and must not be forwarded (RFC 9110 7.6.1),
/// plus the legacy `proxy-connection` and `keep-alive`. Names, not strings: removing by
/// string parsed each name again on every request (twice per request, 4% of edge's
/// instructions under callgrind).
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Rejects paths an upstream could resolve differently from the router: dot segments
/// (plain or percent-encoded), encoded slashes and backslashes, NUL. Forwarding them as
/// they are would let `/public/../admin` reach what `/admin` routing would have refused.
pub(crate) fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') && path != "*" {
        return Err("must start with '/'");
    }
    // Most paths have nothing to decode and no dot after a slash: nothing to allocate.
    if !path.bytes().any(|b| b == b'%' || b == b'\\') && !path.contains("/.") {
        return Ok(());
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return Err("encoded slash or backslash");
    }
    if lower.contains("%00") {
        return Err("NUL byte");
    }
    let decoded = lower.replace("%2e", ".");
    if decoded.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("dot segment");
    }
    Ok(())
}

/// The host a request is for: the absolute-form URI's authority, else the Host header;
/// lower-cased, port removed. `None` if absent or malformed.
pub(crate) fn request_host(req: &http::request::Parts) -> Option<String> {
    let authority = match req.uri.authority() {
        Some(a) => a.clone(),
        None => req.headers.get(HOST)?.to_str().ok()?.parse::<http::uri::Authority>().ok()?,
    };
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Removes hop-by-hop headers, including any header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}
