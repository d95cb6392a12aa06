//! Constraint and affinity evaluation, compiled once per plan: regexes are built and
//! versions parsed up front, so a bad job fails before any placement and evaluation per
//! node is cheap.

use std::cmp::Ordering;

use crate::error::{Error, Result};
use crate::placement::model::{ConstraintOp, Node};

/// A compiled node predicate.
#[derive(Debug)]
pub(crate) struct Matcher {
    pub(crate) target: String,
    kind: Kind,
    /// The constraint as written, for explanations.
    pub(crate) display: String,
}

#[derive(Debug)]
enum Kind {
    Equal(String),
    NotEqual(String),
    Compare(ConstraintOp, String),
    Version(Vec<(ConstraintOp, String)>),
    Regex(regex::Regex),
    SetAny(Vec<String>),
    SetAll(Vec<String>),
    IsSet,
    IsNotSet,
}

/// Checks a target name: `attr.<k>`, `label.<k>`, `node.datacenter`, `node.pool`, `node.id`.
pub(crate) fn validate_target(field: &'static str, target: &str) -> Result<()> {
    let ok = match target.split_once('.') {
        Some(("attr" | "label", key)) => !key.is_empty(),
        _ => matches!(target, "node.datacenter" | "node.pool" | "node.id"),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(field, target, "must be attr.<name>, label.<name>, node.datacenter, node.pool or node.id"))
    }
}

impl Matcher {
    /// Compiles `target op value`. Distinct operators are not node predicates and are
    /// rejected here; the engine handles them.
    pub(crate) fn compile(field: &'static str, target: &str, op: ConstraintOp, value: &str) -> Result<Matcher> {
        validate_target(field, target)?;
        let kind = match op {
            ConstraintOp::Equal => Kind::Equal(value.to_owned()),
            ConstraintOp::NotEqual => Kind::NotEqual(value.to_owned()),
            ConstraintOp::Less | ConstraintOp::LessEqual | ConstraintOp::Greater | ConstraintOp::GreaterEqual => {
                if value.is_empty() {
                    return Err(Error::invalid(field, format!("{target} {} {value}", op.as_str()), "needs a value to compare with"));
                }
                Kind::Compare(op, value.to_owned())
            }
            ConstraintOp::Version => Kind::Version(parse_version_clauses(field, value)?),
            ConstraintOp::Regex => {
                Kind::Regex(regex::Regex::new(value).map_err(|e| Error::invalid(field, value, format!("regexp does not compile: {e}")))?)
            }
            ConstraintOp::SetContainsAny | ConstraintOp::SetContainsAll => {
                let items = split_set(value);
                if items.is_empty() {
                    return Err(Error::invalid(field, value, "set operators need a comma-separated list of values"));
                }
                if op == ConstraintOp::SetContainsAny {
                    Kind::SetAny(items)
                } else {
                    Kind::SetAll(items)
                }
            }
            ConstraintOp::IsSet => Kind::IsSet,
            ConstraintOp::IsNotSet => Kind::IsNotSet,
            ConstraintOp::DistinctHosts | ConstraintOp::DistinctProperty => {
                return Err(Error::invalid(field, op.as_str(), "distinct operators are constraints on task counts, not node predicates"));
            }
        };
        let display = match op {
            ConstraintOp::IsSet | ConstraintOp::IsNotSet => format!("{target} {}", op.as_str()),
            _ => format!("{target} {} {value}", op.as_str()),
        };
        Ok(Matcher { target: target.to_owned(), kind, display })
    }

    /// Whether `node` satisfies the predicate.
    pub(crate) fn matches(&self, node: &Node) -> bool {
        let v = node.target_value(&self.target);
        match &self.kind {
            Kind::Equal(want) => v == Some(want.as_str()),
            Kind::NotEqual(want) => v != Some(want.as_str()),
            Kind::Compare(op, want) => v.is_some_and(|v| op_holds(*op, compare(v, want))),
            Kind::Version(clauses) => v.is_some_and(|v| clauses.iter().all(|(op, want)| op_holds(*op, compare_versions(v, want)))),
            Kind::Regex(re) => v.is_some_and(|v| re.is_match(v)),
            Kind::SetAny(items) => v.is_some_and(|v| {
                let have = split_set(v);
                items.iter().any(|i| have.contains(i))
            }),
            Kind::SetAll(items) => v.is_some_and(|v| {
                let have = split_set(v);
                items.iter().all(|i| have.contains(i))
            }),
            Kind::IsSet => v.is_some(),
            Kind::IsNotSet => v.is_none(),
        }
    }

    /// Whether the predicate depends on the node's id (and so cannot be cached per class).
    pub(crate) fn per_node(&self) -> bool {
        self.target == "node.id"
    }
}

fn split_set(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(str::to_owned).collect()
}

fn op_holds(op: ConstraintOp, ord: Ordering) -> bool {
    match op {
        ConstraintOp::Less => ord == Ordering::Less,
        ConstraintOp::LessEqual => ord != Ordering::Greater,
        ConstraintOp::Greater => ord == Ordering::Greater,
        ConstraintOp::GreaterEqual => ord != Ordering::Less,
        ConstraintOp::Equal => ord == Ordering::Equal,
        ConstraintOp::NotEqual => ord != Ordering::Equal,
        _ => false,
    }
}

/// Numeric order when both sides are numbers, version order otherwise.
pub(crate) fn compare(a: &str, b: &str) -> Ordering {
    match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
        (Ok(x), Ok(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        _ => compare_versions(a, b),
    }
}

/// Version order: segments split on `.`, `-`, `+`, `_`; numeric segments compare as
/// numbers, others as text, a leading `v` is ignored; a version that is a prefix of
/// another is smaller (`1.2 < 1.2.1`).
pub(crate) fn compare_versions(a: &str, b: &str) -> Ordering {
    let segs = |s: &str| -> Vec<String> {
        let s = s.trim();
        let s = s.strip_prefix('v').unwrap_or(s);
        s.split(['.', '-', '+', '_']).map(str::to_owned).collect()
    };
    let (sa, sb) = (segs(a), segs(b));
    for (x, y) in sa.iter().zip(&sb) {
        let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(p), Ok(q)) => p.cmp(&q),
            _ => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    sa.len().cmp(&sb.len())
}

fn parse_version_clauses(field: &'static str, value: &str) -> Result<Vec<(ConstraintOp, String)>> {
    let mut out = Vec::new();
    for clause in value.split(',') {
        let clause = clause.trim();
        let (op, rest) = [
            (">=", ConstraintOp::GreaterEqual),
            ("<=", ConstraintOp::LessEqual),
            ("!=", ConstraintOp::NotEqual),
            (">", ConstraintOp::Greater),
            ("<", ConstraintOp::Less),
            ("=", ConstraintOp::Equal),
        ]
        .iter()
        .find_map(|(p, op)| clause.strip_prefix(p).map(|r| (*op, r.trim())))
        .unwrap_or((ConstraintOp::Equal, clause));
        if rest.is_empty() || !rest.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
            return Err(Error::invalid(
                field,
                value,
                format!("version clause {clause:?} needs an operator and a version, like \">= 1.2\""),
            ));
        }
        out.push((op, rest.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node::new("n1", crate::Resources::new(1, 1))
            .with_attribute("kernel.version", "5.10.0-21")
            .with_attribute("cpu.cores", "16")
            .with_attribute("features", "avx2, sse4, aes")
            .with_label("rack", "r12")
            .with_datacenter("eu-1")
    }

    fn holds(target: &str, op: ConstraintOp, value: &str) -> bool {
        Matcher::compile("constraint", target, op, value).expect("compiles").matches(&node())
    }

    #[test]
    fn equality_and_presence() {
        assert!(holds("label.rack", ConstraintOp::Equal, "r12"));
        assert!(!holds("label.rack", ConstraintOp::Equal, "r13"));
        assert!(holds("label.rack", ConstraintOp::NotEqual, "r13"));
        assert!(holds("label.missing", ConstraintOp::NotEqual, "x"), "unset differs from any value");
        assert!(!holds("label.missing", ConstraintOp::Equal, ""), "unset never equals");
        assert!(holds("node.datacenter", ConstraintOp::Equal, "eu-1"));
        assert!(holds("node.id", ConstraintOp::Equal, "n1"));
        assert!(holds("attr.cpu.cores", ConstraintOp::IsSet, ""));
        assert!(holds("attr.gpu", ConstraintOp::IsNotSet, ""));
    }

    #[test]
    fn ordering_is_numeric_or_version_aware() {
        assert!(holds("attr.cpu.cores", ConstraintOp::Greater, "8"), "16 > 8 numerically, not as text");
        assert!(holds("attr.cpu.cores", ConstraintOp::LessEqual, "16"));
        assert!(!holds("attr.cpu.cores", ConstraintOp::Less, "16"));
        assert!(holds("attr.kernel.version", ConstraintOp::GreaterEqual, "5.4"), "5.10 > 5.4 as versions");
        assert!(holds("attr.kernel.version", ConstraintOp::Less, "5.10.1"));
        assert!(!holds("attr.missing", ConstraintOp::Greater, "1"), "unset never compares");
        assert_eq!(compare_versions("1.2", "1.2.0"), Ordering::Less);
        assert_eq!(compare_versions("v2.0", "2.0"), Ordering::Equal);
    }

    #[test]
    fn version_ranges() {
        assert!(holds("attr.kernel.version", ConstraintOp::Version, ">= 5.4, < 6"));
        assert!(!holds("attr.kernel.version", ConstraintOp::Version, ">= 5.11"));
        assert!(holds("attr.kernel.version", ConstraintOp::Version, "!= 4.19"));
    }

    #[test]
    fn regex_and_sets() {
        assert!(holds("label.rack", ConstraintOp::Regex, "^r1[0-9]$"));
        assert!(!holds("label.rack", ConstraintOp::Regex, "^r2"));
        assert!(holds("attr.features", ConstraintOp::SetContainsAny, "neon,aes"));
        assert!(holds("attr.features", ConstraintOp::SetContainsAll, "aes, avx2"));
        assert!(!holds("attr.features", ConstraintOp::SetContainsAll, "aes,neon"));
    }

    #[test]
    fn bad_constraints_are_typed_errors_naming_the_value() {
        let bad = [
            ("attr.x", ConstraintOp::Regex, "(unclosed"),
            ("rack", ConstraintOp::Equal, "r1"),
            ("attr.", ConstraintOp::Equal, "r1"),
            ("attr.x", ConstraintOp::Version, ">="),
            ("attr.x", ConstraintOp::Greater, ""),
            ("attr.x", ConstraintOp::SetContainsAny, " , "),
        ];
        for (t, op, v) in bad {
            let err = Matcher::compile("constraint", t, op, v).expect_err(v);
            assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
        }
        let err = Matcher::compile("constraint", "attr.x", ConstraintOp::Regex, "(unclosed").expect_err("bad regex");
        assert!(err.to_string().contains("(unclosed"), "{err}");
    }
}
