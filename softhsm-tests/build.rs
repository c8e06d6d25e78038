//! Builds `pkcs11_outage.so`, the PKCS#11 fault-injection proxy of `outage/pkcs11_outage.c`,
//! into `OUT_DIR`, and tells the fixture where it is (`KEKD_OUTAGE_SO`, read with `env!`).
//!
//! It needs gcc (`$CC` overrides) and the PKCS#11 header of p11-kit (Debian: libp11-kit-dev).

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "outage/pkcs11_outage.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let source = manifest_dir.join(SOURCE);
    let so = out_dir.join("pkcs11_outage.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());

    let mut cmd = Command::new(&cc);
    cmd.args(["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"])
        .args(p11_kit_cflags())
        .arg("-o")
        .arg(&so)
        .arg(&source)
        .args(["-ldl", "-lpthread"]);
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cc} to build {SOURCE} ({e}): install gcc (./scripts/install-deps)")
    });
    if !out.status.success() {
        panic!(
            "{cc} failed to build {} ({}):\n{}{}\n(the PKCS#11 header comes from libp11-kit-dev)",
            so.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("cargo:rustc-env=KEKD_OUTAGE_SO={}", so.display());
}

/// The include flags for `<p11-kit/pkcs11.h>`: pkg-config's, else Debian's usual directory.
fn p11_kit_cflags() -> Vec<String> {
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    if let Ok(out) = Command::new("pkg-config").args(["--cflags", "p11-kit-1"]).output() {
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect();
        }
    }
    let fallback = Path::new("/usr/include/p11-kit-1");
    if !fallback.join("p11-kit/pkcs11.h").is_file() {
        panic!(
            "the PKCS#11 header <p11-kit/pkcs11.h> was not found (neither `pkg-config --cflags p11-kit-1` \
             nor {}): install libp11-kit-dev",
            fallback.display()
        );
    }
    vec![format!("-I{}", fallback.display())]
}
