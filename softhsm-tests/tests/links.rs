//! A tenant's `run_as` user owns its key store and audit directories, and kekd works in
//! them as root each time the worker starts (before it drops privileges). These tests play
//! that user: they plant symbolic and hard links at every path kekd touches there, pointing
//! at root's files, kill the worker and let it restart, and check that nothing outside the
//! tenant's directories was created, changed, chowned or removed, and that kekd named each
//! planted path when it refused it.
//!
//! The user cannot make a hard link to a file it does not own while the kernel protects
//! hard links (`fs.protected_hardlinks = 1`, Debian's default), so root plants those on its
//! behalf: a machine with the protection off lets the user do it. Root plants the link in
//! the token lock directory too, which is root's alone: kekd must refuse it all the same.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use softhsm_tests::*;

/// What a file outside the tenant's directories looks like: everything but its link count
/// and ctime, which planting a hard link to it changes.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    content: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
}

fn snapshot(path: &Path) -> Option<Snapshot> {
    let meta = fs::symlink_metadata(path).ok()?;
    Some(Snapshot {
        content: if meta.is_file() { fs::read(path).unwrap() } else { Vec::new() },
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
    })
}

/// Root's files, in a directory only root can write, that the planted links point at.
struct Precious {
    dir: PathBuf,
    before: BTreeMap<PathBuf, Option<Snapshot>>,
}

impl Precious {
    fn new(base: &Path) -> Precious {
        let dir = base.join("root-only");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(dir.join("keys")).unwrap();
        for (name, content, mode) in [
            // No trailing newline: an audit "recovery" would cut it back to nothing.
            ("no-newline.conf", &b"root's configuration, no newline at the end"[..], 0o644),
            ("shadow", b"root:$y$j9T$secret:19000:0:99999:7:::\n", 0o600),
            ("record.kek", b"{\"format\":1}\n", 0o600),
            ("keys/v0000000001.kek", b"not yours\n", 0o600),
            ("hard-kek", b"zero me if you can\n", 0o600),
            ("hard-tmp", b"temporary? no\n", 0o600),
            ("hard-chown", b"chown me if you can\n", 0o600),
            ("hard-day", b"{\"seq\":1}\nhalf a line", 0o644),
        ] {
            let p = dir.join(name);
            fs::write(&p, content).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
        let mut before = BTreeMap::new();
        let mut all = vec![dir.clone(), dir.join("keys")];
        for d in [dir.clone(), dir.join("keys")] {
            for e in fs::read_dir(d).unwrap() {
                all.push(e.unwrap().path());
            }
        }
        // Names that must never come to exist.
        all.push(dir.join("created-by-audit"));
        all.push(dir.join("created-by-lock"));
        for p in all {
            before.insert(p.clone(), snapshot(&p));
        }
        Precious { dir, before }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    #[track_caller]
    fn assert_untouched(&self) {
        for (path, before) in &self.before {
            assert_eq!(&snapshot(path), before, "{} changed", path.display());
        }
        let names: Vec<_> = fs::read_dir(&self.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 8, "files appeared among root's: {names:?}");
    }
}

/// Runs `argv` as `user` (its uid, gid and no other groups); panics on failure.
#[track_caller]
fn as_user(user: &TestUser, argv: &[&str]) {
    as_ids(user.uid, user.gid, &user.name, argv)
}

#[track_caller]
fn as_ids(uid: u32, gid: u32, name: &str, argv: &[&str]) {
    let out = Command::new("setpriv")
        .args([format!("--reuid={uid}"), format!("--regid={gid}"), "--clear-groups".into()])
        .args(argv)
        .output()
        .expect("run setpriv");
    assert!(out.status.success(), "{argv:?} as {name}: {out:?}");
}

/// A tenant `acme` served by a worker running as `user`, with a key, an EDEK of it, and
/// audit records written.
fn tenant_run_as(user: &TestUser) -> (Kekd, Vec<u8>, Vec<u8>) {
    let mut kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme").run_as(&user.name).backend(Backend::SoftHsm))
        .prepare();
    kekd.first_start_as_root();
    kekd.hand_token_to(user);
    kekd.start();
    let (plain, edek) = kekd.generate("default", &[]);
    (kekd, plain, edek)
}

#[test]
fn links_planted_by_a_tenants_user_are_refused_by_name_and_followed_nowhere() {
    if !is_root() {
        eprintln!("SKIPPED (needs root): a worker that starts as root and runs as a user of its own");
        return;
    }
    let user = TestUser::create("links");
    let (mut kekd, plain, edek) = tenant_run_as(&user);
    let precious = Precious::new(kekd.dir());
    let state = kekd.dir().join("state/tenants/acme");
    let keys = state.join("keys");
    let default_dir = keys.join(hex("default"));
    let audit = kekd.audit_dir("acme");
    let today = kekd.audit_files("acme").pop().expect("acme has an audit file");
    let lock = fs::read_dir(kekd.dir().join("state/locks"))
        .unwrap()
        .next()
        .expect("a token lock file")
        .unwrap()
        .path();

    // What the tenant's user plants, each in its own way: one at a time, so that each is
    // refused (or, before the fix, followed) on its own.
    let plants: Vec<(PathBuf, Box<dyn Fn()>)> = vec![
        // Today's audit file, moved away and replaced by a dangling link to a file root
        // would create and chown.
        (today.clone(), {
            let (user, today, audit, target) =
                (&user, today.clone(), audit.clone(), precious.path("created-by-audit"));
            Box::new(move || {
                as_user(user, &["mv", &s(&today), &s(&audit.join("moved-away"))]);
                as_user(user, &["ln", "-s", &s(&target), &s(&today)]);
            })
        }),
        // An older day file whose last line has no newline: a link to root's file, which
        // recovery would cut back to its last newline.
        user_link(&user, &precious.path("no-newline.conf"), &audit.join("2020-01-01.jsonl")),
        // A key whose creation "did not complete" (no key.json), whose record is a link:
        // root would overwrite the target with zeros.
        user_link_in_new_dir(&user, &precious.path("record.kek"), &keys.join(hex("half")), "v0000000001.kek"),
        // A key directory that is a link to root's directory of records.
        user_link(&user, &precious.path("keys"), &keys.join(hex("linked"))),
        // root.json, read as root to choose the root key.
        user_link(&user, &precious.path("shadow"), &state.join("root.json")),
        // A temporary file of an atomic write, a link to root's secrets.
        user_link(&user, &precious.path("shadow"), &default_dir.join(".tmp-0a0b0c0d0e0f-key.json")),
        // Hard links (planted by root, see the module doc): a key record of an unfinished
        // key, a temporary file, a file anywhere in the tree (chowned to the user when root
        // hands the tree over), an audit day file.
        root_hard_link(&precious.path("hard-kek"), &keys.join(hex("half-two")), Some("v0000000001.kek")),
        root_hard_link(
            &precious.path("hard-tmp"),
            &default_dir.join(".tmp-000000000000-v0000000001.json"),
            None,
        ),
        root_hard_link(&precious.path("hard-chown"), &state.join("notes"), None),
        root_hard_link(&precious.path("hard-day"), &audit.join("2020-01-02.jsonl"), None),
        // The token lock, in root's own directory: a dangling link.
        (lock.clone(), {
            let (lock, target) = (lock.clone(), precious.path("created-by-lock"));
            Box::new(move || {
                fs::remove_file(&lock).unwrap();
                symlink(&target, &lock).unwrap();
            })
        }),
    ];

    // Asked before the first plant: with today's audit file swapped for a link, the running
    // worker refuses to write there too, and withholds every answer (status included).
    let pid = kekd.worker_pid("acme");
    for (i, (path, plant)) in plants.iter().enumerate() {
        plant();
        let log = if i == 0 {
            // The first: kill the worker and let the supervisor restart it.
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
            let log = kekd.wait_for_log(path.to_str().unwrap(), Duration::from_secs(20));
            kekd.kill();
            log
        } else {
            // The rest: kekd starting over.
            kekd.try_start().expect_err(&format!("kekd started with {} planted", path.display())).stderr
        };
        precious.assert_untouched();
        let named = log
            .lines()
            .find(|l| l.contains(path.to_str().unwrap()))
            .unwrap_or_else(|| panic!("kekd refused to start without naming {}:\n{log}", path.display()));
        assert!(named.contains("link"), "the refusal does not say what is wrong: {named}");
        remove_plant(path);
    }

    // With the plants gone, acme serves again, as its user, what it served before.
    kekd.start();
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
    precious.assert_untouched();
    for path in [&state, &audit] {
        assert_eq!(fs::metadata(path).unwrap().uid(), user.uid, "{} is the user's", path.display());
    }
}

/// SoftHSM2 opens its token's lock files with O_CREAT|O_TRUNC at every start and login,
/// and the token directory belongs to the tenant's user: links the user plants there must
/// lead the worker (root while it opens the token) nowhere the user could not go itself.
#[test]
fn links_among_the_token_files_lead_root_nowhere() {
    if !is_root() {
        eprintln!("SKIPPED (needs root): a worker that starts as root and runs as a user of its own");
        return;
    }
    let user = TestUser::create("token");
    let (mut kekd, plain, edek) = tenant_run_as(&user);
    let precious = Precious::new(kekd.dir());
    let tokens = kekd.softhsm().unwrap().token_dir().to_path_buf();
    let token =
        fs::read_dir(&tokens).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).expect("a token");
    let mut planted = Vec::new();
    for entry in fs::read_dir(&token).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "lock") {
            planted.push(path);
        }
    }
    assert!(!planted.is_empty(), "SoftHSM2 keeps lock files in {}", token.display());
    // One lock file (token.lock) becomes a dangling link into root's directory, the others
    // links to root's files, which a truncating open would empty.
    for (i, lock) in planted.iter().enumerate() {
        as_user(&user, &["rm", &s(lock)]);
        let target = if i == 0 { precious.path("created-by-lock") } else { precious.path("no-newline.conf") };
        as_user(&user, &["ln", "-s", &s(&target), &s(lock)]);
    }

    let pid = kekd.worker_pid("acme");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    // The new worker opens the token (and SoftHSM2 its lock files) as it starts, whether or
    // not it then serves.
    let restarted =
        |k: &Kekd| k.stderr().matches("worker ready").count() >= 2 || k.stderr().contains("could not start");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !restarted(&kekd) {
        assert!(std::time::Instant::now() < deadline, "the worker was not restarted:\n{}", kekd.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    precious.assert_untouched();

    // The operator takes the links away; acme serves again.
    kekd.kill();
    for lock in &planted {
        fs::remove_file(lock).unwrap();
    }
    kekd.start();
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
    precious.assert_untouched();
}

type Plant = (PathBuf, Box<dyn Fn()>);

/// The user makes `link`, a symbolic link to `target`.
fn user_link(user: &TestUser, target: &Path, link: &Path) -> Plant {
    let (uid, gid, name) = (user.uid, user.gid, user.name.clone());
    let (target, path) = (target.to_owned(), link.to_owned());
    (link.to_owned(), Box::new(move || as_ids(uid, gid, &name, &["ln", "-s", &s(&target), &s(&path)])))
}

/// The user makes the directory `dir` and in it `name`, a symbolic link to `target`.
fn user_link_in_new_dir(user: &TestUser, target: &Path, dir: &Path, name: &str) -> Plant {
    let (uid, gid, uname) = (user.uid, user.gid, user.name.clone());
    let (target, dir2, link) = (target.to_owned(), dir.to_owned(), dir.join(name));
    (
        dir.join(name),
        Box::new(move || {
            as_ids(uid, gid, &uname, &["mkdir", &s(&dir2)]);
            as_ids(uid, gid, &uname, &["ln", "-s", &s(&target), &s(&link)]);
        }),
    )
}

/// Root makes `at` (or `at/name`, making the directory `at` first) a hard link to `original`.
fn root_hard_link(original: &Path, at: &Path, name: Option<&str>) -> Plant {
    let (original, at2, name2) = (original.to_owned(), at.to_owned(), name.map(str::to_owned));
    let link = name.map_or_else(|| at.to_owned(), |n| at.join(n));
    (
        link,
        Box::new(move || {
            let link = match &name2 {
                Some(n) => {
                    fs::create_dir(&at2).unwrap();
                    at2.join(n)
                }
                None => at2.clone(),
            };
            fs::hard_link(&original, &link)
                .unwrap_or_else(|e| panic!("ln {} {}: {e}", original.display(), link.display()));
        }),
    )
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// A key's directory name: its name in hex.
fn hex(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Takes a plant away as an operator would: the link goes, and a directory made for it
/// goes too when it is left empty.
fn remove_plant(path: &Path) {
    fs::remove_file(path).unwrap_or_else(|e| panic!("rm {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        if parent.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n == hex("half") || n == hex("half-two")
        }) {
            let _ = fs::remove_dir(parent);
        }
    }
}
