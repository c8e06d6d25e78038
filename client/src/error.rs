//! The one error type of the client library.

use kekd_proto::{Code, ErrorStatus, FrameError, MalformedResponse};

/// Why a call failed.
///
/// Callers mostly want [`ClientError::code`]: it folds local failures into the same codes
/// the daemon uses, so retry logic and exit codes need only one table.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error status.
    #[error(transparent)]
    Status(#[from] ErrorStatus),
    /// The socket could not be connected, read or written.
    #[error("connection to kekd failed: {0}")]
    Io(#[from] std::io::Error),
    /// The byte stream broke the framing rules (or a frame was over the limit).
    #[error("connection to kekd failed: {0}")]
    Frame(#[from] FrameError),
    /// The daemon sent a well-framed answer that does not follow the protocol.
    #[error(transparent)]
    Malformed(#[from] MalformedResponse),
    /// The connection is gone; it will not come back, open a new [`crate::Client`].
    #[error("connection to kekd closed")]
    Closed,
    /// No answer within [`crate::ClientOptions::request_timeout`]. The daemon may still act
    /// on the request; the connection stays open for other calls.
    #[error("no answer from kekd within {} (the request timeout)", humantime::format_duration(*.after))]
    TimedOut { after: std::time::Duration },
}

impl ClientError {
    /// The wire code this failure corresponds to.
    ///
    /// A lost connection is `UNAVAILABLE` (retryable on a new connection), and so is a
    /// request that timed out (the worker may be stuck or being replaced). An oversized
    /// frame is `RESOURCE_EXHAUSTED`, as in gRPC, because retrying the same request cannot
    /// help. A protocol violation by the daemon is `INTERNAL`.
    pub fn code(&self) -> Code {
        match self {
            ClientError::Status(s) => s.code,
            ClientError::Frame(FrameError::TooLarge { .. }) => Code::ResourceExhausted,
            ClientError::Io(_)
            | ClientError::Frame(_)
            | ClientError::Closed
            | ClientError::TimedOut { .. } => Code::Unavailable,
            ClientError::Malformed(_) => Code::Internal,
        }
    }

    /// Copies a connection-level error so that every pending call can receive it: the
    /// underlying `io::Error` is not `Clone`, so its kind and text are kept.
    pub(crate) fn replicate(&self) -> ClientError {
        match self {
            ClientError::Status(s) => ClientError::Status(s.clone()),
            ClientError::Io(e) => ClientError::Io(copy_io(e)),
            ClientError::Frame(f) => ClientError::Frame(match f {
                FrameError::TooLarge { len, max } => FrameError::TooLarge { len: *len, max: *max },
                FrameError::Truncated => FrameError::Truncated,
                FrameError::Decode(d) => FrameError::Decode(d.clone()),
                FrameError::Io(e) => FrameError::Io(copy_io(e)),
            }),
            ClientError::Malformed(m) => ClientError::Malformed(m.clone()),
            ClientError::Closed => ClientError::Closed,
            ClientError::TimedOut { after } => ClientError::TimedOut { after: *after },
        }
    }
}

fn copy_io(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let status = ClientError::Status(ErrorStatus::new(Code::NotFound, "no such key"));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.to_string(), "NOT_FOUND: no such key");
        assert_eq!(ClientError::Closed.code(), Code::Unavailable);
        let io = ClientError::Io(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(io.code(), Code::Unavailable);
        assert_eq!(io.replicate().code(), Code::Unavailable);
        assert_eq!(ClientError::Frame(FrameError::Truncated).code(), Code::Unavailable);
        let big = ClientError::Frame(FrameError::TooLarge { len: 10, max: 5 });
        assert_eq!(big.code(), Code::ResourceExhausted);
        assert_eq!(ClientError::Malformed(MalformedResponse("x".into())).code(), Code::Internal);
        let late = ClientError::TimedOut { after: std::time::Duration::from_millis(1500) };
        assert_eq!((late.code(), late.replicate().code()), (Code::Unavailable, Code::Unavailable));
        assert_eq!(late.to_string(), "no answer from kekd within 1s 500ms (the request timeout)");
    }
}
