//! `kekd dev --dir DIR`, the embedded default (issue 2, point 7): a throwaway SoftHSM2 token
//! with its own SOFTHSM2_CONF inside DIR, tenant `demo` for the calling user, the ready
//! line, and nothing written outside DIR.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use nix::sys::signal::Signal;
use softhsm_tests::{kekd_command, parse_edek, Kekctl, Kekd};

/// Every file and directory under `dir`, relative to it.
fn tree(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(dir).expect("under dir").display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    out
}

const SYSTEM_TOKENS: &str = "/var/lib/softhsm/tokens";

#[test]
fn dev_mode_serves_demo_and_keeps_everything_under_dir() {
    let system_tokens_before = tree(Path::new(SYSTEM_TOKENS));
    let mut kekd = Kekd::dev();
    kekd.start();
    let dir = kekd.dev_dir().expect("dev mode").to_path_buf();
    assert_eq!(kekd.socket(), dir.join("kekd.sock"), "the ready line names DIR/kekd.sock");

    // The calling user is demo's user and admin.
    let (plaintext, edek) = kekd.generate("default", &[("app", "walkthrough")]);
    assert_eq!(kekd.unwrap(&edek, &[("app", "walkthrough")]).ok(), &plaintext[..]);
    let edek = kekd.wrap("default", b"dev secret", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"dev secret");
    assert_eq!(kekd.key("default").active_version, 1);
    kekd.kekctl().arg("status").run().ok();
    // With KEKD_SOCKET and KEKD_TENANT, as the README's walk-through does it.
    Kekctl::new().env("KEKD_SOCKET", kekd.socket()).env("KEKD_TENANT", "demo").arg("status").run().ok();

    // Its own token, config and key store, all in DIR.
    let tokens = tree(&dir.join("softhsm/tokens"));
    assert!(!tokens.is_empty(), "no token files under {}/softhsm/tokens", dir.display());
    assert!(dir.join("kekd.toml").is_file(), "DIR/kekd.toml was not written");
    assert!(dir.join("state").is_dir(), "DIR/state was not created");
    let unwraps = kekd.audit_records("demo").into_iter().filter(|r| r["event"] == "unwrap").count();
    assert_eq!(unwraps, 2, "the audit trail is DIR/audit/demo and has both unwraps");
    let check = kekd_command(["check-config", "--config", dir.join("kekd.toml").to_str().unwrap()]);
    assert!(check.ok_str().contains("config OK"), "the config dev mode wrote does not check: {check:?}");

    // Nothing outside DIR: the fake HOME and TMPDIR stay empty, the system token directory
    // unchanged.
    for outside in ["outside/home", "outside/tmp"] {
        let written = tree(&kekd.dir().join(outside));
        assert!(written.is_empty(), "kekd dev wrote outside DIR, into ${outside}: {written:?}");
    }
    assert_eq!(tree(Path::new(SYSTEM_TOKENS)), system_tokens_before, "kekd dev touched {SYSTEM_TOKENS}");

    // Ctrl-C stops it cleanly.
    let status = kekd.stop_with(Signal::SIGINT);
    assert!(status.success(), "kekd dev should exit 0 on SIGINT, got {status}; stderr:\n{}", kekd.stderr());
    assert_eq!(parse_edek(&edek).key, "default");
}

#[test]
fn dev_mode_reuses_its_token_and_keys() {
    let mut kekd = Kekd::dev();
    kekd.start();
    let dir = kekd.dev_dir().expect("dev mode").to_path_buf();
    kekd.keys(["create", "notes"]).ok();
    kekd.keys(["rotate", "default"]).ok();
    let v1 = kekd.wrap("notes", b"kept across runs", &[("n", "1")]);
    let v2 = kekd.wrap("default", b"v2 across runs", &[]);
    let tokens = tree(&dir.join("softhsm/tokens"));
    let keys = kekd.list_keys();

    kekd.restart_after_kill();
    assert_eq!(kekd.list_keys(), keys, "the second run sees the same keys");
    assert_eq!(kekd.unwrap(&v1, &[("n", "1")]).ok(), b"kept across runs");
    assert_eq!(kekd.unwrap(&v2, &[]).ok(), b"v2 across runs");
    // SoftHSM2 keeps one directory per token: the second run adds none.
    let top_level = |t: BTreeSet<String>| -> BTreeSet<String> {
        t.into_iter().filter(|p| Path::new(p).components().count() == 1).collect()
    };
    let after = top_level(tree(&dir.join("softhsm/tokens")));
    let before = top_level(tokens);
    assert_eq!(before.len(), 1, "one token directory: {before:?}");
    assert_eq!(after, before, "the second run must reuse the token, not create another");
}

#[test]
fn dev_mode_without_dir_uses_a_temporary_directory_removed_on_exit() {
    let mut kekd = Kekd::dev_without_dir();
    kekd.start();
    let tmp = kekd.dir().join("outside/tmp");
    assert!(
        kekd.socket().starts_with(&tmp),
        "without --dir, kekd dev should work in a directory under $TMPDIR ({}), not {}",
        tmp.display(),
        kekd.socket().display()
    );
    let edek = kekd.wrap("default", b"temporary", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"temporary");

    let status = kekd.stop_with(Signal::SIGINT);
    assert!(status.success(), "kekd dev should exit 0 on SIGINT, got {status}; stderr:\n{}", kekd.stderr());
    let left = tree(&tmp);
    assert!(left.is_empty(), "kekd dev left its temporary directory behind: {left:?}");
}
