//! `kekd dev`: the embedded default. A throwaway SoftHSM2 token (or, with `--backend tpm`,
//! a swtpm of its own), a tenant `demo` for the calling user, and everything (token or
//! TPM state, key store, socket, config) under one directory, so a first try leaves
//! nothing behind elsewhere on the machine.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::keystore::write_atomic;
use crate::softhsm::dev_token;
use crate::swtpm::Swtpm;
use crate::StartError;

/// The root-key backend of `kekd dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DevBackend {
    Softhsm,
    Tpm,
}

pub fn run(dir: Option<PathBuf>, backend: DevBackend) -> Result<(), StartError> {
    crate::init_logging("info");
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| StartError::Io { what, source }
    };
    // Without --dir, a temporary directory that is removed when kekd exits.
    let (dir, _temp) = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d).map_err(io("cannot create the dev directory"))?;
            (d, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("kekd-dev-")
                .tempdir()
                .map_err(io("cannot create a temporary directory"))?;
            (t.path().to_owned(), Some(t))
        }
    };
    let dir = dir.canonicalize().map_err(io("cannot resolve the dev directory"))?;
    // Kept until the supervisor returns: dropping it stops the TPM.
    let mut _swtpm = None;
    let root = match backend {
        DevBackend::Softhsm => {
            prepare_token(&dir)?;
            DevRoot::Token(dev_token(&dir))
        }
        DevBackend::Tpm => {
            let swtpm = start_swtpm(&dir)?;
            let tcti = swtpm.tcti();
            _swtpm = Some(swtpm);
            DevRoot::Tpm { tcti }
        }
    };
    let text = dev_config(&dir, &root, &callers());
    write_atomic(&dir, "kekd.toml", text.as_bytes())?;
    let cfg = Config::parse(&text)?;
    eprintln!(
        "kekd dev: directory {dir}\n  export KEKD_SOCKET={sock} KEKD_TENANT=demo\n  \
         then try: kekctl generate --key default --json",
        dir = dir.display(),
        sock = cfg.socket.display()
    );
    crate::supervisor::run(cfg, dir.join("kekd.toml"))
}

/// Runs `kekd dev-token --dir DIR` and waits for it: the token is created by a process
/// of its own, since the supervisor must never load the PKCS#11 module.
fn prepare_token(dir: &Path) -> Result<(), StartError> {
    let status = std::process::Command::new("/proc/self/exe")
        .arg("dev-token")
        .arg("--dir")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|source| StartError::Io { what: "cannot run kekd dev-token".into(), source })?;
    if status.success() {
        Ok(())
    } else {
        // Its own `kekd: ...` line on stderr said why.
        Err(StartError::DevToken(status))
    }
}

/// Starts the dev TPM on `DIR/swtpm`, which keeps its seeds (and so demo's keys) between
/// runs. The TPM worker binary must sit next to kekd: say so now rather than at spawn.
fn start_swtpm(dir: &Path) -> Result<Swtpm, StartError> {
    crate::worker::tpm_worker_path().map_err(|e| StartError::DevTpm(e.to_string()))?;
    let swtpm = Swtpm::start(&dir.join("swtpm")).map_err(|e| {
        StartError::DevTpm(format!(
            "{e} (on Debian: apt-get install swtpm swtpm-tools, or ./scripts/install-deps)"
        ))
    })?;
    tracing::info!(tcti = %swtpm.tcti(), state = %swtpm.state_dir().display(), "swtpm started");
    Ok(swtpm)
}

/// Where demo's root key is.
enum DevRoot {
    Token(crate::softhsm::DevToken),
    Tpm { tcti: String },
}

/// The calling user, and the user behind sudo, may use and administer `demo`.
fn callers() -> Vec<u32> {
    let mut uids = vec![nix::unistd::getuid().as_raw()];
    if let Some(sudo) = std::env::var("SUDO_UID").ok().and_then(|s| s.parse().ok()) {
        if !uids.contains(&sudo) {
            uids.push(sudo);
        }
    }
    uids
}

fn dev_config(dir: &Path, root: &DevRoot, uids: &[u32]) -> String {
    let uids = uids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    let mut s = String::new();
    let q = |p: &Path| toml_str(&p.display().to_string());
    writeln!(
        s,
        "# Written by `kekd dev`; serve it again with `kekd run --config {}`.",
        dir.join("kekd.toml").display()
    )
    .unwrap();
    writeln!(s, "socket = {}", q(&dir.join("kekd.sock"))).unwrap();
    writeln!(s, "state_dir = {}", q(&dir.join("state"))).unwrap();
    writeln!(s, "\n[audit]\ndir = {}", q(&dir.join("audit"))).unwrap();
    writeln!(s, "\n[tenants.demo]\nallow_uids = [{uids}]\nadmin_uids = [{uids}]").unwrap();
    match root {
        DevRoot::Token(token) => {
            writeln!(s, "\n[tenants.demo.pkcs11]").unwrap();
            writeln!(s, "module = {}", q(&token.module)).unwrap();
            writeln!(s, "token_label = {}", toml_str(&token.token_label)).unwrap();
            writeln!(
                s,
                "key_label = \"demo-root\"\npin_file = {}\ncreate_root_key = true",
                q(&token.pin_file)
            )
            .unwrap();
            writeln!(s, "softhsm2_conf = {}", q(&token.conf)).unwrap();
        }
        DevRoot::Tpm { tcti } => {
            writeln!(s, "\n# The swtpm kekd dev started; it listens only while kekd dev runs.").unwrap();
            writeln!(s, "[tenants.demo.tpm]\ntcti = {}", toml_str(tcti)).unwrap();
        }
    }
    s
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => write!(out, "\\u{:04X}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
