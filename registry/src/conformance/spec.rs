//! A conformance harness written from the OCI distribution-spec v1.1: the MUSTs of
//! its pull, push, content discovery and content management categories, plus the
//! hostile input a registry must refuse cleanly. It speaks HTTP through
//! [`Client::raw`], so it checks any registry, keelson's or another.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};

use crate::client::{Client, RawResponse};
use crate::digest::Digest;
use crate::manifest::{OCI_INDEX, OCI_MANIFEST};

/// The spec's categories, and one for hostile input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    /// Pulling manifests and blobs.
    Pull,
    /// Pushing blobs (every upload form) and manifests.
    Push,
    /// Listing tags, referrers.
    Discovery,
    /// Deleting.
    Management,
    /// Bad names, digests, ranges, manifests.
    Hostile,
}

/// One check's outcome.
#[derive(Clone, Debug)]
pub struct Check {
    /// Short, stable name (the conformance table's key).
    pub name: &'static str,
    /// Its category.
    pub category: Category,
    /// `Err` says what the registry did instead.
    pub outcome: Result<(), String>,
}

struct Harness<'a> {
    client: &'a Client,
    scopes: Vec<String>,
    checks: Vec<Check>,
}

type Outcome = Result<(), String>;

fn expect_status(r: &RawResponse, want: StatusCode) -> Outcome {
    if r.status == want {
        Ok(())
    } else {
        Err(format!("status {} (wanted {want}): {}", r.status, String::from_utf8_lossy(&r.body[..r.body.len().min(300)])))
    }
}

fn expect_code(r: &RawResponse, want: StatusCode, code: &str) -> Outcome {
    expect_status(r, want)?;
    let v: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| format!("error body is not JSON: {e}"))?;
    let codes: Vec<&str> = v["errors"].as_array().into_iter().flatten().filter_map(|e| e["code"].as_str()).collect();
    if codes.contains(&code) {
        Ok(())
    } else {
        Err(format!("error codes {codes:?}, wanted {code}"))
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Result<&'a str, String> {
    h.get(name).and_then(|v| v.to_str().ok()).ok_or_else(|| format!("no {name} header"))
}

fn json(r: &RawResponse) -> Result<serde_json::Value, String> {
    serde_json::from_slice(&r.body).map_err(|e| format!("body is not JSON: {e}"))
}

/// Path and query of a `Location` (absolute or relative), with `extra` appended to the query.
fn at(location: &str, extra: &str) -> String {
    let path = match location.find("://") {
        Some(i) => location[i + 3..].find('/').map_or("/", |j| &location[i + 3 + j..]),
        None => location,
    };
    if extra.is_empty() {
        path.to_owned()
    } else {
        format!("{path}{}{extra}", if path.contains('?') { '&' } else { '?' })
    }
}

fn image_manifest(config: &Digest, config_len: usize, layers: &[(Digest, usize)], subject: Option<(Digest, usize)>) -> Bytes {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(d, n)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.to_string(), "size": n}))
        .collect();
    let mut m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": config_len},
        "layers": layers,
    });
    if let Some((d, n)) = subject {
        m["subject"] = serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d.to_string(), "size": n});
        m["artifactType"] = serde_json::json!("application/vnd.keelson.test.sbom");
        m["config"]["mediaType"] = serde_json::json!("application/vnd.oci.empty.v1+json");
    }
    Bytes::from(m.to_string())
}

impl Harness<'_> {
    async fn req(&self, method: Method, path: &str, headers: &[(header::HeaderName, String)], body: Bytes) -> Result<RawResponse, String> {
        self.client.raw(method, path, headers, body, &self.scopes).await.map_err(|e| e.to_string())
    }

    fn record(&mut self, name: &'static str, category: Category, outcome: Outcome) {
        self.checks.push(Check { name, category, outcome });
    }

    /// Monolithic POST-then-PUT upload; returns an error on any deviation.
    async fn upload(&self, repo: &str, data: &[u8]) -> Result<Digest, String> {
        let d = Digest::of(data);
        let r = self.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"), &[], Bytes::new()).await?;
        expect_status(&r, StatusCode::ACCEPTED)?;
        let loc = header(&r.headers, "location")?;
        let put = at(loc, &format!("digest={d}"));
        let headers = [(header::CONTENT_TYPE, "application/octet-stream".to_owned()), (header::CONTENT_LENGTH, data.len().to_string())];
        let r = self.req(Method::PUT, &put, &headers, Bytes::copy_from_slice(data)).await?;
        expect_status(&r, StatusCode::CREATED)?;
        Ok(d)
    }

    async fn put_manifest(&self, repo: &str, reference: &str, body: &Bytes) -> Result<RawResponse, String> {
        self.req(
            Method::PUT,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[(header::CONTENT_TYPE, OCI_MANIFEST.to_owned())],
            body.clone(),
        )
        .await
    }
}

/// Runs every check against the registry `client` reaches, in repositories under
/// `namespace` (which should be fresh).
pub async fn run(client: &Client, namespace: &str) -> Vec<Check> {
    let repo = format!("{namespace}/app");
    let other = format!("{namespace}/other");
    let scopes =
        vec![format!("repository:{repo}:pull,push,delete"), format!("repository:{other}:pull,push,delete"), "registry:catalog:*".into()];
    let mut h = Harness { client, scopes, checks: Vec::new() };
    use Category::*;

    // Setup: a config, two layers, a manifest tagged v1.
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let setup = async {
        let c = h.upload(&repo, &config).await?;
        let l = h.upload(&repo, &layer).await?;
        let m = image_manifest(&c, config.len(), &[(l, layer.len())], None);
        let r = h.put_manifest(&repo, "v1", &m).await?;
        expect_status(&r, StatusCode::CREATED)?;
        Ok::<_, String>((c, l, m))
    }
    .await;
    h.record("push-monolithic-post-put-and-manifest-by-tag", Push, setup.as_ref().map(|_| ()).map_err(Clone::clone));
    let Ok((_config_d, layer_d, manifest)) = setup else { return h.checks };
    let manifest_d = Digest::of(&manifest);

    // ---- pull ----
    let r = h.req(Method::GET, "/v2/", &[], Bytes::new()).await;
    h.record("api-version-check", Pull, r.and_then(|r| expect_status(&r, StatusCode::OK)));

    let r = h.req(Method::GET, &format!("/v2/{repo}/manifests/v1"), &[(header::ACCEPT, OCI_MANIFEST.into())], Bytes::new()).await;
    h.record(
        "pull-manifest-by-tag",
        Pull,
        r.and_then(|r| {
            expect_status(&r, StatusCode::OK)?;
            if r.body != manifest {
                return Err("body differs from the pushed manifest".into());
            }
            let d = header(&r.headers, "docker-content-digest")?;
            if d != manifest_d.to_string() {
                return Err(format!("Docker-Content-Digest {d}"));
            }
            Ok(())
        }),
    );
    let r = h.req(Method::GET, &format!("/v2/{repo}/manifests/{manifest_d}"), &[(header::ACCEPT, OCI_MANIFEST.into())], Bytes::new()).await;
    h.record(
        "pull-manifest-by-digest",
        Pull,
        r.and_then(|r| {
            expect_status(&r, StatusCode::OK)?;
            if r.body == manifest {
                Ok(())
            } else {
                Err("body differs".into())
            }
        }),
    );
    let r = h.req(Method::HEAD, &format!("/v2/{repo}/manifests/v1"), &[(header::ACCEPT, OCI_MANIFEST.into())], Bytes::new()).await;
    h.record(
        "head-manifest",
        Pull,
        r.and_then(|r| {
            expect_status(&r, StatusCode::OK)?;
            let len = header(&r.headers, "content-length")?;
            if len != manifest.len().to_string() {
                return Err(format!("Content-Length {len}"));
            }
            if r.body.is_empty() {
                Ok(())
            } else {
                Err("HEAD returned a body".into())
            }
        }),
    );
    let r = h.req(Method::GET, &format!("/v2/{repo}/manifests/nosuchtag"), &[], Bytes::new()).await;
    h.record("pull-unknown-manifest-404", Pull, r.and_then(|r| expect_code(&r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")));
    let r = h.req(Method::GET, &format!("/v2/{repo}/blobs/{layer_d}"), &[], Bytes::new()).await;
    h.record(
        "pull-blob",
        Pull,
        r.and_then(|r| {
            expect_status(&r, StatusCode::OK)?;
            if r.body == layer {
                Ok(())
            } else {
                Err("blob bytes differ".into())
            }
        }),
    );
    let r = h.req(Method::HEAD, &format!("/v2/{repo}/blobs/{layer_d}"), &[], Bytes::new()).await;
    h.record(
        "head-blob",
        Pull,
        r.and_then(|r| {
            expect_status(&r, StatusCode::OK)?;
            let len = header(&r.headers, "content-length")?;
            if len == layer.len().to_string() {
                Ok(())
            } else {
                Err(format!("Content-Length {len}"))
            }
        }),
    );
    let unknown = Digest::of(b"never pushed");
    let r = h.req(Method::GET, &format!("/v2/{repo}/blobs/{unknown}"), &[], Bytes::new()).await;
    h.record("pull-unknown-blob-404", Pull, r.and_then(|r| expect_code(&r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN")));
    let r = h.req(Method::GET, &format!("/v2/{repo}/blobs/{layer_d}"), &[(header::RANGE, "bytes=10-19".into())], Bytes::new()).await;
    h.record(
        "pull-blob-range",
        Pull,
        r.and_then(|r| {
            expect_status(&r, StatusCode::PARTIAL_CONTENT)?;
            if r.body[..] == layer[10..20] {
                Ok(())
            } else {
                Err("range bytes differ".into())
            }
        }),
    );

    // ---- push ----
    let data = b"single POST upload".to_vec();
    let d = Digest::of(&data);
    let r = h
        .req(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            &[(header::CONTENT_TYPE, "application/octet-stream".into()), (header::CONTENT_LENGTH, data.len().to_string())],
            Bytes::from(data),
        )
        .await;
    h.record(
        "push-single-post",
        Push,
        r.and_then(|r| {
            // The spec lets a registry answer 202 and expect the POST-PUT form instead.
            if r.status == StatusCode::ACCEPTED {
                return Err("202: single POST not supported".into());
            }
            expect_status(&r, StatusCode::CREATED)?;
            header(&r.headers, "location").map(|_| ())
        }),
    );

    let chunked: Vec<u8> = (0..30_000u32).map(|i| (i % 13) as u8).collect();
    let outcome = async {
        let r = h.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"), &[], Bytes::new()).await?;
        expect_status(&r, StatusCode::ACCEPTED)?;
        let mut loc = header(&r.headers, "location")?.to_owned();
        for (start, end) in [(0usize, 9_999usize), (10_000, 19_999)] {
            let headers = [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (header::CONTENT_RANGE, format!("{start}-{end}")),
                (header::CONTENT_LENGTH, (end - start + 1).to_string()),
            ];
            let r = h.req(Method::PATCH, &at(&loc, ""), &headers, Bytes::copy_from_slice(&chunked[start..=end])).await?;
            expect_status(&r, StatusCode::ACCEPTED)?;
            let range = header(&r.headers, "range")?;
            if range != format!("0-{end}") {
                return Err(format!("Range {range} after chunk ending at {end}"));
            }
            loc = header(&r.headers, "location")?.to_owned();
        }
        // Out of order: a chunk that does not start where the session ends.
        let headers = [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_RANGE, "25000-29999".to_owned()),
            (header::CONTENT_LENGTH, "5000".to_owned()),
        ];
        let r = h.req(Method::PATCH, &at(&loc, ""), &headers, Bytes::copy_from_slice(&chunked[25_000..])).await?;
        let out_of_order = expect_status(&r, StatusCode::RANGE_NOT_SATISFIABLE);
        let r = h.req(Method::GET, &at(&loc, ""), &[], Bytes::new()).await?;
        expect_status(&r, StatusCode::NO_CONTENT)?;
        let range = header(&r.headers, "range")?;
        let status_ok = if range == "0-19999" { Ok(()) } else { Err(format!("status Range {range}")) };
        let d = Digest::of(&chunked);
        let headers = [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_RANGE, "20000-29999".to_owned()),
            (header::CONTENT_LENGTH, "10000".to_owned()),
        ];
        let r = h.req(Method::PUT, &at(&loc, &format!("digest={d}")), &headers, Bytes::copy_from_slice(&chunked[20_000..])).await?;
        expect_status(&r, StatusCode::CREATED)?;
        let r = h.req(Method::GET, &format!("/v2/{repo}/blobs/{d}"), &[], Bytes::new()).await?;
        if r.body[..] != chunked[..] {
            return Err("assembled blob differs".into());
        }
        Ok::<_, String>((out_of_order, status_ok))
    }
    .await;
    let (chunked, ooo, status) = match outcome {
        Ok((a, b)) => (Ok(()), a, b),
        Err(e) => (Err(e.clone()), Err(e.clone()), Err(e)),
    };
    h.record("push-chunked-with-final-chunk-on-put", Push, chunked);
    h.record("push-chunk-out-of-order-416", Push, ooo);
    h.record("upload-status-range", Push, status);

    let streamed: Vec<u8> = (0..50_000u32).map(|i| (i % 7) as u8).collect();
    let r = async {
        let r = h.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"), &[], Bytes::new()).await?;
        expect_status(&r, StatusCode::ACCEPTED)?;
        let loc = header(&r.headers, "location")?.to_owned();
        let r = h
            .req(Method::PATCH, &at(&loc, ""), &[(header::CONTENT_TYPE, "application/octet-stream".into())], Bytes::from(streamed.clone()))
            .await?;
        expect_status(&r, StatusCode::ACCEPTED)?;
        let loc = header(&r.headers, "location")?.to_owned();
        let r = h
            .req(
                Method::PUT,
                &at(&loc, &format!("digest={}", Digest::of(&streamed))),
                &[(header::CONTENT_LENGTH, "0".into())],
                Bytes::new(),
            )
            .await?;
        expect_status(&r, StatusCode::CREATED)
    }
    .await;
    h.record("push-streamed-patch", Push, r);

    let r = async {
        let r = h.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"), &[], Bytes::new()).await?;
        let loc = header(&r.headers, "location")?.to_owned();
        let wrong = Digest::of(b"something else");
        let r = h
            .req(Method::PUT, &at(&loc, &format!("digest={wrong}")), &[(header::CONTENT_LENGTH, "5".into())], Bytes::from_static(b"bytes"))
            .await?;
        expect_code(&r, StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    }
    .await;
    h.record("push-wrong-digest-400", Push, r);

    let r = h.req(Method::POST, &format!("/v2/{other}/blobs/uploads/?mount={layer_d}&from={repo}"), &[], Bytes::new()).await;
    h.record(
        "push-cross-repository-mount",
        Push,
        r.and_then(|r| {
            expect_status(&r, StatusCode::CREATED)?;
            header(&r.headers, "location").map(|_| ())
        }),
    );
    let r = h.req(Method::POST, &format!("/v2/{other}/blobs/uploads/?mount={unknown}&from={repo}"), &[], Bytes::new()).await;
    h.record("push-mount-unknown-falls-back-202", Push, r.and_then(|r| expect_status(&r, StatusCode::ACCEPTED)));

    let r = h
        .req(Method::PUT, &format!("/v2/{repo}/manifests/{manifest_d}"), &[(header::CONTENT_TYPE, OCI_MANIFEST.into())], manifest.clone())
        .await;
    h.record(
        "push-manifest-by-digest",
        Push,
        r.and_then(|r| {
            expect_status(&r, StatusCode::CREATED)?;
            header(&r.headers, "location").map(|_| ())
        }),
    );
    let dangling = image_manifest(&unknown, 1, &[], None);
    let r = h.put_manifest(&repo, "dangling", &dangling).await;
    h.record("push-manifest-unknown-blob-400", Push, r.and_then(|r| expect_code(&r, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")));
    let r = h.put_manifest(&repo, "broken", &Bytes::from_static(b"{not json")).await;
    h.record("push-invalid-manifest-400", Push, r.and_then(|r| expect_code(&r, StatusCode::BAD_REQUEST, "MANIFEST_INVALID")));
    let r = h
        .req(Method::PUT, &format!("/v2/{repo}/manifests/{unknown}"), &[(header::CONTENT_TYPE, OCI_MANIFEST.into())], manifest.clone())
        .await;
    h.record("push-manifest-digest-mismatch-400", Push, r.and_then(|r| expect_status(&r, StatusCode::BAD_REQUEST)));

    let r = async {
        let r = h.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"), &[], Bytes::new()).await?;
        let loc = header(&r.headers, "location")?.to_owned();
        let r = h.req(Method::DELETE, &at(&loc, ""), &[], Bytes::new()).await?;
        expect_status(&r, StatusCode::NO_CONTENT)?;
        let r = h.req(Method::GET, &at(&loc, ""), &[], Bytes::new()).await?;
        expect_code(&r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    }
    .await;
    h.record("upload-cancel", Push, r);

    // ---- content discovery ----
    for tag in ["v2", "a", "z"] {
        let _ = h.put_manifest(&repo, tag, &manifest).await;
    }
    let r = h.req(Method::GET, &format!("/v2/{repo}/tags/list"), &[], Bytes::new()).await;
    h.record(
        "tags-list-sorted",
        Discovery,
        r.and_then(|r| {
            expect_status(&r, StatusCode::OK)?;
            let v = json(&r)?;
            let tags: Vec<&str> = v["tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str()).collect();
            if v["name"] != repo.as_str() {
                return Err(format!("name {}", v["name"]));
            }
            if tags == ["a", "v1", "v2", "z"] {
                Ok(())
            } else {
                Err(format!("tags {tags:?}"))
            }
        }),
    );
    let r = h.req(Method::GET, &format!("/v2/{repo}/tags/list?n=2"), &[], Bytes::new()).await;
    h.record(
        "tags-list-n-and-link",
        Discovery,
        r.and_then(|r| {
            expect_status(&r, StatusCode::OK)?;
            let v = json(&r)?;
            let tags: Vec<&str> = v["tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str()).collect();
            if tags != ["a", "v1"] {
                return Err(format!("tags {tags:?}"));
            }
            let link = header(&r.headers, "link")?;
            if link.contains("last=v1") && link.contains("rel=\"next\"") {
                Ok(())
            } else {
                Err(format!("Link {link}"))
            }
        }),
    );
    let r = h.req(Method::GET, &format!("/v2/{repo}/tags/list?n=2&last=v1"), &[], Bytes::new()).await;
    h.record(
        "tags-list-last",
        Discovery,
        r.and_then(|r| {
            let v = json(&r)?;
            let tags: Vec<&str> = v["tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str()).collect();
            if tags == ["v2", "z"] {
                Ok(())
            } else {
                Err(format!("tags {tags:?}"))
            }
        }),
    );
    let r = h.req(Method::GET, &format!("/v2/{repo}/tags/list?n=0"), &[], Bytes::new()).await;
    h.record(
        "tags-list-n-zero",
        Discovery,
        r.and_then(|r| {
            let v = json(&r)?;
            if v["tags"].as_array().is_none_or(|t| t.is_empty()) {
                Ok(())
            } else {
                Err(format!("tags {}", v["tags"]))
            }
        }),
    );

    let empty_config = b"{}".to_vec();
    let referrer = async {
        let c = h.upload(&repo, &empty_config).await?;
        let m = image_manifest(&c, 2, &[], Some((manifest_d, manifest.len())));
        let r = h
            .req(
                Method::PUT,
                &format!("/v2/{repo}/manifests/{}", Digest::of(&m)),
                &[(header::CONTENT_TYPE, OCI_MANIFEST.into())],
                m.clone(),
            )
            .await?;
        expect_status(&r, StatusCode::CREATED)?;
        let subject = header(&r.headers, "oci-subject").map(str::to_owned);
        Ok::<_, String>((Digest::of(&m), subject))
    }
    .await;
    h.record(
        "push-manifest-with-subject-oci-subject-header",
        Discovery,
        referrer.as_ref().map_err(Clone::clone).and_then(|(_, s)| match s {
            Ok(s) if *s == manifest_d.to_string() => Ok(()),
            Ok(s) => Err(format!("OCI-Subject {s}")),
            Err(e) => Err(e.clone()),
        }),
    );
    let referrer_d = referrer.map(|(d, _)| d).ok();
    let r = h.req(Method::GET, &format!("/v2/{repo}/referrers/{manifest_d}"), &[], Bytes::new()).await;
    h.record(
        "referrers-list",
        Discovery,
        r.and_then(|r| {
            expect_status(&r, StatusCode::OK)?;
            let v = json(&r)?;
            if v["mediaType"] != OCI_INDEX {
                return Err(format!("mediaType {}", v["mediaType"]));
            }
            let found: Vec<&str> = v["manifests"].as_array().into_iter().flatten().filter_map(|m| m["digest"].as_str()).collect();
            let want = referrer_d.map(|d| d.to_string()).unwrap_or_default();
            if found == [want.as_str()] {
                Ok(())
            } else {
                Err(format!("referrers {found:?}"))
            }
        }),
    );
    let r = h.req(Method::GET, &format!("/v2/{repo}/referrers/{manifest_d}?artifactType=application/vnd.other"), &[], Bytes::new()).await;
    h.record(
        "referrers-artifact-type-filter",
        Discovery,
        r.and_then(|r| {
            expect_status(&r, StatusCode::OK)?;
            let v = json(&r)?;
            if v["manifests"].as_array().is_none_or(|m| !m.is_empty()) {
                return Err(format!("manifests {}", v["manifests"]));
            }
            header(&r.headers, "oci-filters-applied").map(|_| ())
        }),
    );
    let r = h.req(Method::GET, &format!("/v2/{repo}/referrers/{unknown}"), &[], Bytes::new()).await;
    h.record(
        "referrers-unknown-subject-empty",
        Discovery,
        r.and_then(|r| {
            expect_status(&r, StatusCode::OK)?;
            let v = json(&r)?;
            if v["manifests"].as_array().is_some_and(|m| m.is_empty()) {
                Ok(())
            } else {
                Err(format!("manifests {}", v["manifests"]))
            }
        }),
    );
    let r = h.req(Method::GET, "/v2/_catalog?n=1000", &[], Bytes::new()).await;
    h.record(
        "catalog-lists-repositories",
        Discovery,
        r.and_then(|r| {
            expect_status(&r, StatusCode::OK)?;
            let v = json(&r)?;
            let repos: Vec<&str> = v["repositories"].as_array().into_iter().flatten().filter_map(|t| t.as_str()).collect();
            if repos.contains(&repo.as_str()) {
                Ok(())
            } else {
                Err(format!("repositories {repos:?}"))
            }
        }),
    );

    // ---- content management ----
    let r = h.req(Method::DELETE, &format!("/v2/{repo}/manifests/z"), &[], Bytes::new()).await;
    let deleted_tag = async {
        expect_status(&r?, StatusCode::ACCEPTED)?;
        let r = h.req(Method::GET, &format!("/v2/{repo}/manifests/z"), &[], Bytes::new()).await?;
        expect_status(&r, StatusCode::NOT_FOUND)?;
        let r = h.req(Method::GET, &format!("/v2/{repo}/manifests/v1"), &[], Bytes::new()).await?;
        expect_status(&r, StatusCode::OK).map_err(|e| format!("other tags of the manifest must stay: {e}"))
    }
    .await;
    h.record("delete-tag", Management, deleted_tag);
    let r = async {
        let r = h.req(Method::DELETE, &format!("/v2/{repo}/manifests/{manifest_d}"), &[], Bytes::new()).await?;
        expect_status(&r, StatusCode::ACCEPTED)?;
        let r = h.req(Method::GET, &format!("/v2/{repo}/manifests/{manifest_d}"), &[], Bytes::new()).await?;
        expect_code(&r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    }
    .await;
    h.record("delete-manifest", Management, r);
    let r = async {
        let r = h.req(Method::DELETE, &format!("/v2/{repo}/blobs/{layer_d}"), &[], Bytes::new()).await?;
        expect_status(&r, StatusCode::ACCEPTED)?;
        let r = h.req(Method::GET, &format!("/v2/{repo}/blobs/{layer_d}"), &[], Bytes::new()).await?;
        expect_code(&r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
    }
    .await;
    h.record("delete-blob", Management, r);

    // ---- hostile input ----
    let r = h.req(Method::GET, "/v2/Upper/Case/tags/list", &[], Bytes::new()).await;
    h.record(
        "invalid-name-400",
        Hostile,
        r.and_then(|r| expect_code(&r, StatusCode::BAD_REQUEST, "NAME_INVALID").or_else(|_| expect_status(&r, StatusCode::NOT_FOUND))),
    );
    let r = h.req(Method::GET, &format!("/v2/{repo}/blobs/sha256:1234"), &[], Bytes::new()).await;
    h.record("malformed-digest-400", Hostile, r.and_then(|r| expect_code(&r, StatusCode::BAD_REQUEST, "DIGEST_INVALID")));
    let r = h.req(Method::GET, &format!("/v2/{repo}/manifests/bad%20tag"), &[], Bytes::new()).await;
    h.record(
        "invalid-tag-refused",
        Hostile,
        r.and_then(|r| if r.status.is_client_error() { Ok(()) } else { Err(format!("status {}", r.status)) }),
    );
    let r = h.req(Method::GET, &format!("/v2/{namespace}/../../etc/manifests/latest"), &[], Bytes::new()).await;
    h.record(
        "path-traversal-refused",
        Hostile,
        r.and_then(|r| if r.status.is_client_error() { Ok(()) } else { Err(format!("status {}", r.status)) }),
    );
    let r = h
        .req(
            Method::GET,
            &format!("/v2/{repo}/blobs/{}", Digest::of(&config)),
            &[(header::RANGE, format!("bytes={}-", config.len() + 10))],
            Bytes::new(),
        )
        .await;
    h.record("range-past-end-416", Hostile, r.and_then(|r| expect_status(&r, StatusCode::RANGE_NOT_SATISFIABLE)));
    let r = h
        .req(
            Method::GET,
            &format!("/v2/{repo}/blobs/{}", Digest::of(&config)),
            &[(header::RANGE, "bytes=5-9,0-3,2-6".into())],
            Bytes::new(),
        )
        .await;
    h.record(
        "multiple-overlapping-ranges-answered-whole",
        Hostile,
        r.and_then(|r| {
            if r.status == StatusCode::OK && r.body[..] == config[..] {
                return Ok(());
            }
            if r.status == StatusCode::RANGE_NOT_SATISFIABLE {
                return Ok(());
            }
            // RFC 9110 also allows answering every range in a multipart body.
            if r.status == StatusCode::PARTIAL_CONTENT
                && header(&r.headers, "content-type").is_ok_and(|t| t.starts_with("multipart/byteranges"))
            {
                return Ok(());
            }
            Err(format!("status {} with {} bytes", r.status, r.body.len()))
        }),
    );
    let r = h.req(Method::GET, &format!("/v2/{repo}/tags/list?n=abc"), &[], Bytes::new()).await;
    h.record("bad-page-size-400", Hostile, r.and_then(|r| expect_status(&r, StatusCode::BAD_REQUEST)));
    let r = h.req(Method::GET, &format!("/v2/{repo}/blobs/uploads/no-such-session"), &[], Bytes::new()).await;
    h.record("unknown-upload-404", Hostile, r.and_then(|r| expect_code(&r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")));

    h.checks
}
