//! The kekd wire protocol.
//!
//! `pb` holds the generated protobuf types and nothing outside this crate should build or
//! match on them: [`api`] turns them into validated native types (secrets in
//! [`zeroize::Zeroizing`] buffers) and back, and [`frame`] reads and writes the
//! length-prefixed frames, refusing oversized ones before allocating.
#![forbid(unsafe_code)]

pub mod api;
pub mod frame;

/// Generated protobuf types for `kekd.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/kekd.v1.rs"));
}

pub use api::*;
pub use frame::{FrameError, FrameReader, DEFAULT_MAX_FRAME};
