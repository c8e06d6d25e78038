//! Async client for kekd.
//!
//! A [`Client`] is one connection bound to one tenant (the daemon hands each connection to
//! that tenant's worker process), pipelining any number of concurrent calls over it. The
//! request and reply types are the validated ones from [`kekd_proto`], re-exported here so
//! callers need only this crate.
#![forbid(unsafe_code)]

mod conn;
mod error;
mod ops;

pub use conn::{Client, ClientOptions};
pub use error::ClientError;
pub use kekd_proto::{
    code_name, Code, Context, EdekItem, ErrorStatus, FrameError, HelloOk, ItemOk, ItemResult, KeyInfo,
    KeyName, MalformedResponse, Metadata, Op, Reply, Secret, StatusInfo, TargetState, TenantName,
    VersionInfo, VersionState, WrapItem,
};

#[cfg(test)]
mod tests;
