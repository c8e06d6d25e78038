//! What one audit record says, before the writer gives it its place in the chain.
//!
//! A record is built in two halves: what is particular to one item (time, operation, key,
//! outcome), and what every item of a request shares (caller, metadata). The shared half
//! is serialised once per request, so a batch of 256 items costs 256 small serialisations,
//! not 256 copies of the caller's metadata.

use std::sync::Arc;
use std::time::SystemTime;

use kekd_proto::{Code, ErrorStatus, KeyName, Metadata};
use serde::Serialize;

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
    /// The peer's executable (`/proc/<pid>/exe`, read by the supervisor at connect).
    pub exe: Option<String>,
    pub role: Role,
}

/// The records of one request (one per batch item) or of one event, ready for the chain:
/// for each record, its members between `prev` and `hash`, and the UTC date
/// (`YYYY-MM-DD`) that picks their file. The items' own members lie one after the other
/// in one buffer, so a batch of 256 items costs one allocation, not 256, and the
/// request's shared half none: the writer copies both straight into its own buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Records {
    pub date: [u8; 10],
    /// The items' own members, each without braces, starting with `"time"`.
    items: Vec<u8>,
    /// Where each item's members end in `items`.
    ends: Vec<usize>,
    /// The request's members, without braces; may be empty.
    shared: Arc<str>,
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
            meta,
        };
        RequestPart(members(&view))
    }

    /// A caller turned away before it had a role (a Hello the ACL refused).
    pub fn refused(peer: &Peer, exe: Option<&str>, request_id: u64) -> Self {
        let view = RequestView {
            peer: Some(PeerView::of(peer, exe)),
            role: None,
            request_id: Some(request_id),
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
    /// Room for `items` records of one request, all stamped `time`.
    pub fn new(time: &Stamp, shared: &RequestPart, items: usize) -> Records {
        let date = time.as_str().as_bytes()[..10].try_into().expect("RFC 3339 starts with the date");
        Records {
            date,
            items: Vec::with_capacity(items * 160),
            ends: Vec::with_capacity(items),
            shared: Arc::clone(&shared.0),
        }
    }

    /// One record.
    pub fn one(time: &Stamp, tenant: &str, event: &str, it: Item<'_>, shared: &RequestPart) -> Records {
        let mut r = Records::new(time, shared, 1);
        r.push(time, tenant, event, it);
        r
    }

    /// Adds a record. Written by hand, not through serde: this runs once per batch item,
    /// and every string but the error message and the detail is of a charset that needs
    /// no JSON escaping (tenant and key names are validated, times and event names are
    /// ours).
    pub fn push(&mut self, time: &Stamp, tenant: &str, event: &str, it: Item<'_>) {
        debug_assert!([tenant, event].iter().all(|s| s.bytes().all(plain)), "{tenant} {event}");
        let out = &mut self.items;
        out.extend_from_slice(b"\"time\":\"");
        out.extend_from_slice(time.as_str().as_bytes());
        out.push(b'"');
        text(out, "tenant", tenant);
        text(out, "event", event);
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
        self.ends.push(out.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Each record's members, without braces, in two parts (the item's, the request's).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let item = &self.items[start..end];
            start = end;
            (item, self.shared.as_bytes())
        })
    }

    /// One record from a ready JSON object (tests of the writer).
    #[cfg(test)]
    pub fn raw(date: &str, object: &str) -> Records {
        let items = object.strip_prefix('{').and_then(|o| o.strip_suffix('}')).expect("an object");
        Records {
            date: date.as_bytes().try_into().unwrap(),
            items: items.as_bytes().to_vec(),
            ends: vec![items.len()],
            shared: "".into(),
        }
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
        let mut e = Records::new(&t, &shared, 2);
        let ok = Access::default();
        e.push(&t, "acme", "unwrap", Item { item: Some(0), access: &ok, outcome: Ok(()), detail: None });
        e.push(
            &t,
            "acme",
            "unwrap",
            Item { item: Some(1), access: &access, outcome: Err(&err), detail: None },
        );
        assert_eq!(e.date, t.as_str().as_bytes()[..10]);
        assert_eq!(e.len(), 2);
        let (first, _) = e.iter().next().unwrap();
        assert!(std::str::from_utf8(first).unwrap().ends_with("\"item\":0,\"outcome\":\"ok\""));
        let (item, shared) = e.iter().nth(1).unwrap();
        let members =
            format!("{},{}", std::str::from_utf8(item).unwrap(), std::str::from_utf8(shared).unwrap());
        let v: serde_json::Value = serde_json::from_str(&format!("{{{members}}}")).unwrap();
        assert!(members.starts_with("\"time\":"), "{members}");
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

        let guest = Caller { peer: Peer::Vsock { cid: 5, port: 1024 }, exe: None, role: Role::User };
        let part = RequestPart::new(Some(&guest), Some(8), None);
        let v: serde_json::Value = serde_json::from_str(&format!("{{{}}}", part.0)).unwrap();
        assert_eq!(v["peer"], serde_json::json!({ "cid": 5, "port": 1024 }), "a guest is named by its CID");
    }
}
