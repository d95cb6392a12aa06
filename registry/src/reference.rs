//! Repository names, tags and references, validated as the distribution-spec defines
//! them. A validated name can never climb out of a directory or a key prefix: its
//! components are lower-case alphanumerics joined by single separators.

use std::fmt;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Longest repository name accepted (the spec suggests clients keep the host and name
/// under 255 characters).
pub const MAX_NAME_LEN: usize = 255;

/// A repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepoName(String);

fn invalid(field: &'static str, value: &str, reason: &str) -> Error {
    Error::InvalidInput { field, value: value.chars().take(300).collect(), reason: reason.to_owned() }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator: '.', '_', '__', or a run of '-'.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

impl RepoName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for RepoName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.len() > MAX_NAME_LEN {
            return Err(invalid("repository name", s, "longer than 255 characters"));
        }
        if !s.split('/').all(valid_component) {
            return Err(invalid(
                "repository name",
                s,
                "must be '/'-separated components of a-z and 0-9 joined by '.', '_', '__' or dashes",
            ));
        }
        Ok(RepoName(s.to_owned()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(String);

impl Tag {
    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Tag {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if !ok {
            return Err(invalid("tag", s, "must match [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"));
        }
        Ok(Tag(s.to_owned()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    /// By tag.
    Tag(Tag),
    /// By digest.
    Digest(Digest),
}

impl std::str::FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse().map_err(Error::from)?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_names_and_refuses_traversal() {
        for good in ["a", "library/busybox", "a.b_c__d---e/f0", "x/y/z"] {
            good.parse::<RepoName>().expect(good);
        }
        for bad in ["", "A", "../etc", "a/../b", "a//b", "a/", "/a", "a..b", "a___b", "-a", "a-", "a_.b", "a%2e", &"a".repeat(256)] {
            let err = bad.parse::<RepoName>().expect_err(bad);
            assert!(err.to_string().contains("repository name"), "{err}");
        }
    }

    #[test]
    fn tags_and_references() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_v1.2-rc".parse::<Tag>().is_ok());
        for bad in ["", ".x", "-x", "a/b", &"t".repeat(129)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad}");
        }
        assert!(matches!("v1".parse::<Reference>(), Ok(Reference::Tag(_))));
        let d = Digest::of(b"x");
        assert_eq!(d.to_string().parse::<Reference>().expect("digest"), Reference::Digest(d));
        assert!("sha256:zz".parse::<Reference>().is_err());
    }
}
