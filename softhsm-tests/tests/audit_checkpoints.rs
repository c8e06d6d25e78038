//! Audit checkpoints anchored in the root key (issue 21, point 3): the hash chain alone can
//! be rewritten whole by anyone who can write the audit directory, so every
//! `audit.checkpoint_interval`, and at a clean shutdown, the worker appends a checkpoint
//! whose MAC (under a key sealed by the tenant's root key, `audit.kek`) names the chain's
//! head. `kekctl audit verify --config kekd.toml --tenant NAME` checks those MACs with the
//! root key; plain `kekctl audit verify` says it did not.
//!
//! Each test owns its daemon, token (or swtpm) and directories. kekd is stopped before a
//! verify with `--config` opens the tenant's root key: a swtpm serves one client at a time.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use softhsm_tests::{exit, is_root, Backend, Kekctl, Kekd, Output, Tenant, TestUser};

const WAIT: Duration = Duration::from_secs(15);

fn start(interval: &str, tenant: Tenant) -> Kekd {
    Kekd::builder().tenant(tenant).audit(&format!("checkpoint_interval = \"{interval}\"")).start()
}

fn checkpoints(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["event"] == "checkpoint").collect()
}

fn seq(r: &Value) -> u64 {
    r["seq"].as_u64().unwrap_or_else(|| panic!("a record without seq: {r}"))
}

/// Waits for a checkpoint written after the record `after` (its seq).
#[track_caller]
fn wait_checkpoint_after(kekd: &Kekd, after: u64) -> Value {
    kekd.wait_audit("acme", WAIT, |r| r["event"] == "checkpoint" && seq(r) > after)
}

/// The seq of the tenant's newest record.
fn head(kekd: &Kekd) -> u64 {
    seq(kekd.audit_records("acme").last().expect("records"))
}

/// Each checkpoint names the record right before it, by seq and hash, with a 32-byte MAC.
#[track_caller]
fn assert_checkpoints_name_the_record_before_them(records: &[Value]) {
    for (i, r) in records.iter().enumerate().filter(|(_, r)| r["event"] == "checkpoint") {
        assert!(i > 0, "a checkpoint cannot come first: {r}");
        let before = &records[i - 1];
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(r["detail"]["seq"], before["seq"], "{r}");
        assert_eq!(r["detail"]["hash"], before["hash"], "{r}");
        let mac = r["detail"]["mac"].as_str().unwrap_or_else(|| panic!("no mac: {r}"));
        assert!(mac.len() == 64 && mac.bytes().all(|b| b.is_ascii_hexdigit()), "{r}");
    }
}

/// `kekctl audit verify FILES`.
fn verify(files: &[PathBuf]) -> Output {
    Kekctl::new().args(["audit", "verify"]).args(files).run()
}

/// `kekctl audit verify --config kekd.toml --tenant acme [FILES]`: no files, the tenant's
/// whole trail from `audit.dir`.
fn verify_anchored(kekd: &Kekd, files: &[PathBuf]) -> Output {
    let config = kekd.config_path().expect("run mode");
    Kekctl::new().tenant("acme").args(["audit", "verify", "--config"]).arg(config).args(files).run()
}

fn verify_anchored_json(kekd: &Kekd, files: &[PathBuf]) -> Value {
    let config = kekd.config_path().expect("run mode");
    Kekctl::new()
        .tenant("acme")
        .json()
        .args(["audit", "verify", "--config"])
        .arg(config)
        .args(files)
        .run()
        .json()
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Every line of the tenant's trail, oldest first.
fn trail_lines(kekd: &Kekd) -> Vec<String> {
    let mut lines = Vec::new();
    for f in kekd.audit_files("acme") {
        lines.extend(fs::read_to_string(&f).unwrap().lines().map(str::to_owned));
    }
    lines
}

/// Writes `lines` as one day file in a fresh directory under the test's.
fn write_trail(kekd: &Kekd, name: &str, lines: &[String]) -> PathBuf {
    let dir = kekd.dir().join(name);
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("2026-11-23.jsonl");
    fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    path
}

/// `,"hash":"` + 64 hex + `"}`: what a line ends with (docs/FORMATS.md §5).
const HASH_SUFFIX: usize = 75;

/// What a forger who can write the audit files does: edits line `at` with `edit`, then
/// recomputes the `prev` and `hash` of it and of every later record, so that the chain is
/// whole again. With `fix_checkpoints`, a checkpoint's `detail.hash` is also made to name the
/// rewritten record before it (its MAC, made with a key the forger does not have, stays).
fn rewrite(lines: &[String], at: usize, edit: impl Fn(&str) -> String, fix_checkpoints: bool) -> Vec<String> {
    let mut out = lines[..at].to_vec();
    let mut prev: Option<(String, String)> = None; // (old hash, new hash) of the line before
    for (i, line) in lines.iter().enumerate().skip(at) {
        let body = &line[..line.len() - HASH_SUFFIX];
        let (members, old_prev) = body.split_at(body.len() - 65);
        let old_prev = &old_prev[..64];
        let mut members = if i == at { edit(members) } else { members.to_owned() };
        let new_prev = match &prev {
            Some((old, new)) => {
                assert_eq!(old, old_prev, "line {i} does not chain to the one before it");
                if fix_checkpoints && members.contains("\"event\":\"checkpoint\"") {
                    members = members.replace(&format!("\"hash\":\"{old}\""), &format!("\"hash\":\"{new}\""));
                }
                new.clone()
            }
            None => old_prev.to_owned(),
        };
        let new_body = format!("{members}{new_prev}\"");
        let hash = sha256_hex(format!("{new_body}}}").as_bytes());
        let old_hash = line[line.len() - 66..line.len() - 2].to_owned();
        out.push(format!("{new_body},\"hash\":\"{hash}\"}}"));
        prev = Some((old_hash, hash));
    }
    out
}

#[test]
fn checkpoints_are_made_every_interval_and_verify_with_the_root_key() {
    let mut kekd = start("1s", Tenant::owned_by_me("acme"));
    let (_, edek) = kekd.generate("default", &[]);
    let first = wait_checkpoint_after(&kekd, 0);
    kekd.unwrap(&edek, &[]).ok();
    kekd.unwrap(&edek, &[]).ok();
    let second = wait_checkpoint_after(&kekd, seq(&first));
    assert!(seq(&second) > seq(&first) + 2, "{first} {second}");
    assert!(kekd.stop_with(Signal::SIGTERM).success(), "{}", kekd.stderr());

    let records = kekd.audit_records("acme");
    assert_checkpoints_name_the_record_before_them(&records);
    assert_eq!(records.last().unwrap()["event"], "checkpoint", "the trail ends anchored: {records:#?}");
    let found = checkpoints(&records).len();
    assert!(found >= 2, "{records:#?}");

    // The key is sealed by the root key like a KEK, under a name no key can have.
    let path = kekd.dir().join("state/tenants/acme/audit.kek");
    let record: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        (&record["format"], &record["tenant"], &record["key"], &record["version"]),
        (&1.into(), &"acme".into(), &"@audit".into(), &1.into()),
        "{record}"
    );
    assert!(record["sealed"].as_str().is_some_and(|s| !s.is_empty()), "{record}");
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // Without the root key, the checkpoints are counted, and said not to be checked.
    let files = kekd.audit_files("acme");
    let plain = verify(&files).ok_str().to_owned();
    assert!(plain.contains(&format!("checkpoints: {found} found, NOT checked")), "{plain}");
    let plain = Kekctl::new().json().args(["audit", "verify"]).args(&files).run().json();
    assert_eq!(
        (plain["checkpoints"].as_u64(), &plain["checkpoints_checked"]),
        (Some(found as u64), &false.into())
    );

    // With it, every MAC is checked; no files given: the whole trail from audit.dir.
    let text = verify_anchored(&kekd, &[]).ok_str().to_owned();
    assert!(text.contains(&format!("checkpoints: {found} checked")), "{text}");
    assert!(text.contains(&format!("{} records", records.len())), "{text}");
    let json = verify_anchored_json(&kekd, &files);
    assert_eq!(json["checkpoints"].as_u64(), Some(found as u64), "{json}");
    assert_eq!(json["checkpoints_checked"], true, "{json}");
    assert_eq!(json["unanchored"], 0, "{json}");
}

#[test]
fn a_clean_shutdown_anchors_the_trail_and_a_trail_cut_after_its_last_checkpoint_still_verifies() {
    let mut kekd = start("1h", Tenant::owned_by_me("acme"));
    let (_, edek) = kekd.generate("default", &[]);
    kekd.unwrap(&edek, &[]).ok();
    assert!(checkpoints(&kekd.audit_records("acme")).is_empty(), "none within the hour");
    assert!(kekd.stop_with(Signal::SIGTERM).success(), "{}", kekd.stderr());
    let records = kekd.audit_records("acme");
    assert_eq!(checkpoints(&records).len(), 1, "{records:#?}");
    assert_eq!(records.last().unwrap()["event"], "checkpoint", "{records:#?}");
    assert_checkpoints_name_the_record_before_them(&records);
    let anchored = records.len();

    // Records after it, and no clean shutdown: they are not anchored, and verify says how many.
    kekd.start();
    for _ in 0..3 {
        kekd.unwrap(&edek, &[]).ok();
    }
    kekd.kill();
    let after = kekd.audit_records("acme").len() - anchored;
    assert!(after >= 5, "a start, hellos and unwraps: {after}");
    let json = verify_anchored_json(&kekd, &[]);
    assert_eq!(
        (json["checkpoints"].as_u64(), json["unanchored"].as_u64()),
        (Some(1), Some(after as u64)),
        "{json}"
    );
    let text = verify_anchored(&kekd, &[]).ok_str().to_owned();
    assert!(text.contains(&format!("{after} records after the last checkpoint")), "{text}");

    // Records cut off after the last checkpoint go unnoticed, as the document says: the
    // count of unanchored records is what tells how much could have been.
    let lines = trail_lines(&kekd);
    let cut = write_trail(&kekd, "cut", &lines[..lines.len() - 2]);
    let json = verify_anchored_json(&kekd, std::slice::from_ref(&cut));
    assert_eq!(
        (json["checkpoints"].as_u64(), json["unanchored"].as_u64()),
        (Some(1), Some(after as u64 - 2)),
        "{json}"
    );
    let at_checkpoint = write_trail(&kekd, "at-checkpoint", &lines[..anchored]);
    let json = verify_anchored_json(&kekd, std::slice::from_ref(&at_checkpoint));
    assert_eq!((json["checkpoints"].as_u64(), json["unanchored"].as_u64()), (Some(1), Some(0)), "{json}");
}

#[test]
fn a_consistently_rewritten_chain_fails_at_the_first_checkpoint_after_the_edit() {
    let mut kekd = start("1s", Tenant::owned_by_me("acme"));
    let (_, edek) = kekd.generate("default", &[]);
    let first = wait_checkpoint_after(&kekd, 0);
    kekd.unwrap(&edek, &[]).ok();
    let unwrapped = head(&kekd);
    let second = wait_checkpoint_after(&kekd, unwrapped);
    assert!(kekd.stop_with(Signal::SIGTERM).success(), "{}", kekd.stderr());
    let lines = trail_lines(&kekd);
    let line_of =
        |seq: u64| lines.iter().position(|l| l.ends_with_seq(seq)).expect("the record is in the trail");
    let generated = lines.iter().position(|l| l.contains("\"event\":\"generate\"")).unwrap();
    let unwrap_at = line_of(unwrapped);
    assert!(generated < line_of(seq(&first)) && line_of(seq(&first)) < unwrap_at, "{lines:#?}");
    // The genuine trail verifies, both ways.
    let genuine = write_trail(&kekd, "genuine", &lines);
    verify(std::slice::from_ref(&genuine)).ok();
    verify_anchored(&kekd, std::slice::from_ref(&genuine)).ok();

    let deny = |members: &str| members.replace("\"outcome\":\"ok\"", "\"outcome\":\"error\"");
    // (edited line, first checkpoint after it), naive and careful forgers alike.
    for (edited, checkpoint) in [(generated, seq(&first)), (unwrap_at, seq(&second))] {
        for fix in [false, true] {
            let forged = rewrite(&lines, edited, deny, fix);
            assert_ne!(forged[edited], lines[edited]);
            let path = write_trail(&kekd, &format!("forged-{edited}-{fix}"), &forged);
            // The unkeyed chain cannot tell.
            verify(std::slice::from_ref(&path)).ok();
            // The checkpoint can.
            let out = verify_anchored(&kekd, std::slice::from_ref(&path));
            assert_eq!(out.code, exit::AUDIT_BROKEN, "{out:?}");
            let at = format!("{}:{}: record seq {checkpoint}:", path.display(), line_of(checkpoint) + 1);
            assert!(out.stderr.contains(&at), "expected the failure at {at}, got: {}", out.stderr);
            assert!(out.stderr.contains("checkpoint"), "{}", out.stderr);
            let why = if fix { "MAC" } else { "names" };
            assert!(out.stderr.contains(why), "{}", out.stderr);
        }
    }
}

#[test]
fn checkpoints_made_before_a_root_rotation_verify_once_the_old_root_key_is_gone() {
    let mut kekd = start("1s", Tenant::owned_by_me("acme").backend(Backend::SoftHsm));
    let (_, edek) = kekd.generate("default", &[]);
    let first = wait_checkpoint_after(&kekd, 0);
    let path = kekd.dir().join("state/tenants/acme/audit.kek");
    let before: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert!(before.get("root_key").is_none(), "{before}");

    kekd.kekctl().args(["root", "rotate", "--label", "acme-root-2"]).run().ok();
    let after: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(after["root_key"], "acme-root-2", "rewrapped like a KEK record: {after}");
    assert_ne!(after["sealed"], before["sealed"]);
    kekd.unwrap(&edek, &[]).ok();
    wait_checkpoint_after(&kekd, head(&kekd));
    assert!(kekd.stop_with(Signal::SIGTERM).success(), "{}", kekd.stderr());
    let found = checkpoints(&kekd.audit_records("acme")).len();
    assert!(found >= 2 && seq(&first) > 0);

    // The root key that sealed the key first is gone; every checkpoint still verifies.
    kekd.delete_token_key("acme", &kekd.root_key_label("acme"));
    let text = verify_anchored(&kekd, &[]).ok_str().to_owned();
    assert!(text.contains(&format!("checkpoints: {found} checked")), "{text}");
}

/// A worker running as the tenant's own user makes its checkpoint key after it dropped
/// root, in the directory that user owns; kekctl, as root, reads it by descriptor and
/// refuses a link the user plants there instead of following it.
#[test]
fn a_worker_as_its_own_user_anchors_its_trail_and_kekctl_follows_no_planted_link() {
    if !is_root() {
        eprintln!("SKIPPED (needs root): a worker that starts as root and runs as a user of its own");
        return;
    }
    let user = TestUser::create("ckpt");
    let tenant = Tenant::owned_by_me("acme").run_as(&user.name).backend(Backend::SoftHsm);
    let mut kekd = Kekd::builder().tenant(tenant).audit("checkpoint_interval = \"1s\"").prepare();
    kekd.first_start_as_root();
    kekd.hand_token_to(&user);
    // What the first start (as root) anchored, if it got to (a SIGTERM that comes before
    // the worker's handler kills it), goes: the key is made anew, by the user.
    let key = kekd.dir().join("state/tenants/acme/audit.kek");
    let _ = fs::remove_file(&key);
    for f in kekd.audit_files("acme") {
        fs::remove_file(f).unwrap();
    }
    kekd.start();
    kekd.generate("default", &[]);
    wait_checkpoint_after(&kekd, head(&kekd));
    assert!(kekd.stop_with(Signal::SIGTERM).success(), "{}", kekd.stderr());
    {
        use std::os::unix::fs::MetadataExt as _;
        let meta = fs::symlink_metadata(&key).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (user.uid, 0o600), "made by the worker as its user");
    }
    verify_anchored(&kekd, &[]).ok();

    // The tenant's user swaps the key for a link to a file only root may read.
    let secret = kekd.dir().join("root-only");
    fs::write(&secret, "root's own\n").unwrap();
    let setpriv = |argv: &[&str]| {
        let out = std::process::Command::new("setpriv")
            .args([format!("--reuid={}", user.uid), format!("--regid={}", user.gid), "--clear-groups".into()])
            .args(argv)
            .output()
            .unwrap();
        assert!(out.status.success(), "{argv:?}: {out:?}");
    };
    let (key_s, secret_s) = (key.to_str().unwrap(), secret.to_str().unwrap());
    setpriv(&["mv", key_s, &format!("{key_s}.moved")]);
    setpriv(&["ln", "-s", secret_s, key_s]);
    let out = verify_anchored(&kekd, &[]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("audit.kek") && out.stderr.contains("link"), "{}", out.stderr);
    assert!(!out.stderr.contains("root's own"), "{}", out.stderr);
}

/// While the root key cannot be reached, no checkpoint is made (a warning says so once, not
/// at every interval), requests are served, and checkpoints resume once it answers.
#[test]
fn while_the_root_key_is_unreachable_requests_are_served_and_checkpoints_wait() {
    let mut kekd = start("2s", Tenant::owned_by_me("acme").behind_outage_switch());
    // Before the first interval ends (2 s after the worker opened its trail, a moment before
    // it was ready): the key was never unsealed.
    kekd.cut_token("acme");
    const WARNING: &str = "cannot get the audit checkpoint key from the root key";
    kekd.wait_for_log(WARNING, WAIT);
    for _ in 0..3 {
        kekd.kekctl().arg("status").run().ok();
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert_eq!(kekd.stderr().matches(WARNING).count(), 1, "once per outage:\n{}", kekd.stderr());
    assert!(checkpoints(&kekd.audit_records("acme")).is_empty());

    kekd.restore_token("acme");
    let served = head(&kekd);
    wait_checkpoint_after(&kekd, served);
    kekd.wait_for_log("checkpoints resume", WAIT);
    assert!(kekd.stop_with(Signal::SIGTERM).success(), "{}", kekd.stderr());
    assert_checkpoints_name_the_record_before_them(&kekd.audit_records("acme"));
    let json = verify_anchored_json(&kekd, &[]);
    assert_eq!(
        (json["checkpoints_checked"].as_bool(), json["unanchored"].as_u64()),
        (Some(true), Some(0)),
        "{json}"
    );
}

/// A line ends with `,"seq":N,"prev":"…","hash":"…"}`.
trait EndsWithSeq {
    fn ends_with_seq(&self, seq: u64) -> bool;
}

impl EndsWithSeq for String {
    fn ends_with_seq(&self, seq: u64) -> bool {
        let body = &self[..self.len() - HASH_SUFFIX];
        body[..body.len() - 65].ends_with(&format!(",\"seq\":{seq},\"prev\":\""))
    }
}
