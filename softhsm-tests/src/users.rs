//! Real, unprivileged users made by a test: `useradd` at the start, `userdel` on drop.
//!
//! The trust tests play an attacker with a local account (a tenant's `run_as` user, or a
//! uid in no tenant's ACL). `nobody` is shared by every test running at once, so each test
//! makes its own users, under names no other test uses, and removes them afterwards.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A user (with a group of its own name) that exists while this value does.
#[derive(Debug)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    /// Makes a new system user without a home directory or login shell. `tag` (a few
    /// lowercase letters) shows in the name, for whoever finds a leftover. Panics unless
    /// the test runs as root.
    #[track_caller]
    pub fn create(tag: &str) -> TestUser {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        assert!(crate::is_root(), "making users needs root");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // At most 32 characters (useradd's limit): kt-TAG-PID-N.
        let tag: String = tag.chars().filter(char::is_ascii_lowercase).take(8).collect();
        let name = format!("kt-{tag}-{}-{n}", std::process::id());
        // useradd takes /etc/passwd's lock and gives up at once when another test holds it.
        let mut tries = 0;
        loop {
            let out = Command::new("useradd")
                .args(["--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin"])
                .arg(&name)
                .output()
                .expect("run useradd");
            if out.status.success() {
                break;
            }
            tries += 1;
            assert!(tries < 100, "useradd {name}: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_millis(50));
        }
        let user = nix::unistd::User::from_name(&name)
            .expect("read the user database")
            .unwrap_or_else(|| panic!("useradd made no user {name}"));
        TestUser { name, uid: user.uid.as_raw(), gid: user.gid.as_raw() }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // Whatever still runs as this user (a client of the test) goes first: userdel
        // refuses a user with processes.
        let _ = Command::new("pkill").args(["-KILL", "-U"]).arg(self.uid.to_string()).status();
        for _ in 0..100 {
            let ok = Command::new("userdel").arg(&self.name).output().is_ok_and(|o| {
                o.status.success() || String::from_utf8_lossy(&o.stderr).contains("does not exist")
            });
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("could not remove the test user {}", self.name);
    }
}
