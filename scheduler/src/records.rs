//! How records are stored in `KeyValue`, so that nodes can be upgraded one by one.
//!
//! - Every record carries a schema version (`"schema"` in its JSON object), so a reader
//!   can tell which writer it comes from.
//! - Readers accept fields they do not know (a newer writer added them): no
//!   `deny_unknown_fields` on anything that is stored.
//! - A reader that writes a record back keeps the fields it did not understand
//!   ([`encode_over`]): an older controller marking an allocation `Stopping` does not
//!   strip what a newer one recorded in it.
//! - Files a person writes (deploy files, job files) stay strict: [`parse_strict`]
//!   refuses an unknown field and names it, since there it is a typo.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

const BACKEND: &str = "cluster store";

/// The schema version this code writes.
pub const SCHEMA_VERSION: u64 = 1;

/// Where a record was read from: its version (what a compare-and-swap expects) and its
/// bytes (so that writing it back keeps the fields this version does not know).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) version: u64,
    pub(crate) bytes: Vec<u8>,
}

impl Origin {
    pub(crate) fn of(entry: &keelson_discovery::KvEntry) -> Origin {
        Origin { version: entry.version, bytes: entry.value.clone() }
    }

    /// What a write-back compares: this version, or absent for a new record.
    pub(crate) fn expect(origin: Option<&Origin>) -> keelson_discovery::Expect {
        origin.map_or(keelson_discovery::Expect::Absent, |o| keelson_discovery::Expect::Version(o.version))
    }

    pub(crate) fn bytes(origin: Option<&Origin>) -> Option<&[u8]> {
        origin.map(|o| o.bytes.as_slice())
    }
}

/// Reads a stored record, ignoring fields this version does not know.
pub(crate) fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Backend { backend: BACKEND, source: format!("{key}: {e}").into() })
}

/// Writes a new record, stamped with [`SCHEMA_VERSION`].
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    stamped(serde_json::to_value(value).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?)
}

/// Writes a value that is not a record object (an enum such as `Traffic`) as it is.
pub(crate) fn encode_plain<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })
}

/// Writes `value` back over the record `old` it was read from: the fields of `old` that
/// `T` does not know (at any depth) are kept as they were.
pub(crate) fn encode_over<T: Serialize + DeserializeOwned>(old: Option<&[u8]>, value: &T) -> Result<Vec<u8>> {
    let mut new = serde_json::to_value(value).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?;
    if let Some(old) = old.and_then(|b| serde_json::from_slice::<Value>(b).ok()) {
        for path in unknown_paths::<T>(&old) {
            if let Some(v) = lookup(&old, &path) {
                insert(&mut new, &path, v.clone());
            }
        }
    }
    stamped(new)
}

fn stamped(mut value: Value) -> Result<Vec<u8>> {
    if let Value::Object(map) = &mut value {
        map.insert("schema".into(), Value::from(SCHEMA_VERSION));
    }
    serde_json::to_vec(&value).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })
}

/// Parses a file a person wrote: any field `T` does not know is an error naming it.
pub fn parse_strict<T: DeserializeOwned + Serialize>(what: &'static str, text: &str) -> Result<T> {
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_ignored::deserialize(&mut de, |path| unknown.push(path.to_string()))
        .map_err(|e| Error::invalid(what, e.to_string(), format!("is not a valid {what}")))?;
    de.end().map_err(|e| Error::invalid(what, e.to_string(), format!("is not a valid {what}")))?;
    if unknown.is_empty() {
        // serde_ignored cannot see inside internally tagged enums (serde buffers them):
        // a field of the input that does not come back when the value is written out
        // was not understood either.
        let input: Value = serde_json::from_str(text).map_err(|e| Error::invalid(what, e.to_string(), "is not JSON"))?;
        let output = serde_json::to_value(&value).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?;
        dropped_keys(&input, &output, String::new(), &mut unknown);
    }
    match unknown.first() {
        Some(path) => Err(Error::invalid(what, path.clone(), "is not a known field (a typo?)")),
        None => Ok(value),
    }
}

/// Whether `v` is null, an empty list or an empty object.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Paths of the keys of `input` (not empty) that `output` does not have.
fn dropped_keys(input: &Value, output: &Value, path: String, found: &mut Vec<String>) {
    let join = |key: &str| if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                match o.get(k) {
                    Some(ov) => dropped_keys(v, ov, join(k), found),
                    // An empty value may be one the output skips (`skip_serializing_if`).
                    None if !is_empty(v) => found.push(join(k)),
                    None => {}
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (n, (iv, ov)) in i.iter().zip(o).enumerate() {
                dropped_keys(iv, ov, join(&n.to_string()), found);
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// The paths of the fields in `old` that `T` ignores when reading it.
fn unknown_paths<T: DeserializeOwned>(old: &Value) -> Vec<Vec<Step>> {
    let mut paths = Vec::new();
    let _ = serde_ignored::deserialize::<_, _, T>(old.clone(), |path| paths.push(steps(&path)));
    paths
}

fn steps(path: &serde_ignored::Path<'_>) -> Vec<Step> {
    use serde_ignored::Path;
    match path {
        Path::Root => Vec::new(),
        Path::Seq { parent, index } => {
            let mut s = steps(parent);
            s.push(Step::Index(*index));
            s
        }
        Path::Map { parent, key } => {
            let mut s = steps(parent);
            s.push(Step::Key(key.clone()));
            s
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => steps(parent),
    }
}

fn lookup<'a>(value: &'a Value, path: &[Step]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, step| match step {
        Step::Key(k) => v.get(k),
        Step::Index(i) => v.get(i),
    })
}

/// Puts `v` at `path` in `value` if its parent exists there (a list that shrank, or an
/// object that is now absent, has no place for it any more).
fn insert(value: &mut Value, path: &[Step], v: Value) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut here = value;
    for step in parents {
        let next = match step {
            Step::Key(k) => here.get_mut(k),
            Step::Index(i) => here.get_mut(i),
        };
        let Some(next) = next else { return };
        here = next;
    }
    if let (Step::Key(k), Value::Object(map)) = (last, here) {
        map.entry(k.clone()).or_insert(v);
    }
}

/// Durations in files as humantime text (`"30s"`, `"5m"`).
pub(crate) mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, Serialize, PartialEq)]
    struct Inner {
        a: u32,
    }

    #[derive(Debug, serde::Deserialize, Serialize, PartialEq)]
    struct Outer {
        name: String,
        inner: Inner,
        list: Vec<Inner>,
        maybe: Option<Inner>,
    }

    #[test]
    fn unknown_fields_survive_a_write_back_at_any_depth() {
        let old = br#"{"name":"x","inner":{"a":1,"new_in":true},"list":[{"a":1,"z":[1,2]},{"a":2}],"maybe":{"a":3,"m":"k"},"top":{"deep":1},"schema":9}"#;
        let read: Outer = decode("k", old).expect("tolerant read");
        let changed = Outer { name: "y".into(), ..read };
        let written: Value = serde_json::from_slice(&encode_over(Some(old), &changed).expect("encode")).expect("json");
        assert_eq!(written["name"], "y", "known fields take the new value");
        assert_eq!(written["inner"]["new_in"], true);
        assert_eq!(written["list"][0]["z"], serde_json::json!([1, 2]));
        assert_eq!(written["maybe"]["m"], "k");
        assert_eq!(written["top"]["deep"], 1);
        assert_eq!(written["schema"], SCHEMA_VERSION, "the writer stamps its own schema");
    }

    #[test]
    fn files_people_write_are_strict_and_name_the_typo() {
        let err = parse_strict::<Outer>("test file", r#"{"name":"x","inner":{"a":1,"typo":2},"list":[],"maybe":null}"#).unwrap_err();
        assert!(err.to_string().contains("inner.typo"), "{err}");
        assert!(parse_strict::<Outer>("test file", r#"{"name":"x","inner":{"a":1},"list":[],"maybe":null}"#).is_ok());
        assert!(parse_strict::<Outer>("test file", r#"{"name":"x""#).is_err());
    }
}
