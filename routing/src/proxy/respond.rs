//! The proxy's own answers: an empty body, and plain-text errors that say what failed.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::proxy::ProxyBody;

pub(crate) fn empty_body() -> ProxyBody {
    http_body_util::Empty::new().map_err(|never: Infallible| match never {}).boxed()
}

/// The deepest cause of an error (hyper wraps the one worth reporting).
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A plain-text answer `keelson: <message>` with `status`.
pub(crate) fn error(status: StatusCode, message: String) -> Response<ProxyBody> {
    tracing::debug!(%status, %message, "proxy error");
    let body = Full::new(Bytes::from(format!("keelson: {message}\n"))).map_err(|never: Infallible| match never {}).boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
