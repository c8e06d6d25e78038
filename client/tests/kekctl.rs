//! kekctl's scripting contract (raw stdin/stdout, JSON shapes, exit codes) against a toy
//! daemon. The toy "EDEK" is a readable header plus the plaintext XORed with 0xAA: it
//! checks plumbing, not cryptography; the real daemon is tested in softhsm-tests.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kekd_proto::frame::write_frame;
use kekd_proto::{
    pb, Code, Context, EdekItem, ErrorStatus, FrameReader, HelloOk, ItemOk, ItemResult, KeyInfo, KeyName, Op,
    Reply, Request, Response, Secret, StatusInfo, TargetState, TenantName, VersionInfo, VersionState,
    DEFAULT_MAX_FRAME, MAX_SECRET_LEN, PROTOCOL_VERSION,
};
use serde_json::Value;
use tokio::net::UnixListener;

const TENANT: &str = "acme";

type Keys = Arc<Mutex<BTreeMap<KeyName, KeyInfo>>>;

/// A toy daemon on its own thread, serving until the test process ends.
struct Toy {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    /// How many more `Hello`s to refuse.
    refusals: Arc<AtomicUsize>,
}

impl Toy {
    fn start() -> Toy {
        let refusals = Arc::new(AtomicUsize::new(0));
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kekd.sock");
        let std_listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let mut keys = BTreeMap::new();
        let default = KeyName::parse("default").unwrap();
        keys.insert(default.clone(), key_info(default, 1));
        let keys: Keys = Arc::new(Mutex::new(keys));
        let refused = Arc::clone(&refusals);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = UnixListener::from_std(std_listener).unwrap();
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    tokio::spawn(serve(stream, Arc::clone(&keys), Arc::clone(&refused)));
                }
            });
        });
        Toy { _dir: dir, socket, refusals }
    }

    /// Makes the tenant's worker restart: the next `hellos` connections are refused with
    /// UNAVAILABLE, as the supervisor does until the worker is back.
    fn restart(&self, hellos: usize) {
        self.refusals.store(hellos, Ordering::SeqCst);
    }

    fn kekctl(&self, args: &[&str], stdin: &[u8]) -> Output {
        kekctl(&self.socket, args, stdin)
    }
}

fn kekctl(socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kekctl"))
        .env_remove("KEKD_TENANT")
        .env("KEKD_SOCKET", socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn key_info(name: KeyName, active: u32) -> KeyInfo {
    let versions = (1..=active)
        .map(|v| VersionInfo {
            version: v,
            state: if v == active { VersionState::Active } else { VersionState::DecryptOnly },
            created_unix: 1_700_000_000 + u64::from(v),
        })
        .collect();
    KeyInfo { name, active_version: active, versions, min_decrypt_version: 0, keep_versions: 0 }
}

async fn serve(stream: tokio::net::UnixStream, keys: Keys, refusals: Arc<AtomicUsize>) {
    let (r, mut w) = stream.into_split();
    let mut r = FrameReader::new(r, DEFAULT_MAX_FRAME);
    while let Ok(Some(msg)) = r.read::<pb::Request>().await {
        let req = Request::try_from(msg).unwrap();
        let restarting = matches!(req.op, Op::Hello(_))
            && refusals.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        let result = if restarting {
            Err(ErrorStatus::new(Code::Unavailable, format!("tenant {TENANT} is restarting")))
        } else {
            handle(req.op, &keys)
        };
        let rejected = req.id == 1 && result.is_err();
        write_frame(&mut w, &pb::Response::from(Response { id: req.id, result })).await.unwrap();
        if rejected {
            return;
        }
    }
}

fn handle(op: Op, keys: &Keys) -> Result<Reply, ErrorStatus> {
    let mut keys = keys.lock().unwrap();
    let not_found = |k: &KeyName| ErrorStatus::new(Code::NotFound, format!("no key {k}"));
    let active = |keys: &BTreeMap<KeyName, KeyInfo>, k: &KeyName| {
        keys.get(k).map(|i| i.active_version).ok_or_else(|| not_found(k))
    };
    Ok(match op {
        Op::Hello(h) if h.tenant.as_str() == TENANT => {
            Reply::Hello(HelloOk { protocol_version: PROTOCOL_VERSION, tenant: h.tenant, admin: true })
        }
        Op::Hello(h) => {
            return Err(ErrorStatus::new(Code::PermissionDenied, format!("not tenant {}", h.tenant)))
        }
        Op::Generate { key, edek_only, contexts } => {
            let version = active(&keys, &key)?;
            Reply::Batch(
                contexts
                    .iter()
                    .enumerate()
                    .map(|(i, ctx)| {
                        let dek = vec![i as u8 + 1; 32];
                        let edek = seal(&key, version, ctx, &dek);
                        Ok(ItemOk {
                            plaintext: (!edek_only).then(|| Secret::from_vec(dek)),
                            edek: Some(edek),
                            key: key.clone(),
                            version,
                        })
                    })
                    .collect(),
            )
        }
        Op::Wrap { key, items } => {
            let version = active(&keys, &key)?;
            Reply::Batch(
                items
                    .into_iter()
                    .map(|it| {
                        let edek = seal(&key, version, &it.context, it.plaintext.expose());
                        Ok(ItemOk { plaintext: None, edek: Some(edek), key: key.clone(), version })
                    })
                    .collect(),
            )
        }
        Op::Unwrap(items) => Reply::Batch(items.into_iter().map(open).collect()),
        Op::Rewrap(items) => Reply::Batch(
            items
                .into_iter()
                .map(|it| {
                    let context = it.context.clone();
                    let ok = open(it)?;
                    let version = active(&keys, &ok.key)?;
                    let edek = seal(&ok.key, version, &context, ok.plaintext.unwrap().expose());
                    Ok(ItemOk { plaintext: None, edek: Some(edek), key: ok.key, version })
                })
                .collect(),
        ),
        Op::Status => Reply::Status(StatusInfo {
            tenant: TenantName::parse(TENANT).unwrap(),
            backend: "toy".into(),
            backend_healthy: true,
            backend_error: String::new(),
            cached_keks: 1,
            keys: keys.len() as u32,
            uptime_seconds: 61,
            memory_locked: true,
            worker_pid: 4242,
            lease: "online".into(),
            root_key_exceptions: Vec::new(),
            key_versions: Vec::new(),
            operations: Vec::new(),
            errors: Vec::new(),
        }),
        Op::CreateKey(k) if keys.contains_key(&k) => {
            return Err(ErrorStatus::new(Code::FailedPrecondition, format!("key {k} exists")))
        }
        Op::CreateKey(k) => Reply::Key(keys.entry(k.clone()).or_insert(key_info(k, 1)).clone()),
        Op::RotateKey(k) => {
            let next = active(&keys, &k)? + 1;
            let mut info = key_info(k.clone(), next);
            // Keep states set earlier.
            for (new, old) in info.versions.iter_mut().zip(&keys[&k].versions) {
                if old.state != VersionState::Active {
                    new.state = old.state;
                }
            }
            keys.insert(k, info.clone());
            Reply::Key(info)
        }
        Op::SetVersionState { key, version, state } => {
            let info = keys.get_mut(&key).ok_or_else(|| not_found(&key))?;
            let is_active = version == info.active_version;
            let v = info.versions.iter_mut().find(|v| v.version == version).ok_or_else(|| not_found(&key))?;
            v.state = match state {
                TargetState::DecryptOnly if is_active => VersionState::Active,
                TargetState::DecryptOnly => VersionState::DecryptOnly,
                TargetState::Disabled => VersionState::Disabled,
                TargetState::Destroyed => VersionState::Destroyed,
            };
            Reply::Key(info.clone())
        }
        Op::ListKeys => Reply::Keys(keys.values().cloned().collect()),
        Op::SetKeyPolicy { key, min_decrypt_version, keep_versions } => {
            let info = keys.get_mut(&key).ok_or_else(|| not_found(&key))?;
            info.min_decrypt_version = min_decrypt_version.unwrap_or(info.min_decrypt_version);
            info.keep_versions = keep_versions.unwrap_or(info.keep_versions);
            Reply::Key(info.clone())
        }
        Op::RotateRoot { label } => Reply::RootRotated {
            active: label.unwrap_or_else(|| "toy-root-2".into()),
            rewrapped: keys.len() as u32,
        },
        Op::RootImportKey { .. } | Op::RootImport { .. } => {
            return Err(ErrorStatus::new(Code::FailedPrecondition, "the toy daemon imports nothing"))
        }
        Op::DestroyTenant { .. } => {
            let versions = keys.values().map(|k| k.versions.len() as u32).sum();
            let n = keys.len() as u32;
            keys.clear();
            Reply::TenantDestroyed { keys: n, versions_shredded: versions }
        }
    })
}

fn header(key: &KeyName, version: u32, ctx: &Context) -> Vec<u8> {
    let mut h = b"TOY".to_vec();
    h.push(key.as_str().len() as u8);
    h.extend_from_slice(key.as_str().as_bytes());
    h.extend_from_slice(&version.to_be_bytes());
    let mut c = Vec::new();
    ctx.encode_canonical(&mut c);
    h.extend_from_slice(&(c.len() as u16).to_be_bytes());
    h.extend_from_slice(&c);
    h
}

fn seal(key: &KeyName, version: u32, ctx: &Context, plaintext: &[u8]) -> Vec<u8> {
    let mut edek = header(key, version, ctx);
    edek.extend(plaintext.iter().map(|b| b ^ 0xaa));
    edek
}

fn open(it: EdekItem) -> ItemResult {
    let invalid = || ErrorStatus::new(Code::DataInvalid, "invalid data");
    let e = &it.edek;
    let n = *e.get(3).ok_or_else(invalid)? as usize;
    let key =
        KeyName::parse(std::str::from_utf8(e.get(4..4 + n).ok_or_else(invalid)?).map_err(|_| invalid())?)
            .map_err(|_| invalid())?;
    let version = u32::from_be_bytes(e.get(4 + n..8 + n).ok_or_else(invalid)?.try_into().unwrap());
    let h = header(&key, version, &it.context);
    if !e.starts_with(&h) {
        return Err(invalid());
    }
    let plaintext = e[h.len()..].iter().map(|b| b ^ 0xaa).collect();
    Ok(ItemOk { plaintext: Some(Secret::from_vec(plaintext)), edek: None, key, version })
}

fn ok(out: &Output) -> &[u8] {
    assert!(out.status.success(), "kekctl failed: {:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    &out.stdout
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(ok(out)).unwrap()
}

fn fails(out: &Output, code: i32, code_name: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout after an error");
    let prefix = format!("kekctl: {code_name}: ");
    assert!(stderr.starts_with(&prefix), "expected {prefix:?}, got {stderr:?}");
}

fn b64(v: &Value) -> Vec<u8> {
    STANDARD.decode(v.as_str().expect("a base64 string")).unwrap()
}

#[test]
fn wrap_and_unwrap_raw_bytes_with_context() {
    let toy = Toy::start();
    let secret = b"\x00binary\nsecret\xff".to_vec();
    let t = ["--tenant", TENANT];
    let wrapped =
        toy.kekctl(&[&t[..], &["wrap", "--key", "default", "--context", "app=x"]].concat(), &secret);
    let edek = ok(&wrapped).to_vec();
    assert!(edek.starts_with(b"TOY"));

    let unwrapped = toy.kekctl(&["unwrap", "--tenant", TENANT, "--context", "app=x"], &edek);
    assert_eq!(ok(&unwrapped), &secret[..]);

    // The context is part of the EDEK's identity.
    fails(&toy.kekctl(&["unwrap", "--tenant", TENANT], &edek), 7, "DATA_INVALID");

    let v = json(&toy.kekctl(&["--json", "--tenant", TENANT, "--context", "app=x", "unwrap"], &edek));
    assert_eq!(b64(&v["plaintext"]), secret);
    assert_eq!((v["key"].as_str(), v["version"].as_u64()), (Some("default"), Some(1)));
    assert!(v.get("edek").is_none());

    let v = json(&toy.kekctl(&["--json", "--tenant", TENANT, "wrap", "--key", "default"], &secret));
    assert!(v.get("plaintext").is_none());
    assert_eq!((v["key"].as_str(), v["version"].as_u64()), (Some("default"), Some(1)));
    let edek = b64(&v["edek"]);

    ok(&toy.kekctl(&["keys", "rotate", "default", "--tenant", TENANT], b""));
    let rewrapped = ok(&toy.kekctl(&["rewrap", "--tenant", TENANT], &edek)).to_vec();
    let v = json(&toy.kekctl(&["unwrap", "--tenant", TENANT, "--json"], &rewrapped));
    assert_eq!((b64(&v["plaintext"]), v["version"].as_u64()), (secret.clone(), Some(2)));
    let v = json(&toy.kekctl(&["rewrap", "--tenant", TENANT, "--json"], &edek));
    assert_eq!(v["version"].as_u64(), Some(2));
    assert!(v.get("plaintext").is_none());
}

#[test]
fn generate_outputs() {
    let toy = Toy::start();
    let v = json(&toy.kekctl(&["generate", "--key", "default", "--json", "--tenant", TENANT], b""));
    assert_eq!(b64(&v["plaintext"]).len(), 32);
    let edek = b64(&v["edek"]);
    let unwrapped = toy.kekctl(&["unwrap", "--tenant", TENANT], &edek);
    assert_eq!(ok(&unwrapped), b64(&v["plaintext"]));

    let v = json(
        &toy.kekctl(&["generate", "--key", "default", "--json", "--count", "3", "--tenant", TENANT], b""),
    );
    let items = v.as_array().expect("an array for --count > 1");
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|it| b64(&it["plaintext"]).len() == 32 && it["edek"].is_string()));

    let v = json(
        &toy.kekctl(&["generate", "--key", "default", "--edek-only", "--json", "--tenant", TENANT], b""),
    );
    assert!(v.get("plaintext").is_none() && v["edek"].is_string());

    let text = toy.kekctl(&["generate", "--key", "default", "--tenant", TENANT], b"");
    let text = String::from_utf8(ok(&text).to_vec()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(STANDARD.decode(lines[0].strip_prefix("plaintext: ").unwrap()).unwrap().len(), 32);
    assert!(STANDARD.decode(lines[1].strip_prefix("edek: ").unwrap()).is_ok());

    let text = toy.kekctl(&["generate", "--key", "default", "--edek-only", "--tenant", TENANT], b"");
    assert!(String::from_utf8(ok(&text).to_vec()).unwrap().starts_with("edek: "));
}

#[test]
fn keys_lifecycle() {
    let toy = Toy::start();
    let t = |args: &[&str]| toy.kekctl(&[args, &["--tenant", TENANT, "--json"]].concat(), b"");
    let v = json(&t(&["keys", "create", "billing/invoices"]));
    assert_eq!(v["name"], "billing/invoices");
    assert_eq!(v["active_version"], 1);
    assert_eq!(v["versions"][0]["state"], "active");
    assert!(v["versions"][0]["created_unix"].is_u64());

    fails(&t(&["keys", "create", "billing/invoices"]), 6, "FAILED_PRECONDITION");

    let v = json(&t(&["keys", "rotate", "billing/invoices"]));
    assert_eq!(v["active_version"], 2);
    assert_eq!(v["versions"][0]["state"], "decrypt-only");
    let v = json(&t(&["keys", "disable", "billing/invoices", "--version", "1"]));
    assert_eq!(v["versions"][0]["state"], "disabled");
    let v = json(&t(&["keys", "enable", "billing/invoices", "--version", "1"]));
    assert_eq!(v["versions"][0]["state"], "decrypt-only");
    let v = json(&t(&["keys", "destroy", "billing/invoices", "--version", "1"]));
    assert_eq!(v["versions"][0]["state"], "destroyed");

    let v = json(&t(&["keys", "list"]));
    let names: Vec<&str> = v.as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["billing/invoices", "default"]);

    let table = toy.kekctl(&["keys", "list", "--tenant", TENANT], b"");
    let table = String::from_utf8(ok(&table).to_vec()).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("1:destroyed 2:active"), "{table}");
}

#[test]
fn status_text_and_json() {
    let toy = Toy::start();
    let text = toy.kekctl(&["status", "--tenant", TENANT], b"");
    let text = String::from_utf8(ok(&text).to_vec()).unwrap();
    for line in [
        "tenant: acme",
        "backend: toy",
        "health: ok",
        "cached KEKs: 1",
        "uptime: 1m 1s",
        "memory locked: yes",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in {text}");
    }
    let v = json(&toy.kekctl(&["status", "--tenant", TENANT, "--json"], b""));
    assert_eq!((v["tenant"].as_str(), v["backend_healthy"].as_bool()), (Some(TENANT), Some(true)));
    assert_eq!(v["uptime_seconds"], 61);
}

/// `status --tenants`: one connection per tenant, each shown in the order given; one that
/// cannot be asked is shown with its error, and the exit status is that error's.
#[test]
fn status_of_several_tenants() {
    let toy = Toy::start();
    let v = json(&toy.kekctl(&["status", "--tenants", TENANT, "--json"], b""));
    assert_eq!(v.as_array().map(Vec::len), Some(1), "--tenants gives an array, even of one: {v}");
    assert_eq!(v[0]["tenant"], TENANT);

    let out = toy.kekctl(&["status", "--tenants", &format!("{TENANT},other"), "--json"], b"");
    assert_eq!(out.status.code(), Some(4), "PERMISSION_DENIED for other");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&v[0]["tenant"], &v[0]["worker_pid"]), (&TENANT.into(), &4242.into()));
    assert_eq!((&v[1]["tenant"], &v[1]["error"]["code"]), (&"other".into(), &"PERMISSION_DENIED".into()));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("kekctl: PERMISSION_DENIED: "));

    let out = toy.kekctl(&["status", "--tenants", &format!("other,{TENANT}")], b"");
    assert_eq!(out.status.code(), Some(4));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("tenant: other\nerror: PERMISSION_DENIED: "), "{text}");
    assert!(text.contains("\n\ntenant: acme\nworker pid: 4242\n"), "{text}");

    let out = toy.kekctl(&["status", "--tenants", &format!("{TENANT},{TENANT}")], b"");
    assert_eq!(out.status.code(), Some(2), "a tenant given twice is a usage error");
}

#[test]
fn errors_and_exit_codes() {
    let toy = Toy::start();
    fails(&toy.kekctl(&["wrap", "--key", "nope", "--tenant", TENANT], b"x"), 5, "NOT_FOUND");
    fails(&toy.kekctl(&["status", "--tenant", "other"], b""), 4, "PERMISSION_DENIED");
    fails(&toy.kekctl(&["wrap", "--key", "default", "--tenant", TENANT], b""), 3, "INVALID_ARGUMENT");
    let big = vec![1u8; MAX_SECRET_LEN + 1];
    fails(&toy.kekctl(&["wrap", "--key", "default", "--tenant", TENANT], &big), 3, "INVALID_ARGUMENT");
    fails(&toy.kekctl(&["unwrap", "--tenant", TENANT], b"garbage"), 7, "DATA_INVALID");

    let dir = tempfile::tempdir().unwrap();
    fails(&kekctl(&dir.path().join("none.sock"), &["status", "--tenant", TENANT], b""), 8, "UNAVAILABLE");

    // Usage errors: clap's exit status 2.
    assert_eq!(toy.kekctl(&["status"], b"").status.code(), Some(2), "tenant is required");
    let out = toy.kekctl(&["status", "--tenant", TENANT, "--context", "novalue"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--context"));
    assert_eq!(toy.kekctl(&["audit", "verify", "--tenant", TENANT], b"").status.code(), Some(2));
}

#[test]
fn commands_wait_for_a_restarting_worker() {
    let toy = Toy::start();
    toy.restart(3);
    assert_eq!(json(&toy.kekctl(&["--json", "status", "--tenant", TENANT], b""))["tenant"], TENANT);
    toy.restart(3);
    let out = toy.kekctl(&["--json", "keys", "create", "restarted", "--tenant", TENANT], b"");
    assert_eq!(json(&out)["name"], "restarted");
    assert_eq!(toy.refusals.load(Ordering::SeqCst), 0, "every refusal was met");
}

#[test]
fn a_worker_that_stays_down_is_unavailable_after_bounded_retries() {
    let toy = Toy::start();
    toy.restart(usize::MAX);
    let start = Instant::now();
    let out = toy.kekctl(&["status", "--tenant", TENANT], b"");
    fails(&out, 8, "UNAVAILABLE");
    assert!(String::from_utf8_lossy(&out.stderr).contains("tenant acme is restarting"));
    assert!(start.elapsed() < Duration::from_secs(10), "gave up only after {:?}", start.elapsed());
}

#[test]
fn tenant_from_the_environment() {
    let toy = Toy::start();
    let out = Command::new(env!("CARGO_BIN_EXE_kekctl"))
        .env("KEKD_SOCKET", &toy.socket)
        .env("KEKD_TENANT", TENANT)
        .args(["--json", "status"])
        .output()
        .unwrap();
    assert_eq!(json(&out)["tenant"], TENANT);
}
