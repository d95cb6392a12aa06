//! `Range` on blob reads (RFC 9110, one range) and `Content-Range` on upload chunks
//! (the distribution-spec's `<start>-<end>`, inclusive).

use crate::error::{Error, Result};

/// What a `Range` header asks of a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadRange {
    /// The whole blob: no header, or one this server ignores (several ranges, a unit
    /// other than bytes, garbage), as RFC 9110 permits.
    Whole,
    /// `offset`, `len` bytes (206).
    Part(u64, u64),
    /// Starts past the end (416).
    Unsatisfiable,
}

/// Parses `Range: bytes=<a>-<b>`, `bytes=<a>-` or `bytes=-<suffix>`.
pub(crate) fn read_range(header: Option<&str>, size: u64) -> ReadRange {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return ReadRange::Whole };
    if spec.contains(',') {
        // Several (perhaps overlapping, out of order) ranges: answering them would take a
        // multipart body per request; the whole blob is a correct answer.
        return ReadRange::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return ReadRange::Whole };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        (true, false) => match num(b) {
            // A suffix: the last `n` bytes.
            Some(0) => ReadRange::Unsatisfiable,
            Some(_) if size == 0 => ReadRange::Unsatisfiable,
            Some(n) => {
                let n = n.min(size);
                ReadRange::Part(size - n, n)
            }
            None => ReadRange::Whole,
        },
        (false, _) => {
            let Some(start) = num(a) else { return ReadRange::Whole };
            let end = if b.is_empty() { Some(u64::MAX) } else { num(b) };
            match end {
                None => ReadRange::Whole,
                Some(end) if end < start => ReadRange::Whole,
                Some(_) if start >= size => ReadRange::Unsatisfiable,
                Some(end) => ReadRange::Part(start, end.min(size - 1) - start + 1),
            }
        }
        (true, true) => ReadRange::Whole,
    }
}

/// Parses an upload chunk's `Content-Range: <start>-<end>` (a `bytes ` prefix and a
/// `/<total>` suffix are tolerated, as some clients send them). Returns (start, len).
pub(crate) fn chunk_range(header: &str) -> Result<(u64, u64)> {
    let bad = || Error::InvalidInput {
        field: "Content-Range",
        value: header.chars().take(100).collect(),
        reason: "must be <start>-<end> with start <= end".into(),
    };
    let spec = header.trim();
    let spec = spec.strip_prefix("bytes").map(|s| s.trim_start_matches([' ', '='])).unwrap_or(spec);
    let spec = spec.split('/').next().unwrap_or("");
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let start: u64 = a.trim().parse().map_err(|_| bad())?;
    let end: u64 = b.trim().parse().map_err(|_| bad())?;
    if end < start {
        return Err(bad());
    }
    Ok((start, end - start + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ranges() {
        assert_eq!(read_range(None, 10), ReadRange::Whole);
        assert_eq!(read_range(Some("bytes=2-5"), 10), ReadRange::Part(2, 4));
        assert_eq!(read_range(Some("bytes=2-"), 10), ReadRange::Part(2, 8));
        assert_eq!(read_range(Some("bytes=5-100"), 10), ReadRange::Part(5, 5), "clipped");
        assert_eq!(read_range(Some("bytes=-3"), 10), ReadRange::Part(7, 3));
        assert_eq!(read_range(Some("bytes=-30"), 10), ReadRange::Part(0, 10));
        assert_eq!(read_range(Some("bytes=10-"), 10), ReadRange::Unsatisfiable);
        assert_eq!(read_range(Some("bytes=0-1,0-1"), 10), ReadRange::Whole, "overlapping ranges");
        assert_eq!(read_range(Some("bytes=5-2"), 10), ReadRange::Whole, "reversed");
        assert_eq!(read_range(Some("items=0-1"), 10), ReadRange::Whole);
        assert_eq!(read_range(Some("bytes=x-y"), 10), ReadRange::Whole);
        assert_eq!(read_range(Some("bytes=0-0"), 0), ReadRange::Unsatisfiable);
    }

    #[test]
    fn chunk_ranges() {
        assert_eq!(chunk_range("0-99").expect("plain"), (0, 100));
        assert_eq!(chunk_range("bytes 100-199/*").expect("prefixed"), (100, 100));
        for bad in ["", "5", "9-3", "a-b", "-1"] {
            let e = chunk_range(bad).expect_err(bad);
            assert!(e.to_string().contains("Content-Range"), "{e}");
        }
    }
}
