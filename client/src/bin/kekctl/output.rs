//! Standard input and output: raw bytes, text lines and JSON.
//!
//! Output that may hold a plaintext is built in one zeroizing buffer sized up front (so it
//! never reallocates and leaves copies behind) and written straight to the file
//! descriptor, bypassing the standard library's stdout buffer, which is never wiped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kekd_client::audit::{Broken, Summary};
use kekd_client::{code_name, Code, ErrorStatus, ItemOk, KeyInfo, StatusInfo, TenantName};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::exit::CliError;

/// Reads all of stdin, at most `limit` bytes: a larger input is refused as the daemon would
/// refuse it, without reading (or buffering) the rest.
pub fn read_stdin(limit: usize, what: &str) -> Result<Zeroizing<Vec<u8>>, CliError> {
    let mut buf = Zeroizing::new(vec![0u8; limit + 1]);
    let mut len = 0;
    let mut stdin = io::stdin().lock();
    while len < buf.len() {
        match stdin.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(CliError::Local { what: "cannot read stdin", error }),
        }
    }
    if len == 0 || len > limit {
        let msg = format!("stdin: {what} must be 1 to {limit} bytes");
        return Err(ErrorStatus::new(Code::InvalidArgument, msg).into());
    }
    buf.truncate(len);
    Ok(buf)
}

/// Writes and flushes `bytes` on stdout, unbuffered (see the module comment).
pub fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let failed = |error| CliError::Local { what: "cannot write to stdout", error };
    let mut lock = io::stdout().lock();
    lock.flush().map_err(failed)?;
    let mut out = File::from(lock.as_fd().try_clone_to_owned().map_err(failed)?);
    out.write_all(bytes).and_then(|()| out.flush()).map_err(failed)
}

/// Which parts of a batch item a command prints.
#[derive(Clone, Copy)]
pub struct Fields {
    pub plaintext: bool,
    pub edek: bool,
}

/// A buffer big enough for `items` printed as JSON or text, so it never grows.
pub fn item_buffer(items: &[ItemOk]) -> Zeroizing<Vec<u8>> {
    let b64 = |n: usize| n.div_ceil(3) * 4;
    let size = items.iter().map(|it| {
        let pt = it.plaintext.as_ref().map_or(0, |p| b64(p.len()));
        let edek = it.edek.as_ref().map_or(0, |e| b64(e.len()));
        // Key names are ASCII without quotes or backslashes, so JSON escaping never
        // lengthens them; 64 bytes cover the field names, punctuation and version.
        pt + edek + it.key.as_str().len() + 64
    });
    Zeroizing::new(Vec::with_capacity(size.sum::<usize>() + 8))
}

fn push_b64(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    out.resize(start + bytes.len().div_ceil(3) * 4, 0);
    let written = STANDARD.encode_slice(bytes, &mut out[start..]).expect("sized for padded base64");
    out.truncate(start + written);
}

/// One item as a JSON object. Written by hand rather than through `Serialize`, so that
/// no serialisable type ever holds a secret.
pub fn push_item_json(out: &mut Vec<u8>, item: &ItemOk, fields: Fields) {
    out.push(b'{');
    if let (true, Some(p)) = (fields.plaintext, &item.plaintext) {
        out.extend_from_slice(b"\"plaintext\":\"");
        push_b64(out, p.expose());
        out.extend_from_slice(b"\",");
    }
    if let (true, Some(e)) = (fields.edek, &item.edek) {
        out.extend_from_slice(b"\"edek\":\"");
        push_b64(out, e);
        out.extend_from_slice(b"\",");
    }
    out.extend_from_slice(b"\"key\":");
    serde_json::to_writer(&mut *out, item.key.as_str()).expect("writing to a Vec cannot fail");
    out.extend_from_slice(format!(",\"version\":{}}}", item.version).as_bytes());
}

/// One item as `plaintext: ...` / `edek: ...` lines.
pub fn push_item_text(out: &mut Vec<u8>, item: &ItemOk, fields: Fields) {
    if let (true, Some(p)) = (fields.plaintext, &item.plaintext) {
        out.extend_from_slice(b"plaintext: ");
        push_b64(out, p.expose());
        out.push(b'\n');
    }
    if let (true, Some(e)) = (fields.edek, &item.edek) {
        out.extend_from_slice(b"edek: ");
        push_b64(out, e);
        out.push(b'\n');
    }
}

#[derive(Serialize)]
struct KeyView<'a> {
    name: &'a str,
    active_version: u32,
    versions: Vec<VersionView>,
    min_decrypt_version: u32,
    keep_versions: u32,
}

#[derive(Serialize)]
struct VersionView {
    version: u32,
    state: &'static str,
    created_unix: u64,
}

fn key_view(k: &KeyInfo) -> KeyView<'_> {
    KeyView {
        name: k.name.as_str(),
        active_version: k.active_version,
        versions: k
            .versions
            .iter()
            .map(|v| VersionView {
                version: v.version,
                state: v.state.as_str(),
                created_unix: v.created_unix,
            })
            .collect(),
        min_decrypt_version: k.min_decrypt_version,
        keep_versions: k.keep_versions,
    }
}

fn json_line<T: Serialize>(value: &T) -> String {
    let mut s = serde_json::to_string(value).expect("plain data always serialises");
    s.push('\n');
    s
}

pub fn key_json(k: &KeyInfo) -> String {
    json_line(&key_view(k))
}

pub fn keys_json(keys: &[KeyInfo]) -> String {
    json_line(&keys.iter().map(key_view).collect::<Vec<_>>())
}

/// A table with one row per key; versions as `number:state`. A POLICY column appears when
/// some key has version controls set.
pub fn keys_table(keys: &[KeyInfo]) -> String {
    let policy = |k: &KeyInfo| {
        let mut p = Vec::new();
        if k.min_decrypt_version > 0 {
            p.push(format!("min_decrypt_version={}", k.min_decrypt_version));
        }
        if k.keep_versions > 0 {
            p.push(format!("keep_versions={}", k.keep_versions));
        }
        p.join(" ")
    };
    let with_policy = keys.iter().any(|k| !policy(k).is_empty());
    let rows: Vec<[String; 4]> = keys
        .iter()
        .map(|k| {
            let versions: Vec<String> =
                k.versions.iter().map(|v| format!("{}:{}", v.version, v.state.as_str())).collect();
            [k.name.to_string(), k.active_version.to_string(), versions.join(" "), policy(k)]
        })
        .collect();
    let header = ["NAME".to_string(), "ACTIVE".to_string(), "VERSIONS".to_string(), "POLICY".to_string()];
    let width = |i: usize| rows.iter().chain([&header]).map(|r| r[i].len()).max().unwrap_or(0);
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let mut out = String::new();
    for [name, active, versions, policy] in [&header].into_iter().chain(&rows) {
        let line = if with_policy {
            format!("{name:<w0$}  {active:<w1$}  {versions:<w2$}  {policy}")
        } else {
            format!("{name:<w0$}  {active:<w1$}  {versions}")
        };
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[derive(Serialize)]
struct StatusView<'a> {
    tenant: &'a str,
    backend: &'a str,
    backend_healthy: bool,
    backend_error: &'a str,
    cached_keks: u32,
    keys: u32,
    uptime_seconds: u64,
    memory_locked: bool,
    worker_pid: u32,
    lease: &'a str,
    /// What `allow_exportable_root` excused in the root key; empty for one that stays in
    /// its HSM.
    root_key_exceptions: &'a [String],
    /// Empty unless the caller is an admin of the tenant.
    key_versions: Vec<KeyView<'a>>,
    /// By operation name; only operations served at least once.
    operations: BTreeMap<&'a str, Counts>,
    /// By code name; only codes answered at least once.
    errors: BTreeMap<&'static str, Counts>,
}

#[derive(Serialize)]
struct Counts {
    requests: u64,
    items: u64,
}

fn status_view(s: &StatusInfo) -> StatusView<'_> {
    StatusView {
        tenant: s.tenant.as_str(),
        backend: &s.backend,
        backend_healthy: s.backend_healthy,
        backend_error: &s.backend_error,
        cached_keks: s.cached_keks,
        keys: s.keys,
        uptime_seconds: s.uptime_seconds,
        memory_locked: s.memory_locked,
        worker_pid: s.worker_pid,
        lease: &s.lease,
        root_key_exceptions: &s.root_key_exceptions,
        key_versions: s.key_versions.iter().map(key_view).collect(),
        operations: s
            .operations
            .iter()
            .map(|o| (o.operation.as_str(), Counts { requests: o.requests, items: o.items }))
            .collect(),
        errors: s
            .errors
            .iter()
            .map(|e| (code_name(e.code), Counts { requests: e.requests, items: e.items }))
            .collect(),
    }
}

/// One object: the fields of `StatusInfo`, with `operations` and `errors` as objects keyed
/// by operation and code name, e.g. `"operations":{"unwrap":{"requests":3,"items":48}}`.
pub fn status_json(s: &StatusInfo) -> String {
    json_line(&status_view(s))
}

/// `status --tenants`: an array with one object per tenant, in the order given; a tenant
/// that could not be asked is `{"tenant":…,"error":{"code":"NOT_FOUND","message":…}}`
/// (`code` is null for a failure without a wire code).
pub fn statuses_json(shown: &[(&TenantName, Result<StatusInfo, CliError>)]) -> String {
    let values: Vec<serde_json::Value> = shown
        .iter()
        .map(|(tenant, r)| match r {
            Ok(s) => serde_json::to_value(status_view(s)).expect("plain data always serialises"),
            Err(e) => {
                let (code, message) = match e {
                    CliError::Status(st) => (Some(code_name(st.code)), st.message.clone()),
                    other => (None, other.to_string()),
                };
                serde_json::json!({ "tenant": tenant.as_str(), "error": { "code": code, "message": message } })
            }
        })
        .collect();
    json_line(&values)
}

/// `status --tenants` as text: each tenant's [`status_text`] (or its error), separated by a
/// blank line.
pub fn statuses_text(shown: &[(&TenantName, Result<StatusInfo, CliError>)]) -> String {
    let blocks: Vec<String> = shown
        .iter()
        .map(|(tenant, r)| match r {
            Ok(s) => status_text(s),
            Err(e) => format!("tenant: {tenant}\nerror: {e}\n"),
        })
        .collect();
    blocks.join("\n")
}

/// `name: value` lines, then tables of the keys and their versions (when shown), the
/// operations served and the error answers.
pub fn status_text(s: &StatusInfo) -> String {
    let health = match (s.backend_healthy, s.backend_error.is_empty()) {
        (true, _) => "ok".to_string(),
        (false, true) => "unhealthy".to_string(),
        (false, false) => format!("unhealthy: {}", s.backend_error),
    };
    let yes_no = |b| if b { "yes" } else { "no" };
    let mut out = format!(
        "tenant: {}\nworker pid: {}\nbackend: {}\nhealth: {health}\nlease: {}\ncached KEKs: {}\nkeys: {}\nuptime: {}\nmemory locked: {}\n",
        s.tenant,
        s.worker_pid,
        s.backend,
        s.lease,
        s.cached_keks,
        s.keys,
        uptime(s.uptime_seconds),
        yes_no(s.memory_locked),
    );
    // Right under the facts, not in a table further down: an exception is easy to miss.
    for exception in &s.root_key_exceptions {
        out.push_str(&format!("root key exception (allow_exportable_root): {exception}\n"));
    }
    if !s.key_versions.is_empty() {
        out.push('\n');
        out.push_str(&keys_table(&s.key_versions));
    }
    out.push('\n');
    if s.operations.is_empty() {
        out.push_str("operations: none served yet\n");
    } else {
        let rows =
            s.operations.iter().map(|o| [o.operation.clone(), o.requests.to_string(), o.items.to_string()]);
        out.push_str(&table(["OPERATION", "REQUESTS", "ITEMS"], rows));
    }
    out.push('\n');
    if s.errors.is_empty() {
        out.push_str("errors: none\n");
    } else {
        let rows = s
            .errors
            .iter()
            .map(|e| [code_name(e.code).to_owned(), e.requests.to_string(), e.items.to_string()]);
        out.push_str(&table(["ERROR", "REQUESTS", "ITEMS"], rows));
    }
    out
}

/// Left-aligned columns two spaces apart, the header first.
fn table<const N: usize>(header: [&str; N], rows: impl Iterator<Item = [String; N]>) -> String {
    let rows: Vec<[String; N]> = std::iter::once(header.map(str::to_owned)).chain(rows).collect();
    let widths: Vec<usize> = (0..N).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(&widths) {
            line.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `ok: 1234 records in 3 files, seq 1..1234, head <hash>`, then the last record as
/// `--from` takes it, for the verify of later files once these are archived; without
/// records just the counts.
///
/// Then the checkpoints: how many were found and whether they were checked (`--config`),
/// and how many records come after the last one (nothing anchors those).
pub fn audit_ok_text(s: &Summary) -> String {
    let plural = |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let mut text = format!("ok: {} in {}", plural(s.records, "record"), plural(s.files as u64, "file"));
    if let (Some(first), Some(last), Some(head)) = (s.first_seq, s.last_seq, &s.head) {
        text.push_str(&format!(", seq {first}..{last}, head {head}"));
    }
    text.push('\n');
    if let Some(last) = s.last() {
        text.push_str(&format!("last: {last} (verify the files after these alone with --from {last})\n"));
    }
    if s.checkpoints_checked {
        text.push_str(&format!(
            "checkpoints: {} checked (each MAC under the tenant's checkpoint key, each naming the record before it)",
            s.checkpoints
        ));
    } else {
        text.push_str(&format!(
            "checkpoints: {} found, NOT checked (their MACs take the tenant's root key: \
             add --config KEKD_TOML --tenant NAME)",
            s.checkpoints
        ));
    }
    if s.checkpoints == 0 {
        text.push_str("; no record is anchored\n");
    } else {
        let verb = if s.unanchored == 1 { "is" } else { "are" };
        let after = plural(s.unanchored, "record");
        text.push_str(&format!("; {after} after the last checkpoint {verb} not anchored\n"));
    }
    text
}

/// One item found by `audit find`, for a person: when, what, outcome, who, where.
///
/// `2026-12-06T10:00:00.123Z unwrap ok, item 3 (edek) key default v1 kek cache; by uid 1000
/// pid 42 /usr/bin/app (user), request 7; seq 42 at acme/2026-12-06.jsonl:41`
pub fn found_text(f: &kekd_client::audit_find::Found) -> String {
    use serde_json::Value;
    let r = &f.record;
    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    let mut text = format!("{} {} {}", s("time"), s("event"), s("outcome"));
    if r.contains_key("code") {
        text.push_str(&format!(" {}", s("code")));
    }
    text.push_str(&format!(", item {} ({})", r.get("item").unwrap_or(&Value::Null), s("as")));
    if r.contains_key("key") {
        text.push_str(&format!(" key {}", s("key")));
    }
    if let Some(v) = r.get("from_version") {
        text.push_str(&format!(" v{v} ->"));
    }
    if let Some(v) = r.get("version") {
        text.push_str(&format!(" v{v}"));
    }
    if r.contains_key("kek") {
        text.push_str(&format!(" kek {}", s("kek")));
    }
    let peer = r.get("peer").unwrap_or(&Value::Null);
    let field = |k: &str| peer.get(k).map(|v| v.to_string().trim_matches('"').to_owned());
    let who = match (field("uid"), field("cid")) {
        (Some(uid), _) => {
            let exe = field("exe").map(|e| format!(" {e}")).unwrap_or_default();
            format!("uid {uid} pid {}{exe}", field("pid").unwrap_or_else(|| "-".into()))
        }
        (None, Some(cid)) => format!("vsock cid {cid} port {}", field("port").unwrap_or_else(|| "-".into())),
        (None, None) => "-".into(),
    };
    text.push_str(&format!("; by {who} ({})", s("role")));
    if let Some(id) = r.get("request_id") {
        text.push_str(&format!(", request {id}"));
    }
    if let Some(p) = r.get("meta").and_then(|m| m.get("principal")).and_then(Value::as_str) {
        text.push_str(&format!(", for {p}"));
    }
    let seq = r.get("seq").map_or("-".into(), Value::to_string);
    text.push_str(&format!("; seq {seq} at {}:{}\n", f.file.display(), f.line));
    text
}

/// One item found by `audit find`: the record's members and the item's, one line.
pub fn found_json(f: &kekd_client::audit_find::Found) -> String {
    let mut r = f.record.clone();
    r.insert("file".into(), f.file.display().to_string().into());
    r.insert("line".into(), f.line.into());
    serde_json::Value::Object(r).to_string() + "\n"
}

#[derive(Serialize)]
struct AuditOkView<'a> {
    ok: bool,
    records: u64,
    files: usize,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    head: Option<&'a str>,
    last: Option<String>,
    checkpoints: u64,
    checkpoints_checked: bool,
    unanchored: u64,
}

/// `{"ok":true,"records":…,"files":…,"first_seq":…,"last_seq":…,"head":"…","last":"SEQ:HASH",
/// "checkpoints":…,"checkpoints_checked":…,"unanchored":…}`; `first_seq` to `last` are null
/// when there are no records.
pub fn audit_ok_json(s: &Summary) -> String {
    json_line(&AuditOkView {
        ok: true,
        records: s.records,
        files: s.files,
        first_seq: s.first_seq,
        last_seq: s.last_seq,
        head: s.head.as_deref(),
        last: s.last(),
        checkpoints: s.checkpoints,
        checkpoints_checked: s.checkpoints_checked,
        unanchored: s.unanchored,
    })
}

#[derive(Serialize)]
struct AuditBrokenView<'a> {
    ok: bool,
    file: &'a str,
    line: u64,
    seq: Option<u64>,
    problem: &'a str,
}

/// `{"ok":false,"file":…,"line":…,"seq":…,"problem":"…"}`, naming the first broken record;
/// `seq` is null when the line does not begin with one.
pub fn audit_broken_json(b: &Broken) -> String {
    json_line(&AuditBrokenView {
        ok: false,
        file: &b.file.to_string_lossy(),
        line: b.line,
        seq: b.seq,
        problem: &b.problem,
    })
}

fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m {s}s"),
    }
}

#[cfg(test)]
mod tests {
    use kekd_client::{ErrorCount, KeyName, OpCount, Secret, TenantName, VersionInfo, VersionState};

    use super::*;

    fn item() -> ItemOk {
        ItemOk {
            plaintext: Some(Secret::from_vec(vec![0xfb; 32])),
            edek: Some(vec![1, 2, 3, 4]),
            key: KeyName::parse("billing/invoices").unwrap(),
            version: 7,
        }
    }

    #[test]
    fn item_json_is_valid_and_fits_its_buffer() {
        let items = [item()];
        let mut out = item_buffer(&items);
        let cap = out.capacity();
        push_item_json(&mut out, &items[0], Fields { plaintext: true, edek: true });
        assert_eq!(out.capacity(), cap, "the buffer must not reallocate");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["plaintext"], STANDARD.encode([0xfb; 32]));
        assert_eq!(v["edek"], "AQIDBA==");
        assert_eq!(v["key"], "billing/invoices");
        assert_eq!(v["version"], 7);

        let mut out = item_buffer(&items);
        push_item_json(&mut out, &items[0], Fields { plaintext: false, edek: true });
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v.get("plaintext").is_none());
    }

    #[test]
    fn item_text_lines() {
        let mut out = Vec::new();
        push_item_text(&mut out, &item(), Fields { plaintext: false, edek: true });
        assert_eq!(out, b"edek: AQIDBA==\n");
    }

    fn key_info() -> KeyInfo {
        KeyInfo {
            name: KeyName::parse("default").unwrap(),
            active_version: 2,
            versions: vec![
                VersionInfo { version: 1, state: VersionState::DecryptOnly, created_unix: 100 },
                VersionInfo { version: 2, state: VersionState::Active, created_unix: 200 },
            ],
            min_decrypt_version: 0,
            keep_versions: 0,
        }
    }

    #[test]
    fn keys_as_json_and_table() {
        let v: serde_json::Value = serde_json::from_str(&keys_json(&[key_info()])).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"name": "default", "active_version": 2, "versions": [
                {"version": 1, "state": "decrypt-only", "created_unix": 100},
                {"version": 2, "state": "active", "created_unix": 200},
            ], "min_decrypt_version": 0, "keep_versions": 0}])
        );
        assert_eq!(
            keys_table(&[key_info()]),
            "NAME     ACTIVE  VERSIONS\ndefault  2       1:decrypt-only 2:active\n"
        );
        let with_policy = KeyInfo { min_decrypt_version: 2, keep_versions: 3, ..key_info() };
        assert_eq!(
            keys_table(&[with_policy, KeyInfo { name: KeyName::parse("b").unwrap(), ..key_info() }]),
            "NAME     ACTIVE  VERSIONS                 POLICY\n\
             default  2       1:decrypt-only 2:active  min_decrypt_version=2 keep_versions=3\n\
             b        2       1:decrypt-only 2:active\n"
        );
    }

    fn status_info() -> StatusInfo {
        StatusInfo {
            tenant: TenantName::parse("demo").unwrap(),
            backend: "pkcs11".into(),
            backend_healthy: false,
            backend_error: "token absent".into(),
            cached_keks: 3,
            keys: 1,
            uptime_seconds: 3723,
            memory_locked: true,
            worker_pid: 4242,
            lease: "online".into(),
            root_key_exceptions: Vec::new(),
            key_versions: vec![key_info()],
            operations: vec![
                OpCount { operation: "generate".into(), requests: 2, items: 20 },
                OpCount { operation: "rotate_key".into(), requests: 1, items: 0 },
            ],
            errors: vec![ErrorCount { code: Code::DataInvalid, requests: 0, items: 2 }],
        }
    }

    #[test]
    fn status_text_lines() {
        let s = status_info();
        let text = status_text(&s);
        assert!(text.contains("health: unhealthy: token absent\n"), "{text}");
        assert!(text.contains("uptime: 1h 2m 3s\n"), "{text}");
        assert!(text.contains("memory locked: yes\n"), "{text}");
        assert!(
            text.ends_with(
                "\nNAME     ACTIVE  VERSIONS\n\
                 default  2       1:decrypt-only 2:active\n\
                 \n\
                 OPERATION   REQUESTS  ITEMS\n\
                 generate    2         20\n\
                 rotate_key  1         0\n\
                 \n\
                 ERROR         REQUESTS  ITEMS\n\
                 DATA_INVALID  0         2\n"
            ),
            "{text}"
        );
        let idle = StatusInfo { key_versions: vec![], operations: vec![], errors: vec![], ..status_info() };
        let text = status_text(&idle);
        assert!(
            text.ends_with("memory locked: yes\n\noperations: none served yet\n\nerrors: none\n"),
            "{text}"
        );
    }

    #[test]
    fn status_json_keys_counts_by_name() {
        let v: serde_json::Value = serde_json::from_str(&status_json(&status_info())).unwrap();
        assert_eq!(v["cached_keks"], 3);
        assert_eq!(v["backend_healthy"], false);
        assert_eq!(v["worker_pid"], 4242);
        assert_eq!(
            v["operations"],
            serde_json::json!({
                "generate": {"requests": 2, "items": 20}, "rotate_key": {"requests": 1, "items": 0},
            })
        );
        assert_eq!(v["errors"], serde_json::json!({"DATA_INVALID": {"requests": 0, "items": 2}}));
        assert_eq!(
            v["key_versions"][0]["versions"][1],
            serde_json::json!({"version": 2, "state": "active", "created_unix": 200})
        );
    }

    #[test]
    fn several_tenants_with_an_error_among_them() {
        let (demo, ghost) = (TenantName::parse("demo").unwrap(), TenantName::parse("ghost").unwrap());
        let missing =
            || CliError::Status(ErrorStatus::new(Code::NotFound, "tenant \"ghost\" does not exist"));
        let shown = [(&demo, Ok(status_info())), (&ghost, Err(missing()))];
        let v: serde_json::Value = serde_json::from_str(&statuses_json(&shown)).unwrap();
        assert_eq!(v[0]["tenant"], "demo");
        assert_eq!(v[0]["worker_pid"], 4242);
        assert_eq!(
            v[1],
            serde_json::json!({"tenant": "ghost", "error": {"code": "NOT_FOUND", "message": "tenant \"ghost\" does not exist"}})
        );
        let text = statuses_text(&shown);
        assert!(text.starts_with("tenant: demo\n"), "{text}");
        assert!(text.ends_with("DATA_INVALID  0         2\n\ntenant: ghost\nerror: NOT_FOUND: tenant \"ghost\" does not exist\n"), "{text}");
    }

    #[test]
    fn audit_results_as_text_and_json() {
        let summary = Summary {
            records: 1234,
            files: 3,
            first_seq: Some(1),
            last_seq: Some(1234),
            head: Some("ab".repeat(32)),
            checkpoints: 20,
            checkpoints_checked: false,
            unanchored: 7,
        };
        assert_eq!(
            audit_ok_text(&summary),
            format!(
                "ok: 1234 records in 3 files, seq 1..1234, head {h}\n\
                 last: 1234:{h} (verify the files after these alone with --from 1234:{h})\n\
                 checkpoints: 20 found, NOT checked (their MACs take the tenant's root key: add --config \
                 KEKD_TOML --tenant NAME); 7 records after the last checkpoint are not anchored\n",
                h = "ab".repeat(32)
            )
        );
        assert_eq!(
            audit_ok_json(&summary),
            format!("{{\"ok\":true,\"records\":1234,\"files\":3,\"first_seq\":1,\"last_seq\":1234,\"head\":\"{h}\",\"last\":\"1234:{h}\",\"checkpoints\":20,\"checkpoints_checked\":false,\"unanchored\":7}}\n", h = "ab".repeat(32))
        );
        let checked = Summary { checkpoints_checked: true, unanchored: 1, ..summary };
        assert!(
            audit_ok_text(&checked).ends_with(
                "\ncheckpoints: 20 checked (each MAC under the tenant's checkpoint key, each naming the record \
                 before it); 1 record after the last checkpoint is not anchored\n"
            ),
            "{}",
            audit_ok_text(&checked)
        );
        let empty = Summary {
            records: 0,
            files: 1,
            first_seq: None,
            last_seq: None,
            head: None,
            checkpoints: 0,
            checkpoints_checked: false,
            unanchored: 0,
        };
        assert_eq!(
            audit_ok_text(&empty),
            "ok: 0 records in 1 file\ncheckpoints: 0 found, NOT checked (their MACs take the tenant's root \
             key: add --config KEKD_TOML --tenant NAME); no record is anchored\n"
        );
        assert_eq!(
            audit_ok_json(&empty),
            "{\"ok\":true,\"records\":0,\"files\":1,\"first_seq\":null,\"last_seq\":null,\"head\":null,\"last\":null,\
             \"checkpoints\":0,\"checkpoints_checked\":false,\"unanchored\":0}\n"
        );
        let broken = Broken {
            file: "acme/2026-11-23.jsonl".into(),
            line: 7,
            seq: Some(7),
            problem: "edited: its hash does not match its contents".into(),
        };
        assert_eq!(
            audit_broken_json(&broken),
            "{\"ok\":false,\"file\":\"acme/2026-11-23.jsonl\",\"line\":7,\"seq\":7,\
             \"problem\":\"edited: its hash does not match its contents\"}\n"
        );
    }
}
