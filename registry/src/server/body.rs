//! Bodies: a request body as a blob reader that gives up on a client gone quiet, and
//! the response bodies the server sends (empty, JSON, a streamed blob).

use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyDataStream, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};

use crate::store::BlobReader;

/// What every response carries.
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub(crate) fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed_unsync()
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Streams a blob in 256 KiB frames.
pub(crate) fn stream(reader: BlobReader) -> Body {
    let frames = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024).map_ok(Frame::data);
    BodyExt::boxed_unsync(StreamBody::new(frames))
}

/// The request body as a reader. A read that waits longer than `idle` for the client
/// fails with `TimedOut`, so a stalled upload releases its session and connection.
pub(crate) fn reader(body: Incoming, idle: Duration) -> BlobReader {
    let data = BodyDataStream::new(body).map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(data);
    let mut timed = tokio_io_timeout::TimeoutReader::new(reader);
    timed.set_timeout(Some(idle));
    Box::new(Box::pin(timed))
}
