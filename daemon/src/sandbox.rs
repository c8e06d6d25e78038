//! The worker's sandbox: what a tenant's process gives up before it serves.
//!
//! DESIGN §3 fixes the order, and each step depends on the one before:
//!
//! 1. [`close_inherited_fds`]: nothing of the supervisor's (listeners, other tenants'
//!    connections) survives into the worker.
//! 2. [`clear_environment`]: the PKCS#11 module and its configuration are passed explicitly;
//!    nothing in the environment may steer the module the worker is about to load.
//! 3. [`no_dumps`]: `PR_SET_DUMPABLE=0` (no core file, no ptrace or `/proc/<pid>/mem` for the
//!    same user) and `RLIMIT_CORE=0`, before any key material exists in the process.
//! 4. The root-key backend is opened (by the worker, not here): this may need root, to read
//!    the PIN file and to lock the token. With `run_as`, the module's own file work (a
//!    SoftHSM2 token in a directory that user owns) is done with that user's file rights
//!    ([`FilesAs`]), so that a link the user planted among the token's files leads root
//!    nowhere the user could not go itself.
//! 5. [`RunAs::enter`]: groups, then gid, then uid (the other order would leave the process
//!    unable to change its groups), so the tenant's code runs without root's rights.
//! 6. [`no_new_privs`]: nothing the worker could exec regains privileges.
//! 7. [`seccomp`]: the system-call filter of its worker kind, on every thread of the
//!    process, once the root key is open (opening it needs calls that serving does not:
//!    loading the module, reading its configuration, logging in as root).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;

use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{Gid, Uid, User};

use crate::config::SeccompMode;

/// Closes every file descriptor above stderr except `keep`, which must be 0 (the control
/// socket arrives as the worker's stdin). Call before anything in the process opens a file.
pub fn close_inherited_fds() -> io::Result<()> {
    // SAFETY: close_range only closes descriptors. It runs first thing in the worker, before
    // any Rust object owns a descriptor above 2 (the control socket is stdin), so no live
    // `OwnedFd`/`File` is invalidated behind its owner's back.
    let rc = unsafe { libc::close_range(3, libc::c_uint::MAX, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes every environment variable. Call while the process has one thread: the C
/// library's environment is not thread-safe.
pub fn clear_environment() {
    let names: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for name in names {
        std::env::remove_var(name);
    }
}

/// No core dumps and no same-user debugging: a dump or `/proc/<pid>/mem` would show KEKs.
pub fn no_dumps() -> io::Result<()> {
    nix::sys::prctl::set_dumpable(false).map_err(io::Error::from)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(io::Error::from)
}

/// Large buffers (at least this) are mapped and unmapped on their own, never carved out
/// of malloc's arenas: glibc's default raises this threshold to the size of any such
/// buffer freed, up to 32 MiB, after which a burst of large answers and audit groups stays
/// in the arenas once freed.
const MMAP_THRESHOLD: i32 = 128 << 10;
/// malloc arenas: glibc makes up to eight per core, one per thread that finds the others
/// busy, and memory freed in one is reused only by threads on it. The worker's threads
/// are its runtime's (one per core) and a few more.
const ARENAS: i32 = 2;

/// Holds malloc to what the worker uses, so that its memory follows what it holds
/// (`limits.max_pending_reply_bytes`). The worker clears its environment, so the
/// `MALLOC_*` variables cannot do this. Call before the runtime starts its threads.
pub fn bound_malloc() {
    // SAFETY: mallopt takes two integers and changes only malloc's tuning; it is called
    // before the runtime's threads start, and malloc serialises it anyway.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Gives the memory malloc holds free back to the system: after a burst (many large
/// answers held at once) glibc keeps the freed memory in its arenas, and the worker would
/// go on holding its peak for good. Costs a walk over the free chunks: call it once a
/// burst is over, not per request.
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointer and touches no live allocation: it returns
    // pages of free chunks to the kernel (madvise MADV_DONTNEED, brk), calls the seccomp
    // policy allows.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `PR_SET_NO_NEW_PRIVS`: set-uid binaries and file capabilities stop working for this
/// process and anything it runs.
pub fn no_new_privs() -> io::Result<()> {
    nix::sys::prctl::set_no_new_privs().map_err(io::Error::from)
}

/// The seccomp policies of `daemon/seccomp/<arch>.json`, compiled by build.rs.
mod policy {
    use seccompiler::sock_filter;

    /// One worker kind's filter, compiled both ways.
    pub(crate) struct Compiled {
        /// Distinct system calls the policy allows.
        pub syscalls: usize,
        /// Kills the process on a call the policy does not list.
        pub enforce: &'static [sock_filter],
        /// Lets such a call through and has the kernel log it.
        pub log: &'static [sock_filter],
    }

    include!(concat!(env!("OUT_DIR"), "/seccomp.rs"));
}

/// Which filter of the policy a worker installs: what its backend needs differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    /// `kekd worker`: a PKCS#11 module loaded in the process.
    Pkcs11,
    /// `kekd-tpm-worker`: libtss2 and a TCTI to the TPM.
    Tpm,
}

/// Installs the worker's seccomp filter on every thread of the process (TSYNC), for good:
/// from here on a call the policy does not list kills the whole process with SIGSYS (or,
/// with [`SeccompMode::Log`], is logged by the kernel and allowed). Needs
/// [`no_new_privs`] first, as an unprivileged process's filter does. Returns how many
/// system calls the policy allows.
pub fn seccomp(kind: WorkerKind, mode: SeccompMode) -> Result<usize, String> {
    if mode == SeccompMode::Off {
        return Ok(0);
    }
    let compiled = match kind {
        WorkerKind::Pkcs11 => policy::PKCS11_WORKER,
        WorkerKind::Tpm => policy::TPM_WORKER,
    };
    let Some(compiled) = compiled else {
        return Err(format!(
            "this build has no seccomp policy for {} (daemon/seccomp/{}.json): set seccomp = \"off\"",
            std::env::consts::ARCH,
            std::env::consts::ARCH
        ));
    };
    let program = if mode == SeccompMode::Log { compiled.log } else { compiled.enforce };
    seccompiler::apply_filter_all_threads(program).map_err(|e| e.to_string())?;
    Ok(compiled.syscalls)
}

/// The user a tenant's worker runs as (`run_as` in the config), resolved from the user
/// database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

impl RunAs {
    /// Looks up a user name, or a numeric uid that has a user entry (its groups come from
    /// the entry). The error names what was not found.
    pub fn resolve(user: &str) -> Result<RunAs, String> {
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(user),
        };
        match found {
            Ok(Some(u)) => Ok(RunAs { name: u.name, uid: u.uid, gid: u.gid }),
            Ok(None) => Err(format!("no user {user:?} in the user database")),
            Err(e) => Err(format!("cannot look up user {user:?}: {e}")),
        }
    }

    /// This user's file rights for the calling thread, until the guard is dropped.
    pub fn files_as(&self) -> io::Result<FilesAs> {
        FilesAs::assume(self.uid, self.gid)
    }

    /// Becomes this user: supplementary groups from the user database, then the gid, then
    /// the uid (real, effective and saved, so nothing can switch back). Leaving root this
    /// way clears every capability.
    pub fn enter(&self) -> io::Result<()> {
        let name = CString::new(self.name.as_str())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name contains NUL"))?;
        nix::unistd::initgroups(&name, self.gid).map_err(io::Error::from)?;
        nix::unistd::setresgid(self.gid, self.gid, self.gid).map_err(io::Error::from)?;
        nix::unistd::setresuid(self.uid, self.uid, self.uid).map_err(io::Error::from)?;
        // A kernel that let setuid succeed without dropping would be a silent escalation.
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok() && !self.uid.is_root() {
            return Err(io::Error::other("could regain root after dropping privileges"));
        }
        Ok(())
    }
}

/// Another user's file-system identity (setfsuid, setfsgid) on the calling thread while the
/// process is still root: every open, create and truncate is checked as if that user did
/// it, and root's file capabilities (CAP_DAC_OVERRIDE, CAP_CHOWN, CAP_FOWNER, ...) are out
/// of the effective set meanwhile (capabilities(7)). Dropped, the thread is root's again.
/// Root's supplementary groups still count; the worker sets the user's own at
/// [`RunAs::enter`].
#[derive(Debug)]
pub struct FilesAs {
    /// The file identity is the thread's: the guard stays on it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl FilesAs {
    pub fn assume(uid: Uid, gid: Gid) -> io::Result<FilesAs> {
        // The group first, while the fsuid is still root's (changing it needs CAP_SETGID).
        nix::unistd::setfsgid(gid);
        nix::unistd::setfsuid(uid);
        // Neither call reports failure; a second call returns what is in force.
        if nix::unistd::setfsuid(uid) != uid || nix::unistd::setfsgid(gid) != gid {
            drop(FilesAs { _thread: std::marker::PhantomData });
            return Err(io::Error::other(format!("cannot take the file rights of uid {uid} gid {gid}")));
        }
        Ok(FilesAs { _thread: std::marker::PhantomData })
    }
}

impl Drop for FilesAs {
    fn drop(&mut self) {
        nix::unistd::setfsuid(nix::unistd::geteuid());
        nix::unistd::setfsgid(nix::unistd::getegid());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn each_worker_kind_has_a_compiled_policy() {
        for compiled in [policy::PKCS11_WORKER, policy::TPM_WORKER] {
            let compiled = compiled.expect("seccomp/x86_64.json is compiled in");
            assert!(compiled.syscalls > 50, "{} system calls", compiled.syscalls);
            assert!(!compiled.enforce.is_empty() && compiled.enforce != compiled.log);
        }
    }

    #[test]
    fn resolves_users_by_name_and_uid() {
        let root = RunAs::resolve("root").unwrap();
        assert_eq!((root.uid.as_raw(), root.gid.as_raw()), (0, 0));
        assert_eq!(RunAs::resolve("0").unwrap().name, "root");
        let e = RunAs::resolve("no-such-user-kekd").unwrap_err();
        assert!(e.contains("no-such-user-kekd"), "{e}");
        assert!(RunAs::resolve("4000000000").is_err());
    }
}
