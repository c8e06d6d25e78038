//! The socket's directory (issue 19, point 7): root never makes its socket where another
//! user could plant or swap names. kekd refuses to start, naming the path, when the
//! socket's directory is writable by a user other than root (owned by one, or open to
//! everyone even with the sticky bit); in a safe directory it binds without a moment where
//! the path names a file of other permissions, replacing a stale socket file.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use softhsm_tests::{is_root, Kekd, Tenant, TestUser};

/// A daemon whose configured socket is `socket`, not started.
fn kekd_with_socket(socket: &Path) -> Kekd {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    let text = kekd.config_text();
    let first = text.lines().next().expect("a config line");
    assert!(first.starts_with("socket = "), "the socket is the first setting: {first}");
    kekd.write_config_text(&text.replacen(first, &format!("socket = {:?}", socket.display().to_string()), 1));
    kekd
}

/// Starting must fail, naming the directory and the socket, and leave nothing in the
/// directory.
#[track_caller]
fn assert_refused(mut kekd: Kekd, dir: &Path, socket: &Path, says: &str) {
    let failure = kekd.try_start().expect_err("kekd must not make its socket in a user-writable directory");
    assert!(failure.status.is_some_and(|s| !s.success()), "{failure}");
    for named in [dir, socket] {
        assert!(
            failure.stderr.contains(&named.display().to_string()),
            "{} is not named: {failure}",
            named.display()
        );
    }
    assert!(failure.stderr.contains(says), "{says:?} is not said: {failure}");
    let left: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "kekd left {left:?} in the refused directory");
}

#[test]
fn a_socket_directory_owned_by_another_user_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED: making a user needs root");
        return;
    }
    let mallory = TestUser::create("sockdir");
    let holder = softhsm_tests::test_dir();
    let dir = holder.path().join("mallory");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    nix::unistd::chown(&dir, Some(mallory.uid.into()), Some(mallory.gid.into())).unwrap();
    let socket = dir.join("kekd.sock");
    assert_refused(kekd_with_socket(&socket), &dir, &socket, &format!("owned by uid {}", mallory.uid));
}

#[test]
fn a_world_writable_socket_directory_is_refused_even_sticky() {
    let holder = softhsm_tests::test_dir();
    for (name, mode, says) in [("open", 0o777, "writable by every user"), ("sticky", 0o1777, "sticky")] {
        let dir = holder.path().join(name);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
        let socket = dir.join("kekd.sock");
        assert_refused(kekd_with_socket(&socket), &dir, &socket, says);
    }
}

/// Below a directory others can write (here: a sticky one) the socket's own directory is
/// safe only if it is root's: the sticky bit keeps others from swapping it.
#[test]
fn a_directory_under_a_world_writable_one_is_refused_unless_sticky() {
    let holder = softhsm_tests::test_dir();
    let open = holder.path().join("open");
    fs::create_dir_all(open.join("run")).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let socket = open.join("run/kekd.sock");
    assert_refused(kekd_with_socket(&socket), &open.join("run"), &socket, "above the socket's directory");
    // The tests' own sockets live in root's 0755 directories under the sticky /tmp:
    // every other test in this suite starts that way.
}

/// In a safe directory a stale socket file (a crashed kekd's) is replaced, the socket is
/// bound at its path with the configured mode, and a clean stop removes it.
#[test]
fn a_stale_socket_is_replaced_and_the_socket_has_its_mode() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    let socket = kekd.socket().to_path_buf();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(fs::symlink_metadata(&socket).unwrap().file_type().is_socket(), "a stale socket file");
    kekd.write_config_text(&kekd.config_text().replacen("log_level", "socket_mode = \"0660\"\nlog_level", 1));
    kekd.start();
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    // Bound at its own path, not moved there: that is the address `ss -xl` shows.
    softhsm_tests::unix_socket_inode(&socket);
    let left: Vec<_> = fs::read_dir(socket.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "kekd left {left:?} next to its socket");
    let edek = kekd.wrap("default", b"served", &[]);
    assert!(!edek.is_empty());
    assert!(kekd.stop_with(Signal::SIGTERM).success());
    assert!(!socket.exists(), "a clean stop removes the socket");
}
