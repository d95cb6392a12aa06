//! Output split into lines of bounded length.
//!
//! A workload that prints without newlines (a binary dump, a progress bar, a runaway
//! loop) must not make the process reading its output buffer without limit: every reader
//! of task output in keelson (the process driver, the Docker driver, logship's sources)
//! splits lines at [`MAX_LINE_BYTES`]. The pieces of a long line come out in order, each
//! marked `partial` except the last; a cut never splits a UTF-8 character.

use std::collections::VecDeque;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest line kept whole (64 KiB); longer lines are split into pieces this long.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// One line of output, or one piece of a longer one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The text, without its newline (and carriage return); invalid UTF-8 replaced.
    pub text: String,
    /// A piece of a line longer than the maximum, with more of it to come.
    pub partial: bool,
}

/// Splits bytes into lines of at most `max` bytes, carrying what has no newline yet (at
/// most `max` bytes) from one push to the next.
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    carry: Vec<u8>,
    split: u64,
}

impl Default for LineSplitter {
    fn default() -> Self {
        LineSplitter::new(MAX_LINE_BYTES)
    }
}

impl LineSplitter {
    /// A splitter cutting at `max` bytes (at least 4, so a character always fits).
    pub fn new(max: usize) -> Self {
        LineSplitter { max: max.max(4), carry: Vec::new(), split: 0 }
    }

    /// Adds `bytes`, appending to `out` every line (or piece) they complete.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut VecDeque<Line>) {
        while !bytes.is_empty() {
            let (segment, ended, rest) = match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => (&bytes[..i], true, &bytes[i + 1..]),
                None => (bytes, false, &[][..]),
            };
            self.take(segment, out);
            if ended {
                let mut line = std::mem::take(&mut self.carry);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                out.push_back(Line { text: String::from_utf8_lossy(&line).into_owned(), partial: false });
            }
            bytes = rest;
        }
    }

    /// What is left without a newline, as the last line (`None` if nothing is).
    pub fn finish(&mut self) -> Option<Line> {
        (!self.carry.is_empty())
            .then(|| Line { text: String::from_utf8_lossy(&std::mem::take(&mut self.carry)).into_owned(), partial: false })
    }

    /// How many pieces of over-long lines were cut so far.
    pub fn split_count(&self) -> u64 {
        self.split
    }

    /// Appends `segment` (no newline in it) to the carried bytes, cutting off pieces of
    /// `max` bytes while they would pass it.
    fn take(&mut self, mut segment: &[u8], out: &mut VecDeque<Line>) {
        while self.carry.len() + segment.len() > self.max {
            let room = self.max - self.carry.len();
            self.carry.extend_from_slice(&segment[..room]);
            segment = &segment[room..];
            let cut = char_boundary(&self.carry);
            let rest = self.carry.split_off(cut);
            out.push_back(Line { text: String::from_utf8_lossy(&self.carry).into_owned(), partial: true });
            self.split += 1;
            self.carry = rest;
        }
        self.carry.extend_from_slice(segment);
    }
}

/// The largest cut of `bytes` that does not split a UTF-8 character: before the last
/// character if it is incomplete (looking back at most 3 bytes; bytes that are not UTF-8
/// are cut where they are, and a piece is never empty).
pub(crate) fn char_boundary(bytes: &[u8]) -> usize {
    let len = bytes.len();
    let is_continuation = |b: u8| b & 0b1100_0000 == 0b1000_0000;
    let Some(start) = (len.saturating_sub(4)..len).rev().find(|&j| !is_continuation(bytes[j])) else { return len };
    let need = match bytes[start] {
        b if b >> 5 == 0b110 => 2,
        b if b >> 4 == 0b1110 => 3,
        b if b >> 3 == 0b1_1110 => 4,
        _ => 1,
    };
    if len - start >= need || start == 0 {
        len
    } else {
        start
    }
}

/// Lines read from `reader`, bounded as [`LineSplitter`] bounds them: memory stays within
/// one read buffer and one line, however the input is shaped.
#[derive(Debug)]
pub struct LineReader<R> {
    reader: R,
    splitter: LineSplitter,
    ready: VecDeque<Line>,
    buf: Vec<u8>,
    ended: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// Reads `reader`, cutting lines at `max` bytes.
    pub fn new(reader: R, max: usize) -> Self {
        LineReader { reader, splitter: LineSplitter::new(max), ready: VecDeque::new(), buf: vec![0; 16 * 1024], ended: false }
    }

    /// The next line; at the end of the input, what was left without a newline comes as
    /// a last line, then `None`.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            if let Some(line) = self.ready.pop_front() {
                return Ok(Some(line));
            }
            if self.ended {
                return Ok(None);
            }
            if !self.fill().await? {
                self.ended = true;
                if let Some(last) = self.splitter.finish() {
                    return Ok(Some(last));
                }
            }
        }
    }

    /// The next complete line (or piece); `None` at the current end of the input, keeping
    /// what has no newline yet: for following a file that is still being written.
    pub async fn next_complete(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            if let Some(line) = self.ready.pop_front() {
                return Ok(Some(line));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// What was left without a newline, once the input is known to have ended.
    pub fn finish(&mut self) -> Option<Line> {
        self.splitter.finish()
    }

    /// How many pieces of over-long lines were cut so far.
    pub fn split_count(&self) -> u64 {
        self.splitter.split_count()
    }

    /// Reads once; `false` at the end of the input.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let n = self.reader.read(&mut self.buf).await?;
        if n == 0 {
            return Ok(false);
        }
        self.splitter.push(&self.buf[..n], &mut self.ready);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<Line> {
        let mut s = LineSplitter::new(max);
        let mut out = VecDeque::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out.extend(s.finish());
        out.into()
    }

    fn line(text: &str, partial: bool) -> Line {
        Line { text: text.into(), partial }
    }

    #[test]
    fn lines_across_chunks_and_the_unterminated_rest() {
        assert_eq!(split(16, &[b"ab", b"c\nde\r\n", b"f"]), vec![line("abc", false), line("de", false), line("f", false)]);
    }

    #[test]
    fn long_lines_are_cut_into_marked_pieces() {
        let got = split(4, &[b"abcdefghij\nxy\n"]);
        assert_eq!(got, vec![line("abcd", true), line("efgh", true), line("ij", false), line("xy", false)]);
        // Exactly the maximum is one whole line.
        assert_eq!(split(4, &[b"abcd\n"]), vec![line("abcd", false)]);
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        // "é" is two bytes: 3 ASCII bytes and its first byte would fill 4.
        let got = split(4, &["abcéfg\n".as_bytes()]);
        assert_eq!(got, vec![line("abc", true), line("éfg", false)]);
        assert!(got.iter().all(|l| !l.text.contains('\u{fffd}')));
    }

    #[tokio::test]
    async fn a_reader_bounds_memory_on_input_without_newlines() {
        let input = vec![b'a'; 1_000_000];
        let mut r = LineReader::new(&input[..], 1000);
        let mut pieces = 0;
        while let Some(l) = r.next_line().await.expect("read") {
            assert!(l.text.len() <= 1000);
            pieces += 1;
        }
        assert_eq!(pieces, 1000);
        assert_eq!(r.split_count(), 999, "the last piece ends the input, not a cut");
    }
}
