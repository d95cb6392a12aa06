//! Which endpoint a request path names (distribution-spec end-1 to end-13, plus
//! upload status and cancel). Repository names hold slashes, so the endpoint is found
//! from the right: the last `/blobs/`, `/manifests/`, `/tags/list` or `/referrers/`.

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::reference::{Reference, RepoName};
use crate::store::UploadId;

/// A parsed request path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/tags/list`.
    Tags(RepoName),
    /// `/v2/<name>/manifests/<reference>`.
    Manifest(RepoName, Reference),
    /// `/v2/<name>/blobs/<digest>`.
    Blob(RepoName, Digest),
    /// `/v2/<name>/blobs/uploads/` (start an upload).
    Uploads(RepoName),
    /// `/v2/<name>/blobs/uploads/<id>`.
    Upload(RepoName, UploadId),
    /// `/v2/<name>/referrers/<digest>`.
    Referrers(RepoName, Digest),
}

impl Route {
    /// The repository the route is about, if any (what authorization scopes name).
    pub(crate) fn repo(&self) -> Option<&RepoName> {
        match self {
            Route::Base | Route::Catalog => None,
            Route::Tags(r)
            | Route::Manifest(r, _)
            | Route::Blob(r, _)
            | Route::Uploads(r)
            | Route::Upload(r, _)
            | Route::Referrers(r, _) => Some(r),
        }
    }
}

fn not_a_route(path: &str) -> Error {
    Error::NotFound { kind: "endpoint", name: path.chars().take(200).collect() }
}

/// Parses `path` (without the query). Names, references and ids are validated here, so
/// nothing downstream sees an unvalidated one.
pub(crate) fn parse(path: &str) -> Result<Route> {
    let rest = match path.strip_prefix("/v2") {
        Some("" | "/") => return Ok(Route::Base),
        Some(rest) => rest.strip_prefix('/').ok_or_else(|| not_a_route(path))?,
        None => return Err(not_a_route(path)),
    };
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Route::Tags(name.parse()?));
    }
    if let Some(name) = rest.strip_suffix("/blobs/uploads/").or_else(|| rest.strip_suffix("/blobs/uploads")) {
        return Ok(Route::Uploads(name.parse()?));
    }
    // The last marker wins: `/blobs/uploads/<id>` before `/blobs/<digest>`.
    let split = |marker: &str| rest.rfind(marker).map(|i| (&rest[..i], &rest[i + marker.len()..]));
    if let Some((name, id)) = split("/blobs/uploads/") {
        if !id.contains('/') {
            return Ok(Route::Upload(name.parse()?, id.parse()?));
        }
    }
    let candidates = [("/manifests/", 0u8), ("/blobs/", 1), ("/referrers/", 2)];
    let best = candidates.iter().filter_map(|(m, k)| rest.rfind(m).map(|i| (i, *m, *k))).max_by_key(|(i, _, _)| *i);
    let Some((i, marker, kind)) = best else { return Err(not_a_route(path)) };
    let (name, tail) = (&rest[..i], &rest[i + marker.len()..]);
    if tail.contains('/') {
        return Err(not_a_route(path));
    }
    let name: RepoName = name.parse()?;
    Ok(match kind {
        0 => Route::Manifest(name, tail.parse()?),
        1 => Route::Blob(name, tail.parse().map_err(Error::from)?),
        _ => Route::Referrers(name, tail.parse().map_err(Error::from)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_endpoints_in_names_with_slashes() {
        let d = Digest::of(b"x");
        assert_eq!(parse("/v2/").expect("base"), Route::Base);
        assert_eq!(parse("/v2").expect("base"), Route::Base);
        assert_eq!(parse("/v2/_catalog").expect("catalog"), Route::Catalog);
        assert!(matches!(parse("/v2/a/b/tags/list"), Ok(Route::Tags(n)) if n.as_str() == "a/b"));
        assert!(matches!(parse("/v2/a/blobs/uploads/"), Ok(Route::Uploads(n)) if n.as_str() == "a"));
        assert!(matches!(parse("/v2/a/blobs/uploads/abc-1"), Ok(Route::Upload(n, id)) if n.as_str() == "a" && id.as_str() == "abc-1"));
        assert!(
            matches!(parse(&format!("/v2/blobs/manifests/{d}")), Ok(Route::Manifest(n, Reference::Digest(x))) if n.as_str() == "blobs" && x == d)
        );
        assert!(
            matches!(parse(&format!("/v2/x/manifests/y/blobs/{d}")), Ok(Route::Blob(n, _)) if n.as_str() == "x/manifests/y"),
            "a component named like an endpoint belongs to the name"
        );
        assert!(matches!(parse(&format!("/v2/x/y/blobs/{d}")), Ok(Route::Blob(n, _)) if n.as_str() == "x/y"));
        assert!(matches!(parse(&format!("/v2/x/referrers/{d}")), Ok(Route::Referrers(..))));
        assert!(matches!(parse("/v2/x/manifests/latest"), Ok(Route::Manifest(_, Reference::Tag(_)))));
    }

    #[test]
    fn refuses_traversal_and_garbage_with_typed_errors() {
        for bad in [
            "/v2/../etc/manifests/latest",
            "/v2/a/%2e%2e/tags/list",
            "/v2/A/tags/list",
            "/v2/a/manifests/..",
            "/v3/",
            "/v2/a/blobs/sha256:zz",
            "/v2/a/blobs/uploads/../x",
            "/v2/a/nothing",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        match parse("/v2/a/blobs/sha256:12") {
            Err(Error::InvalidInput { field: "digest", value, .. }) => assert_eq!(value, "sha256:12"),
            other => panic!("{other:?}"),
        }
    }
}
