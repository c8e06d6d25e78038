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

use crate::envelope::NONCE_LEN;
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
    /// The EDEK the item presented (unwrap, rewrap's `from`).
    pub opened: Option<EdekId>,
    /// Rewrap: the version the presented EDEK was sealed by (`version` is the new one).
    pub from_version: Option<u32>,
}

impl KekFrom {
    /// In the order a request's `kek` summary names them.
    const ALL: [KekFrom; 4] = [KekFrom::Cache, KekFrom::Root, KekFrom::Parent, KekFrom::Grace];

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
        Access { key: Some(key.clone()), version: Some(version), kek, ..Access::default() }
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

/// One record, ready for the chain: its members but `seq`, `prev` and `hash`, with their
/// SHA-256 so far, and the UTC date (`YYYY-MM-DD`) that picks its file. A request's
/// record holds all of its items (format 2, docs/FORMATS.md §5), so a batch of 256 is one
/// buffer, hashed once on the request's own task; the writer hashes only the chain
/// members on top.
///
/// (Named in the plural from format 1, when a request made one record per item: a
/// group commit still takes a list of them.)
pub struct Records {
    pub date: [u8; 10],
    /// `{"v":2,"time":…` through the record's last member, without the closing brace.
    body: Vec<u8>,
    /// SHA-256 over `body`.
    hashed: Sha256,
}

/// The record format kekd writes: `"v":2` opens every record (format 1 had no `v`).
pub const FORMAT: u32 = 2;

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

/// A record of one thing, not a request's items: an admin action, a lease or audit event,
/// a refused Hello, a request that failed before it had items to name.
pub struct Item<'a> {
    pub access: &'a Access,
    pub outcome: Result<(), &'a ErrorStatus>,
    pub detail: Option<&'a serde_json::Value>,
}

/// An EDEK's name in the trail: its 12-byte nonce (docs/FORMATS.md §3), random for every
/// EDEK kekd makes, written as 16 characters of unpadded base64url. Public like the rest
/// of the EDEK, and what a data owner holds to ask which of their data keys were used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdekId([u8; NONCE_LEN]);

impl EdekId {
    /// The nonce where the EDEK layout puts it, whether or not the rest of the EDEK is
    /// valid: a tampered EDEK is still named by the nonce it carries. None for bytes too
    /// short to hold one.
    pub fn of(edek: &[u8]) -> Option<EdekId> {
        crate::envelope::nonce_of(edek).map(EdekId)
    }

    /// `,"name":"<16 base64url>"`.
    fn write(&self, out: &mut Vec<u8>, name: &str) {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":\"");
        for c in self.0.chunks_exact(3) {
            let n = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
            out.extend([18, 12, 6, 0].map(|s| ALPHABET[(n >> s & 63) as usize]));
        }
        out.push(b'"');
    }
}

/// How many items of a request got their KEK from where: the request's `kek` member.
#[derive(Debug, Default, Clone, Copy)]
pub struct Keks([u32; 4]);

impl Keks {
    pub fn count<'a>(accesses: impl IntoIterator<Item = &'a Access>) -> Keks {
        let mut k = Keks::default();
        for a in accesses {
            if let Some(from) = a.kek {
                k.0[from as usize] += 1;
            }
        }
        k
    }
}

/// One item of a request's record.
pub struct Entry<'a> {
    pub access: &'a Access,
    pub outcome: Result<(), &'a ErrorStatus>,
    /// The EDEK the item made: generate's and wrap's, rewrap's `to`.
    pub made: Option<EdekId>,
}

/// A request's record being written: its members, then its items one by one.
pub struct RequestRecord {
    r: Records,
    /// Rewrap: an item names the EDEK it opened (`from`) and the one it made (`to`).
    moves: bool,
    first: bool,
}

impl RequestRecord {
    pub fn push(&mut self, e: Entry<'_>) {
        let out = &mut self.r.body;
        if !std::mem::take(&mut self.first) {
            out.push(b',');
        }
        // Each member is written with a leading comma; the first one's becomes the brace.
        let start = out.len();
        if let Some(k) = &e.access.key {
            debug_assert!(k.as_str().bytes().all(plain));
            text(out, "key", k.as_str());
        }
        if self.moves {
            if let Some(v) = e.access.from_version {
                number(out, "from_version", u64::from(v));
            }
        }
        if let Some(v) = e.access.version {
            number(out, "version", u64::from(v));
        }
        outcome(out, e.outcome);
        if let Some(k) = e.access.kek {
            text(out, "kek", k.name());
        }
        let (opened, made) = if self.moves { ("from", "to") } else { ("edek", "edek") };
        if let Some(id) = &e.access.opened {
            id.write(out, opened);
        }
        if let Some(id) = &e.made {
            id.write(out, made);
        }
        out[start] = b'{';
        out.push(b'}');
    }

    pub fn finish(mut self) -> Records {
        self.r.body.push(b']');
        self.r.hashed = Sha256::new_with_prefix(&self.r.body);
        self.r
    }
}

impl Records {
    /// `{"v":2,"time":…,"tenant":…,"event":…` and the caller's members.
    fn open(time: &Stamp, tenant: &str, event: &str, shared: &RequestPart, room: usize) -> Records {
        debug_assert!([tenant, event].iter().all(|s| s.bytes().all(plain)), "{tenant} {event}");
        let date = time.as_str().as_bytes()[..10].try_into().expect("RFC 3339 starts with the date");
        let mut body = Vec::with_capacity(96 + shared.0.len() + room);
        body.extend_from_slice(b"{\"v\":");
        body.extend_from_slice(itoa::Buffer::new().format(FORMAT).as_bytes());
        body.extend_from_slice(b",\"time\":\"");
        body.extend_from_slice(time.as_str().as_bytes());
        body.push(b'"');
        text(&mut body, "tenant", tenant);
        text(&mut body, "event", event);
        if !shared.0.is_empty() {
            body.push(b',');
            body.extend_from_slice(shared.0.as_bytes());
        }
        Records { date, body, hashed: Sha256::new() }
    }

    /// The record of a request with items (generate, wrap, unwrap, rewrap): its members
    /// once, `outcome` of the request as a whole (and, when it failed before it had items,
    /// the key it named in `target`), the `kek` summary, then `items`, pushed in order.
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        time: &Stamp,
        tenant: &str,
        event: &str,
        shared: &RequestPart,
        outcome_: Result<(), &ErrorStatus>,
        target: Option<&Access>,
        keks: Keks,
        items: usize,
    ) -> RequestRecord {
        let mut r = Records::open(time, tenant, event, shared, 32 + items * 96);
        let out = &mut r.body;
        if let Some(a) = target {
            access(out, a);
        }
        outcome(out, outcome_);
        if keks.0.iter().any(|&n| n > 0) {
            out.extend_from_slice(b",\"kek\":");
            let mut sep = b'{';
            for from in KekFrom::ALL {
                let n = keks.0[from as usize];
                if n > 0 {
                    out.push(sep);
                    sep = b',';
                    out.push(b'"');
                    out.extend_from_slice(from.name().as_bytes());
                    out.extend_from_slice(b"\":");
                    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                }
            }
            out.push(b'}');
        }
        out.extend_from_slice(b",\"items\":[");
        RequestRecord { r, moves: event == "rewrap", first: true }
    }

    /// A record of one thing (see [`Item`]).
    pub fn one(time: &Stamp, tenant: &str, event: &str, it: Item<'_>, shared: &RequestPart) -> Records {
        let mut r = Records::open(time, tenant, event, shared, 128);
        let out = &mut r.body;
        access(out, it.access);
        outcome(out, it.outcome);
        if let Some(k) = it.access.kek {
            text(out, "kek", k.name());
        }
        if let Some(d) = it.detail {
            out.extend_from_slice(b",\"detail\":");
            serde_json::to_writer(&mut *out, d).expect("a JSON value always serialises");
        }
        r.hashed = Sha256::new_with_prefix(&r.body);
        r
    }

    /// The record as the writer chains it: its body and SHA-256 over it.
    pub fn unchained(&self) -> Unchained<'_> {
        Unchained { body: &self.body, hashed: &self.hashed }
    }

    /// One record from a ready JSON object (tests of the writer).
    #[cfg(test)]
    pub fn raw(date: &str, object: &str) -> Records {
        let body = object.strip_suffix('}').expect("an object").as_bytes().to_vec();
        let hashed = Sha256::new_with_prefix(&body);
        Records { date: date.as_bytes().try_into().unwrap(), body, hashed }
    }

    /// An event of the daemon itself (lease, audit): no caller, no key.
    pub fn event(
        tenant: &str,
        event: &str,
        outcome: Result<(), &ErrorStatus>,
        detail: serde_json::Value,
    ) -> Records {
        let access = Access::default();
        let it = Item { access: &access, outcome, detail: Some(&detail) };
        Records::one(&Stamp::now(), tenant, event, it, &RequestPart::none())
    }
}

/// `,"key":…,"version":…` as far as the access got.
fn access(out: &mut Vec<u8>, a: &Access) {
    if let Some(k) = &a.key {
        debug_assert!(k.as_str().bytes().all(plain));
        text(out, "key", k.as_str());
    }
    if let Some(v) = a.version {
        number(out, "version", u64::from(v));
    }
}

/// `,"outcome":"ok"`, or `,"outcome":"error","code":…,"error":…`.
fn outcome(out: &mut Vec<u8>, outcome: Result<(), &ErrorStatus>) {
    match outcome {
        Ok(()) => text(out, "outcome", "ok"),
        Err(e) => {
            text(out, "outcome", "error");
            text(out, "code", code_name(e.code));
            out.extend_from_slice(b",\"error\":");
            serde_json::to_writer(&mut *out, &e.message).expect("a string always serialises");
        }
    }
}

/// A record without its chain members, as the writer receives it: the line up to them is
/// `body`, and `hashed` is SHA-256 over that much.
pub struct Unchained<'a> {
    pub body: &'a [u8],
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

    /// The record's line as the writer would end it, checked against its hash so far.
    fn line(r: &Records) -> serde_json::Value {
        let u = r.unchained();
        let body = u.body.to_vec();
        assert_eq!(u.hashed.clone().finalize(), Sha256::digest(&body), "hashed as far as it goes");
        let text = format!("{}}}", std::str::from_utf8(&body).unwrap());
        assert!(!text.contains('\n'), "one record, one line");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    #[test]
    fn a_request_record_names_its_caller_once_and_each_item_by_its_edek() {
        let caller = Caller {
            peer: Peer::Unix { uid: 1000, gid: 100, pid: 42 },
            exe: Some("/usr/bin/app".into()),
            role: Role::User,
        };
        let mut meta = Metadata { principal: "billing-svc".into(), ..Default::default() };
        meta.fields.insert("ticket".into(), "CHG-1\n\"x\"".into());
        let shared = RequestPart::new(Some(&caller), Some(7), Some(&meta));
        let key = KeyName::parse("billing").unwrap();
        let mut nonce = [0u8; 12];
        nonce[0] = 0xfb;
        nonce[11] = 0xff;
        let mut edek = vec![1, 1, 0, 7];
        edek.extend_from_slice(b"billing\0\0\0\x03");
        edek.extend_from_slice(&nonce);
        edek.extend_from_slice(&[0u8; 48]);
        let id = EdekId::of(&edek).unwrap();
        assert_eq!(id, EdekId(nonce));
        assert_eq!(EdekId::of(&edek[..26]), None, "too short to hold a nonce");
        let good = Access { opened: Some(id), ..Access::of(&key, 3, Some(KekFrom::Root)) };
        let bad = Access { opened: Some(id), ..Access::default() };
        let err = ErrorStatus::new(Code::DataInvalid, "invalid data");
        let t = Stamp::now();
        let mut r =
            Records::request(&t, "acme", "unwrap", &shared, Ok(()), None, Keks::count([&good, &bad]), 2);
        r.push(Entry { access: &good, outcome: Ok(()), made: None });
        r.push(Entry { access: &bad, outcome: Err(&err), made: None });
        let r = r.finish();
        assert_eq!(r.date, t.as_str().as_bytes()[..10]);
        let v = line(&r);
        assert_eq!(v["v"], 2);
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["event"], "unwrap");
        assert_eq!(v["outcome"], "ok");
        assert_eq!(v["kek"], serde_json::json!({ "root": 1 }));
        assert_eq!(v["peer"]["exe"], "/usr/bin/app");
        assert_eq!(v["role"], "user");
        assert_eq!(v["request_id"], 7);
        assert_eq!(v["meta"]["principal"], "billing-svc");
        assert_eq!(v["meta"]["fields"]["ticket"], "CHG-1\n\"x\"");
        assert!(v["meta"].get("data_label").is_none(), "empty metadata is left out");
        let items = v["items"].as_array().unwrap();
        assert_eq!(
            items[0],
            serde_json::json!({"key":"billing","version":3,"outcome":"ok","kek":"root","edek":"-wAAAAAAAAAAAAD_"})
        );
        assert_eq!(
            items[1],
            serde_json::json!({"outcome":"error","code":"DATA_INVALID","error":"invalid data","edek":"-wAAAAAAAAAAAAD_"})
        );

        // Rewrap names both EDEKs, and both versions.
        let moved = Access { from_version: Some(2), ..good.clone() };
        let mut r = Records::request(&t, "acme", "rewrap", &shared, Ok(()), None, Keks::default(), 1);
        r.push(Entry { access: &moved, outcome: Ok(()), made: Some(EdekId([0; 12])) });
        let v = line(&r.finish());
        assert_eq!(
            v["items"][0],
            serde_json::json!({"key":"billing","from_version":2,"version":3,"outcome":"ok","kek":"root",
                "from":"-wAAAAAAAAAAAAD_","to":"AAAAAAAAAAAAAAAA"})
        );
        assert!(v.get("kek").is_none(), "no KEK fetched, no summary");

        // A request refused before it had items names the key it asked for.
        let over = ErrorStatus::new(Code::ResourceExhausted, "budget");
        let target = Access { key: Some(key.clone()), ..Access::default() };
        let v = line(
            &Records::request(&t, "acme", "generate", &shared, Err(&over), Some(&target), Keks::default(), 0)
                .finish(),
        );
        assert_eq!((v["key"].as_str(), v["code"].as_str()), (Some("billing"), Some("RESOURCE_EXHAUSTED")));
        assert_eq!(v["items"], serde_json::json!([]));

        // Anything else is one record of one thing, in format 2 too.
        let d = serde_json::json!({"state": "disabled"});
        let it = Item { access: &Access::of(&key, 1, None), outcome: Ok(()), detail: Some(&d) };
        let v = line(&Records::one(&t, "acme", "set_key_version_state", it, &shared));
        assert_eq!((v["v"].as_u64(), v["version"].as_u64()), (Some(2), Some(1)));
        assert_eq!(v["detail"], d);
        assert!(v.get("items").is_none());

        let refused = RequestPart::refused(&Peer::Unix { uid: 7, gid: 8, pid: 9 }, None, 3, 4812);
        let v: serde_json::Value = serde_json::from_str(&format!("{{{}}}", refused.0)).unwrap();
        assert_eq!(v["count"], 4812, "a folded denial says how many attempts it stands for");
        assert_eq!(v["request_id"], 3);
        assert!(v.get("role").is_none(), "{v}");

        let guest = Caller { peer: Peer::Vsock { cid: 5, port: 1024 }, exe: None, role: Role::User };
        let part = RequestPart::new(Some(&guest), Some(8), None);
        let v: serde_json::Value = serde_json::from_str(&format!("{{{}}}", part.0)).unwrap();
        assert_eq!(v["peer"], serde_json::json!({ "cid": 5, "port": 1024 }), "a guest is named by its CID");
    }
}
