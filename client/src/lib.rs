//! Async client for kekd.
//!
//! A [`Client`] is one connection bound to one tenant (the daemon hands each connection to
//! that tenant's worker process), pipelining any number of concurrent calls over it. A
//! [`Pool`] keeps one such connection per tenant for a long-lived caller: it connects
//! lazily, replaces a connection that broke, and retries calls that failed with
//! `UNAVAILABLE` while a tenant's worker restarts (as far as that is safe; see
//! [`PooledClient::call`]). Both offer the same typed operations. The request and reply
//! types are the validated ones from [`kekd_proto`], re-exported here so callers need only
//! this crate.
#![forbid(unsafe_code)]

pub mod audit;
pub mod audit_find;
pub mod bench;
mod conn;
mod endpoint;
mod error;
mod ops;
mod pool;

pub use conn::{Client, ClientOptions, DEFAULT_REQUEST_TIMEOUT};
pub use endpoint::{BadVsockAddress, Endpoint};
pub use error::ClientError;
pub use kekd_proto::{
    code_name, Code, Context, EdekItem, ErrorCount, ErrorStatus, FrameError, HelloOk, ItemOk, ItemResult,
    KeyInfo, KeyName, MalformedResponse, Metadata, Op, OpCount, Reply, Secret, StatusInfo, TargetState,
    TenantName, VersionInfo, VersionState, WrapItem,
};
pub use pool::{Pool, PooledClient, RetryPolicy};

#[cfg(test)]
mod tests;
