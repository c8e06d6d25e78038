//! kryoptic: a second real PKCS#11 token, for what SoftHSM 2.6.1 cannot do (RSA-OAEP with
//! SHA-256, which BYOK imports want).
//!
//! kryoptic (<https://github.com/latchset/kryoptic>, Apache-2.0) is a software token in Rust
//! on top of OpenSSL. It is not packaged by Debian 12, so `softhsm-tests/kryoptic/` is a
//! small crate (its own workspace and Cargo.lock, kryoptic-lib pinned) that builds it as the
//! module `libkryoptic_pkcs11.so`. [`kryoptic_module`] builds it on first use, once per
//! target directory: `cargo build --release --locked` into `<target>/kryoptic/`, under a file
//! lock so that parallel test processes wait for one build instead of racing (about a minute
//! cold; `./scripts/test` runs the same build before the tests, where its time shows). It needs
//! libssl-dev, libsqlite3-dev, pkg-config and libclang-dev (`./scripts/install-deps`). A test
//! that needs it and cannot build it fails, with the build's output: it is never skipped.
//! `KEKD_TEST_KRYOPTIC_MODULE` names an already built module instead.
//!
//! A kryoptic token lives in one sqlite file, named by `KRYOPTIC_CONF` (created when missing),
//! which the module reads once, at `C_Initialize`. Each token of a test is a file of its own
//! under the test's directory ([`Kryoptic`]), and a tenant on it gets `module_env = {
//! KRYOPTIC_CONF = … }` in its config: each kekd worker is its own process, so each loads the
//! module with its own tenant's token. PINs must be 8 characters or more.
//!
//! What the BYOK code relies on, as measured with kryoptic 1.5.4: `C_UnwrapKey` with
//! `CKM_RSA_PKCS_OAEP` (SHA-256 or SHA-1, MGF1 of the same) into a non-extractable AES key,
//! `CKM_AES_KEY_WRAP_KWP` (0x210B) but not `CKM_AES_KEY_WRAP_PAD` (0x210A, SoftHSM2's) nor
//! `CKM_RSA_AES_KEY_WRAP`, and ~117 `CKO_MECHANISM` objects on every token, so that an
//! object search must name its `CKA_CLASS`.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use nix::fcntl::{Flock, FlockArg};

/// The kryoptic PKCS#11 module, built if needed (module documentation). Panics, with the
/// reason and the build's output, when it can be neither found nor built.
pub fn kryoptic_module() -> PathBuf {
    static MODULE: OnceLock<PathBuf> = OnceLock::new();
    MODULE.get_or_init(find_or_build).clone()
}

fn find_or_build() -> PathBuf {
    if let Some(module) = std::env::var_os("KEKD_TEST_KRYOPTIC_MODULE") {
        let module = PathBuf::from(module);
        assert!(module.is_file(), "KEKD_TEST_KRYOPTIC_MODULE={}: no such file", module.display());
        return module;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("kryoptic/Cargo.toml");
    let target_dir = target_dir().join("kryoptic");
    fs::create_dir_all(&target_dir).unwrap_or_else(|e| panic!("create {}: {e}", target_dir.display()));
    let lock_path = target_dir.join("build.lock");
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("open {}: {e}", lock_path.display()));
    // Held until the end of this function: one build at a time, the others wait for it.
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("lock {}: {e}", lock_path.display()));

    // Always run: a no-op in well under a second once built, and a rebuild when the crate
    // or its lock file changed.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--locked", "--quiet", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .stdin(Stdio::null());
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {} to build the kryoptic test token: {e}", Path::new(&cargo).display())
    });
    assert!(
        out.status.success(),
        "building the kryoptic test token failed ({}): `{cmd:?}`\n{}{}\n\
         It needs libssl-dev, libsqlite3-dev, pkg-config and libclang-dev: run ./scripts/install-deps",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let module = target_dir.join("release/libkryoptic_pkcs11.so");
    assert!(module.is_file(), "the kryoptic build succeeded but left no {}", module.display());
    module
}

/// The target directory the test executable was built in: `<target>` of
/// `<target>/<profile>/deps/<test>`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let mut dir = exe.parent().expect("the test executable has a parent directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.pop(); // the profile directory
    dir
}

/// One kryoptic token: the sqlite file `KRYOPTIC_CONF` names.
#[derive(Debug, Clone)]
pub struct Kryoptic {
    conf: PathBuf,
}

impl Kryoptic {
    /// The token stored in `dir/<label>.sql` (not created until [`Kryoptic::init_token`]).
    pub fn at(dir: &Path, label: &str) -> Self {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Self { conf: dir.join(format!("{label}.sql")) }
    }

    /// What to set `KRYOPTIC_CONF` to.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// A command for `program` with this token as its kryoptic token.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("KRYOPTIC_CONF", &self.conf).stdin(Stdio::null());
        cmd
    }

    /// Initialises the token and its user PIN, with pkcs11-tool (opensc).
    pub fn init_token(&self, label: &str, so_pin: &str, pin: &str) {
        let module = kryoptic_module();
        let steps: [&[&str]; 2] = [
            &["--init-token", "--label", label, "--so-pin", so_pin],
            &[
                "--token-label",
                label,
                "--login",
                "--login-type",
                "so",
                "--so-pin",
                so_pin,
                "--init-pin",
                "--pin",
                pin,
            ],
        ];
        for args in steps {
            let mut cmd = self.command("pkcs11-tool");
            cmd.arg("--module").arg(&module).args(args);
            let out = cmd.output().unwrap_or_else(|e| {
                panic!("cannot run pkcs11-tool ({e}): run ./scripts/install-deps (opensc)")
            });
            assert!(
                out.status.success(),
                "pkcs11-tool {args:?} on the kryoptic token {} failed: {}\n{}",
                self.conf.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
