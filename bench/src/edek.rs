//! The shapes kekd's data carry, so each baseline handles bytes of the same size and form:
//! an EDEK v1 and its AAD (DESIGN §2), and the wire frames of an unwrap request and its
//! answer as `kekctl bench` sends and receives them.

use kekd_proto::{pb, put_str16, Context};

/// Tenant, key and version of `kekd dev`'s demo key, as in the EDEKs `kekctl bench` uses.
pub const TENANT: &str = "demo";
pub const KEY: &str = "default";
pub const VERSION: u32 = 1;
pub const DEK_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// EDEK v1 header: format, algorithm, key name, KEK version.
pub fn header() -> Vec<u8> {
    let mut h = vec![1u8, 1u8];
    put_str16(&mut h, KEY);
    h.extend_from_slice(&VERSION.to_be_bytes());
    h
}

/// The AAD kekd binds an EDEK of the demo key to, with an empty context (what `kekctl
/// bench` uses): `"kekd/edek/v1" ‖ str16(tenant) ‖ header ‖ canonical context`.
pub fn aad() -> Vec<u8> {
    let mut aad = b"kekd/edek/v1".to_vec();
    put_str16(&mut aad, TENANT);
    aad.extend_from_slice(&header());
    Context::default().encode_canonical(&mut aad);
    aad
}

/// Length of an EDEK of a 32-byte DEK under the demo key.
pub fn edek_len() -> usize {
    header().len() + NONCE_LEN + DEK_LEN + TAG_LEN
}

/// A request id of the size `kekctl bench` sends mid-run (a 3-byte varint).
const REQUEST_ID: u64 = 100_000;

/// The frame (length prefix included) of an unwrap of `batch` EDEKs, as kekd-client
/// encodes it with no audit metadata and an empty context.
pub fn unwrap_request_frame(batch: usize) -> Vec<u8> {
    let item = pb::EdekItem { edek: vec![0xA5; edek_len()], context: Default::default() };
    let msg = pb::Request {
        request_id: REQUEST_ID,
        metadata: Some(Default::default()),
        op: Some(pb::request::Op::Unwrap(pb::UnwrapRequest { items: vec![item; batch] })),
    };
    let mut out = Vec::new();
    kekd_proto::frame::encode_frame(&msg, &mut out);
    out
}

/// The frame of kekd's answer to that unwrap: every item OK, with its 32-byte plaintext,
/// key name and version.
pub fn unwrap_response_frame(batch: usize, request_id: u64) -> Vec<u8> {
    let mut out = Vec::new();
    kekd_proto::frame::encode_frame(&unwrap_response(batch, request_id), &mut out);
    out
}

pub fn unwrap_response(batch: usize, request_id: u64) -> pb::Response {
    let ok = || Some(pb::Status { code: pb::Code::Ok as i32, message: String::new() });
    let item = pb::ItemResult {
        status: ok(),
        plaintext: vec![0x5A; DEK_LEN],
        edek: Vec::new(),
        key_name: KEY.to_owned(),
        key_version: VERSION,
    };
    pb::Response {
        request_id,
        status: ok(),
        result: Some(pb::response::Result::Batch(pb::BatchResponse { items: vec![item; batch] })),
    }
}

/// The answer-frame size for the request frame `unwrap_request_frame(batch)`.
pub fn response_len(batch: usize) -> usize {
    unwrap_response_frame(batch, REQUEST_ID).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edek_is_75_bytes_and_aad_has_the_published_layout() {
        assert_eq!(edek_len(), 2 + 2 + 7 + 4 + 12 + 32 + 16);
        assert_eq!(aad(), b"kekd/edek/v1\x00\x04demo\x01\x01\x00\x07default\x00\x00\x00\x01\x00\x00");
    }

    #[test]
    fn frames_grow_with_the_batch() {
        let (one, many) = (unwrap_request_frame(1).len(), unwrap_request_frame(256).len());
        assert!(one > edek_len() && many > 256 * edek_len());
        assert!(response_len(256) > 256 * DEK_LEN);
    }
}
