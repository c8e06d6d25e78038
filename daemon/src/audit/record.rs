//! What one audit record says, before the writer gives it its place in the chain.
//!
//! A record is built in two halves: what every record of a request shares (time, tenant,
//! event, caller, metadata), written first, and what is particular to one item (key,
//! outcome). The shared half is serialised and hashed once per request; each item's half
//! is hashed on the request's own task, on top of it. That leaves only each record's
//! chain members (`seq`, `prev`, last in the line: docs/FORMATS.md §5) to the writer, the
//! one place the chain is extended, so a batch of 256 items neither copies the caller's
//! metadata 256 times through SHA-256 nor hashes its records one after the other there.

use std::sync::Arc;
use std::time::SystemTime;

use kekd_proto::{Code, ErrorStatus, KeyName, Metadata};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::service::{Peer, Role};

/// Where the KEK of an operation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekFrom {
    Cache,
    /// A root-key call (HSM or TPM).
    Root,
    /// Unsealed in software under its parent KEK (a key chain).
    Parent,
    /// Cached past `kek_ttl`, served in the offline grace while the root key is unreachable.
    Grace,
}

/// The key an item used, as far as it got.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub key: Option<KeyName>,
    pub version: Option<u32>,
    pub kek: Option<KekFrom>,
}

impl KekFrom {
    pub fn name(self) -> &'static str {
        match self {
            KekFrom::Cache => "cache",
            KekFrom::Root => "root",
            KekFrom::Parent => "parent",
            KekFrom::Grace => "grace",
        }
    }
}

impl Access {
    pub fn of(key: &KeyName, version: u32, kek: Option<KekFrom>) -> Self {
        Access { key: Some(key.clone()), version: Some(version), kek }
    }
}

/// The caller, as the kernel and the supervisor saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct Caller {
    pub peer: Peer,
    /// The program the peer ran when the supervisor accepted its connection
    /// (`/proc/<pid>/exe`, the process pinned by a pidfd). It names, it does not prove:
    /// the process may have exec'd another program since.
    pub exe: Option<String>,
    pub role: Role,
}

/// The records of one request (one per batch item) or of one event, ready for the chain:
/// each record's members but `seq`, `prev` and `hash`, with their SHA-256 so far, and the
/// UTC date (`YYYY-MM-DD`) that picks their file. The items' own members lie one after
/// the other in one buffer, so a batch of 256 items costs one allocation, not 256.
pub struct Records {
    pub date: [u8; 10],
    /// `{"time":…,"tenant":…,"event":…` and the request's members: how each record begins.
    head: Vec<u8>,
    /// The items' own members, each with its leading comma.
    items: Vec<u8>,
    /// Where each item's members end in `items`.
    ends: Vec<usize>,
    /// SHA-256 over `head`, the start of every item's hash.
    head_hash: Sha256,
    /// For each record, SHA-256 over `head` and its own members: all its body but the
    /// chain members.
    hashed: Vec<Sha256>,
}

/// The half of a record shared by every item of one request.
pub struct RequestPart(Arc<str>);

/// `{"uid","gid","pid","exe"}` for a local process, `{"cid","port"}` over vsock.
#[derive(Serialize)]
#[serde(untagged)]
enum PeerView<'a> {
    Unix {
        uid: u32,
        gid: u32,
        pid: i32,
        #[serde(skip_serializing_if = "Option::is_none")]
        exe: Option<&'a str>,
    },
    Vsock {
        cid: u32,
        port: u32,
    },
}

impl<'a> PeerView<'a> {
    fn of(peer: &Peer, exe: Option<&'a str>) -> Self {
        match *peer {
            Peer::Unix { uid, gid, pid } => PeerView::Unix { uid, gid, pid, exe },
            Peer::Vsock { cid, port } => PeerView::Vsock { cid, port },
        }
    }
}

#[derive(Serialize)]
struct MetaView<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    principal: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    data_label: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    request_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    source_address: &'a str,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    fields: &'a std::collections::BTreeMap<String, String>,
}

#[derive(Serialize)]
struct RequestView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<PeerView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<u64>,
    /// How many attempts a folded record stands for (refused Hellos).
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<MetaView<'a>>,
}

impl RequestPart {
    pub fn new(caller: Option<&Caller>, request_id: Option<u64>, meta: Option<&Metadata>) -> Self {
        let meta = meta.filter(|m| **m != Metadata::default()).map(|m| MetaView {
            principal: &m.principal,
            data_label: &m.data_label,
            request_id: &m.caller_request_id,
            source_address: &m.source_address,
            fields: &m.fields,
        });
        let view = RequestView {
            peer: caller.map(|c| PeerView::of(&c.peer, c.exe.as_deref())),
            role: caller.map(|c| c.role),
            request_id,
            count: None,
            meta,
        };
        RequestPart(members(&view))
    }

    /// Callers turned away before they had a role (Hellos the ACL refused): `count` of
    /// them, folded into one record that names the last (its peer and Hello id).
    pub fn refused(peer: &Peer, exe: Option<&str>, request_id: u64, count: u64) -> Self {
        let view = RequestView {
            peer: Some(PeerView::of(peer, exe)),
            role: None,
            request_id: Some(request_id),
            count: Some(count),
            meta: None,
        };
        RequestPart(members(&view))
    }

    /// No caller: an event of the daemon's own (a lease change).
    pub fn none() -> Self {
        RequestPart("".into())
    }
}

/// The time of a record, as written: RFC 3339 UTC with milliseconds.
pub struct Stamp(String);

impl Stamp {
    pub fn now() -> Self {
        Stamp(humantime::format_rfc3339_millis(SystemTime::now()).to_string())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One item's record.
pub struct Item<'a> {
    pub item: Option<usize>,
    pub access: &'a Access,
    pub outcome: Result<(), &'a ErrorStatus>,
    pub detail: Option<&'a serde_json::Value>,
}

impl Records {
    /// Room for `items` records of one request, all stamped `time`: writes and hashes the
    /// members they share.
    pub fn new(time: &Stamp, tenant: &str, event: &str, shared: &RequestPart, items: usize) -> Records {
        debug_assert!([tenant, event].iter().all(|s| s.bytes().all(plain)), "{tenant} {event}");
        let date = time.as_str().as_bytes()[..10].try_into().expect("RFC 3339 starts with the date");
        let mut head = Vec::with_capacity(64 + shared.0.len());
        head.extend_from_slice(b"{\"time\":\"");
        head.extend_from_slice(time.as_str().as_bytes());
        head.push(b'"');
        text(&mut head, "tenant", tenant);
        text(&mut head, "event", event);
        if !shared.0.is_empty() {
            head.push(b',');
            head.extend_from_slice(shared.0.as_bytes());
        }
        Records::with_head(date, head, items)
    }

    fn with_head(date: [u8; 10], head: Vec<u8>, items: usize) -> Records {
        let head_hash = Sha256::new_with_prefix(&head);
        Records {
            date,
            head,
            items: Vec::with_capacity(items * 80),
            ends: Vec::with_capacity(items),
            head_hash,
            hashed: Vec::with_capacity(items),
        }
    }

    /// One record.
    pub fn one(time: &Stamp, tenant: &str, event: &str, it: Item<'_>, shared: &RequestPart) -> Records {
        let mut r = Records::new(time, tenant, event, shared, 1);
        r.push(it);
        r
    }

    /// Adds a record, and hashes its members on top of the request's. Written by hand, not
    /// through serde: this runs once per batch item, and every string but the error
    /// message and the detail is of a charset that needs no JSON escaping (key names are
    /// validated, the others are ours).
    pub fn push(&mut self, it: Item<'_>) {
        let out = &mut self.items;
        let start = out.len();
        if let Some(i) = it.item {
            number(out, "item", i as u64);
        }
        if let Some(k) = &it.access.key {
            debug_assert!(k.as_str().bytes().all(plain));
            text(out, "key", k.as_str());
        }
        if let Some(v) = it.access.version {
            number(out, "version", u64::from(v));
        }
        match it.outcome {
            Ok(()) => text(out, "outcome", "ok"),
            Err(e) => {
                text(out, "outcome", "error");
                text(out, "code", code_name(e.code));
                out.extend_from_slice(b",\"error\":");
                serde_json::to_writer(&mut *out, &e.message).expect("a string always serialises");
            }
        }
        if let Some(k) = it.access.kek {
            text(out, "kek", k.name());
        }
        if let Some(d) = it.detail {
            out.extend_from_slice(b",\"detail\":");
            serde_json::to_writer(&mut *out, d).expect("a JSON value always serialises");
        }
        let mut hash = self.head_hash.clone();
        hash.update(&out[start..]);
        self.hashed.push(hash);
        self.ends.push(out.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Each record: its head, its own members, and SHA-256 over both.
    pub fn iter(&self) -> impl Iterator<Item = Unchained<'_>> + '_ {
        let mut start = 0;
        self.ends.iter().zip(&self.hashed).map(move |(&end, hashed)| {
            let members = &self.items[start..end];
            start = end;
            Unchained { head: &self.head, members, hashed }
        })
    }

    /// One record from a ready JSON object (tests of the writer).
    #[cfg(test)]
    pub fn raw(date: &str, object: &str) -> Records {
        let head = object.strip_suffix('}').expect("an object");
        let mut r = Records::with_head(date.as_bytes().try_into().unwrap(), head.as_bytes().to_vec(), 1);
        r.hashed.push(r.head_hash.clone());
        r.ends.push(0);
        r
    }

    /// An event of the daemon itself (lease, audit): no caller, no key.
    pub fn event(
        tenant: &str,
        event: &str,
        outcome: Result<(), &ErrorStatus>,
        detail: serde_json::Value,
    ) -> Records {
        let access = Access::default();
        let it = Item { item: None, access: &access, outcome, detail: Some(&detail) };
        Records::one(&Stamp::now(), tenant, event, it, &RequestPart::none())
    }
}

/// A record without its chain members, as the writer receives it: the line up to them is
/// `head` then `members`, and `hashed` is SHA-256 over that much.
pub struct Unchained<'a> {
    pub head: &'a [u8],
    pub members: &'a [u8],
    pub hashed: &'a Sha256,
}

pub fn code_name(code: Code) -> &'static str {
    code.as_str_name()
}

/// `,"name":"value"`, for a value that needs no escaping.
fn text(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":\"");
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
}

/// `,"name":n`.
fn number(out: &mut Vec<u8>, name: &str, n: u64) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A byte that needs no escaping inside a JSON string.
fn plain(b: u8) -> bool {
    b >= 0x20 && b != b'"' && b != b'\\'
}

/// A struct's JSON object without its braces, to be spliced into a record.
fn members<T: Serialize>(v: &T) -> Arc<str> {
    let s = serde_json::to_string(v).expect("audit views always serialise");
    debug_assert!(s.starts_with('{') && s.ends_with('}'));
    Arc::from(&s[1..s.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_carries_item_caller_and_metadata() {
        let caller = Caller {
            peer: Peer::Unix { uid: 1000, gid: 100, pid: 42 },
            exe: Some("/usr/bin/app".into()),
            role: Role::User,
        };
        let mut meta = Metadata { principal: "billing-svc".into(), ..Default::default() };
        meta.fields.insert("ticket".into(), "CHG-1\n\"x\"".into());
        let shared = RequestPart::new(Some(&caller), Some(7), Some(&meta));
        let key = KeyName::parse("billing").unwrap();
        let access = Access::of(&key, 3, Some(KekFrom::Cache));
        let err = ErrorStatus::new(Code::DataInvalid, "invalid data");
        let t = Stamp::now();
        let mut e = Records::new(&t, "acme", "unwrap", &shared, 2);
        let ok = Access::default();
        e.push(Item { item: Some(0), access: &ok, outcome: Ok(()), detail: None });
        e.push(Item { item: Some(1), access: &access, outcome: Err(&err), detail: None });
        assert_eq!(e.date, t.as_str().as_bytes()[..10]);
        assert_eq!(e.len(), 2);
        let body = |r: &Unchained<'_>| {
            let text = format!(
                "{}{}}}",
                std::str::from_utf8(r.head).unwrap(),
                std::str::from_utf8(r.members).unwrap()
            );
            // What the writer gets is hashed as far as it goes.
            assert_eq!(r.hashed.clone().finalize(), Sha256::digest(&text.as_bytes()[..text.len() - 1]));
            text
        };
        let first = body(&e.iter().next().unwrap());
        assert!(first.ends_with(",\"item\":0,\"outcome\":\"ok\"}"), "{first}");
        let members = body(&e.iter().nth(1).unwrap());
        assert!(members.starts_with("{\"time\":"), "{members}");
        let v: serde_json::Value = serde_json::from_str(&members).unwrap();
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["event"], "unwrap");
        assert_eq!(v["item"], 1);
        assert_eq!(v["key"], "billing");
        assert_eq!(v["version"], 3);
        assert_eq!(v["outcome"], "error");
        assert_eq!(v["code"], "DATA_INVALID");
        assert_eq!(v["kek"], "cache");
        assert_eq!(v["peer"]["exe"], "/usr/bin/app");
        assert_eq!(v["role"], "user");
        assert_eq!(v["request_id"], 7);
        assert_eq!(v["meta"]["principal"], "billing-svc");
        assert_eq!(v["meta"]["fields"]["ticket"], "CHG-1\n\"x\"");
        assert!(v["meta"].get("data_label").is_none(), "empty metadata is left out");
        assert!(!members.contains('\n'), "one record, one line");

        let refused = RequestPart::refused(&Peer::Unix { uid: 7, gid: 8, pid: 9 }, None, 3, 4812);
        let v: serde_json::Value = serde_json::from_str(&format!("{{{}}}", refused.0)).unwrap();
        assert_eq!(v["count"], 4812, "a folded denial says how many attempts it stands for");
        assert_eq!(v["request_id"], 3);
        assert!(v.get("role").is_none(), "{v}");
        assert!(!first.contains("\"count\"") && !members.contains("\"count\""), "only denials count");

        let guest = Caller { peer: Peer::Vsock { cid: 5, port: 1024 }, exe: None, role: Role::User };
        let part = RequestPart::new(Some(&guest), Some(8), None);
        let v: serde_json::Value = serde_json::from_str(&format!("{{{}}}", part.0)).unwrap();
        assert_eq!(v["peer"], serde_json::json!({ "cid": 5, "port": 1024 }), "a guest is named by its CID");
    }
}
