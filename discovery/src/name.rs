//! Validated names. A service name ends up in DNS (`<name>.service.<domain>`), so it
//! follows the DNS label rules from the start rather than failing later in a resolver.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A service name: one DNS label (RFC 1123): 1 to 63 characters of `a-z`, `0-9` and `-`,
/// not starting or ending with `-`. Upper case is rejected rather than folded, so that
/// two spellings never name the same service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

impl ServiceName {
    /// Validates `name` as a DNS label.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        validate_label("service name", &name)?;
        Ok(ServiceName(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for ServiceName {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        ServiceName::new(value)
    }
}

impl From<ServiceName> for String {
    fn from(value: ServiceName) -> Self {
        value.0
    }
}

impl std::str::FromStr for ServiceName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ServiceName::new(s)
    }
}

/// Checks one DNS label; `field` names the argument in the error.
pub fn validate_label(field: &'static str, value: &str) -> Result<()> {
    let reason = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > 63 {
        Some("must be at most 63 characters (DNS label)")
    } else if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        Some("may contain only a-z, 0-9 and '-' (DNS label)")
    } else if value.starts_with('-') || value.ends_with('-') {
        Some("must not start or end with '-' (DNS label)")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::invalid(field, value, reason)),
        None => Ok(()),
    }
}

/// An instance id: 1 to 128 printable ASCII characters without `/` or whitespace, since it
/// becomes the last segment of a key in cluster state.
pub fn validate_instance_id(value: &str) -> Result<()> {
    if value.is_empty() || value.len() > 128 {
        return Err(Error::invalid("instance id", value, "must be 1 to 128 characters"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return Err(Error::invalid("instance id", value, "may contain only printable ASCII without '/'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "web", "web-2", "0abc", &"x".repeat(63)] {
            assert_eq!(ServiceName::new(ok).expect("valid").as_str(), ok);
        }
    }

    #[test]
    fn rejects_bad_labels_naming_the_value() {
        for bad in ["", "-web", "web-", "Web", "web.api", "we b", "web_api", &"x".repeat(64)] {
            let err = ServiceName::new(bad).expect_err(bad);
            assert!(matches!(err, Error::InvalidInput { field: "service name", .. }), "{err}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "message names the value: {err}");
        }
    }

    #[test]
    fn rejects_bad_instance_ids() {
        assert!(validate_instance_id("web-1").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_instance_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deserialising_validates() {
        let err = serde_json::from_str::<ServiceName>("\"Bad Name\"").expect_err("rejected");
        assert!(err.to_string().contains("service name"), "{err}");
    }
}
