//! Against a real swtpm, one per test (its own state directory and ports).

use std::process::Command;
use std::time::Instant;

use std::sync::Mutex;

use super::*;
use crate::swtpm::Swtpm;

struct Tpm {
    swtpm: Swtpm,
    _dir: tempfile::TempDir,
}

fn tpm() -> Tpm {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(&dir.path().join("state")).expect("start swtpm (./scripts/install-deps)");
    Tpm { swtpm, _dir: dir }
}

fn config(tpm: &Tpm, pcrs: &[u8], encrypt: bool) -> TpmConfig {
    TpmConfig {
        tcti: tpm.swtpm.tcti(),
        primary_handle: None,
        pcrs: pcrs.to_vec(),
        parameter_encryption: Some(encrypt),
        call_timeout: std::time::Duration::from_secs(5),
    }
}

/// Runs a tpm2-tools command against this TPM; panics with its stderr on failure.
fn tool(tpm: &Tpm, args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("TPM2TOOLS_TCTI", tpm.swtpm.tcti())
        .env("TSS2_LOG", "all+none")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {} ({e}): ./scripts/install-deps installs tpm2-tools", args[0])
        });
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Handles of the transient objects and sessions the TPM holds.
fn leftovers(tpm: &Tpm) -> Vec<String> {
    ["handles-transient", "handles-loaded-session", "handles-saved-session"]
        .iter()
        .flat_map(|cap| {
            tool(tpm, &["tpm2_getcap", cap]).lines().map(|l| format!("{cap} {l}")).collect::<Vec<_>>()
        })
        .collect()
}

fn kek(fill: u8) -> [u8; KEK_LEN] {
    [fill; KEK_LEN]
}

fn unseal(key: &TpmRootKey, aad: &[u8], blob: &[u8]) -> Result<[u8; KEK_LEN], BackendError> {
    let mut out = [0u8; KEK_LEN];
    key.unseal(aad, blob, &mut out).map(|()| out)
}

const AAD: &[u8] = b"kekd/kek/v1 acme default 1";

#[test]
fn tpm_seal_unseal_round_trip_with_and_without_parameter_encryption() {
    let tpm = tpm();
    for encrypt in [false, true] {
        let key = TpmRootKey::open(&config(&tpm, &[], encrypt)).unwrap();
        let blob = key.seal(AAD, &kek(7)).unwrap();
        let parsed = Sealed::parse(&blob).expect("a well-formed blob");
        assert_eq!(parsed.pcr_mask, 0);
        assert!(!blob.windows(KEK_LEN).any(|w| w == kek(7)), "the KEK is in the clear in the blob");
        assert_eq!(unseal(&key, AAD, &blob).unwrap(), kek(7));
        assert!(key.canary().is_ok());
        assert!(key
            .describe()
            .contains(&format!("parameter_encryption={}", if encrypt { "on" } else { "off" })));
    }
    assert_eq!(leftovers(&tpm), Vec::<String>::new());
}

#[test]
fn tpm_wrong_aad_tampered_and_foreign_blobs_are_data_invalid() {
    let tpm = tpm();
    let key = TpmRootKey::open(&config(&tpm, &[], false)).unwrap();
    let blob = key.seal(AAD, &kek(1)).unwrap();
    // Another record's AAD: the blob is genuine but belongs elsewhere.
    assert!(matches!(unseal(&key, b"kekd/kek/v1 acme default 2", &blob), Err(BackendError::DataInvalid)));
    // Every byte of the private part, and the format byte, flipped in turn.
    let parsed = Sealed::parse(&blob).unwrap();
    let private_at = blob.len() - parsed.private.len();
    for i in (private_at..blob.len()).step_by(7).chain([0, blob.len() - 1]) {
        let mut bad = blob.clone();
        bad[i] ^= 0x40;
        let r = unseal(&key, AAD, &bad);
        assert!(matches!(r, Err(BackendError::DataInvalid)), "byte {i} flipped: {:?}", r.map(|_| ()));
    }
    assert!(matches!(unseal(&key, AAD, b"not a blob"), Err(BackendError::DataInvalid)));
    // Still serving after all that, and nothing left loaded.
    assert_eq!(unseal(&key, AAD, &blob).unwrap(), kek(1));
    assert_eq!(leftovers(&tpm), Vec::<String>::new());
}

#[test]
fn tpm_pcr_policy_refuses_once_the_pcr_is_extended() {
    let tpm = tpm();
    let key = TpmRootKey::open(&config(&tpm, &[16], true)).unwrap();
    let blob = key.seal(AAD, &kek(2)).unwrap();
    assert_eq!(Sealed::parse(&blob).unwrap().pcr_mask, 1 << 16);
    assert_eq!(unseal(&key, AAD, &blob).unwrap(), kek(2));
    assert!(key.canary().is_ok());

    tool(&tpm, &["tpm2_pcrextend", &format!("16:sha256={}", "ab".repeat(32))]);
    let err = unseal(&key, AAD, &blob).unwrap_err();
    assert!(matches!(err, BackendError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("PCR policy") && err.to_string().contains("sha256:16"), "{err}");
    let err = key.canary().unwrap_err();
    assert!(matches!(err, BackendError::Refused(_)) && err.to_string().contains("PCR policy"), "{err}");
    assert_eq!(leftovers(&tpm), Vec::<String>::new());

    // A reset brings PCR 16 back to zeros: the policy is satisfied again.
    let mut tpm = tpm;
    tpm.swtpm.restart().unwrap();
    assert_eq!(unseal(&key, AAD, &blob).unwrap(), kek(2));
}

#[test]
fn tpm_keys_survive_a_reset_and_the_link_recovers() {
    let mut tpm = tpm();
    let key = TpmRootKey::open(&config(&tpm, &[], false)).unwrap();
    let blob = key.seal(AAD, &kek(3)).unwrap();
    assert_eq!(unseal(&key, AAD, &blob).unwrap(), kek(3));

    tpm.swtpm.kill();
    let err = unseal(&key, AAD, &blob).unwrap_err();
    assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
    assert!(matches!(key.canary(), Err(BackendError::Unreachable(_))));

    // Same state, volatile memory gone: the saved primary is stale and recreated, the
    // stored blobs still load.
    tpm.swtpm.restart().unwrap();
    assert_eq!(unseal(&key, AAD, &blob).unwrap(), kek(3));
    // A fresh open (a restarted worker) reads the old blob too.
    let again = TpmRootKey::open(&config(&tpm, &[], true)).unwrap();
    assert_eq!(unseal(&again, AAD, &blob).unwrap(), kek(3));
    assert_eq!(leftovers(&tpm), Vec::<String>::new());
}

#[test]
fn tpm_a_cleared_tpm_is_a_refusal_not_a_damaged_record() {
    let tpm = tpm();
    let key = TpmRootKey::open(&config(&tpm, &[], false)).unwrap();
    let blob = key.seal(AAD, &kek(4)).unwrap();
    tool(&tpm, &["tpm2_clear"]);
    let err = unseal(&key, AAD, &blob).unwrap_err();
    assert!(matches!(err, BackendError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("cleared"), "{err}");
    assert!(matches!(key.canary(), Err(BackendError::Refused(_))));
}

#[test]
fn tpm_persistent_primary_and_its_eviction() {
    let tpm = tpm();
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("primary.ctx");
    let ctx = ctx.to_str().unwrap();
    tool(&tpm, &["tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb", "-c", ctx]);
    tool(&tpm, &["tpm2_evictcontrol", "-Q", "-C", "o", "-c", ctx, "0x81000011"]);
    tool(&tpm, &["tpm2_flushcontext", "-t"]);
    let mut cfg = config(&tpm, &[], true);
    cfg.primary_handle = Some("0x81000011".into());
    let key = TpmRootKey::open(&cfg).unwrap();
    assert!(key.describe().contains("primary=0x81000011"), "{}", key.describe());
    let blob = key.seal(AAD, &kek(5)).unwrap();
    assert_eq!(unseal(&key, AAD, &blob).unwrap(), kek(5));
    // The persistent primary is the template's key: blobs move between the two ways.
    let by_template = TpmRootKey::open(&config(&tpm, &[], false)).unwrap();
    assert_eq!(unseal(&by_template, AAD, &blob).unwrap(), kek(5));
    assert_eq!(leftovers(&tpm), Vec::<String>::new());

    tool(&tpm, &["tpm2_evictcontrol", "-Q", "-C", "o", "-c", "0x81000011"]);
    let err = unseal(&key, AAD, &blob).unwrap_err();
    assert!(matches!(err, BackendError::Refused(_)) && err.to_string().contains("0x81000011"), "{err}");
}

/// The published format: tpm2-tools alone recover the KEK from a blob.
#[test]
fn tpm_a_blob_unseals_with_tpm2_tools_alone() {
    let tpm = tpm();
    let key = TpmRootKey::open(&config(&tpm, &[], true)).unwrap();
    let blob = key.seal(AAD, &kek(6)).unwrap();
    let parsed = Sealed::parse(&blob).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        let mut with_size = (bytes.len() as u16).to_be_bytes().to_vec();
        with_size.extend_from_slice(bytes);
        std::fs::write(&p, with_size).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (public, private) = (file("kek.pub", parsed.public), file("kek.priv", parsed.private));
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    tool(
        &tpm,
        &[
            "tpm2_createprimary",
            "-Q",
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "ecc256:aes128cfb",
            "-c",
            &path("p.ctx"),
        ],
    );
    // Without a resource manager tpm2-tools leave their objects loaded: flush as we go.
    tool(&tpm, &["tpm2_flushcontext", "-t"]);
    tool(
        &tpm,
        &["tpm2_load", "-Q", "-C", &path("p.ctx"), "-u", &public, "-r", &private, "-c", &path("k.ctx")],
    );
    tool(&tpm, &["tpm2_flushcontext", "-t"]);
    tool(&tpm, &["tpm2_unseal", "-c", &path("k.ctx"), "-o", &path("out")]);
    let out = std::fs::read(path("out")).unwrap();
    assert_eq!(&out[..KEK_LEN], &kek(6));
    assert_eq!(&out[KEK_LEN..], aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, AAD).as_ref());
}

/// 10 000 cold unseals in a row, every failure path among them, never exhaust the TPM's
/// three object slots: each one is flushed whatever happened.
#[test]
fn tpm_ten_thousand_unseals_leave_nothing_loaded() {
    let tpm = tpm();
    let plain = TpmRootKey::open(&config(&tpm, &[], false)).unwrap();
    let policy = TpmRootKey::open(&config(&tpm, &[23], true)).unwrap();
    let good = plain.seal(AAD, &kek(8)).unwrap();
    let with_policy = policy.seal(AAD, &kek(9)).unwrap();
    let mut tampered = good.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let started = Instant::now();
    let mut failures = 0;
    for i in 0..10_000u32 {
        match i % 100 {
            0 => assert!(matches!(unseal(&plain, b"other", &good), Err(BackendError::DataInvalid))),
            1 => assert!(matches!(unseal(&plain, AAD, &tampered), Err(BackendError::DataInvalid))),
            2 => {
                // PCR 23 is resettable from locality 0: extend it, fail, reset it.
                tool(&tpm, &["tpm2_pcrextend", &format!("23:sha256={}", "cd".repeat(32))]);
                assert!(matches!(unseal(&policy, AAD, &with_policy), Err(BackendError::Refused(_))));
                tool(&tpm, &["tpm2_pcrreset", "23"]);
            }
            3 => assert_eq!(unseal(&policy, AAD, &with_policy).unwrap(), kek(9)),
            _ => {
                assert_eq!(unseal(&plain, AAD, &good).unwrap(), kek(8));
                continue;
            }
        }
        failures += 1;
    }
    eprintln!("10000 unseals ({failures} failure paths) in {:?}", started.elapsed());
    assert_eq!(leftovers(&tpm), Vec::<String>::new());
}

/// A TCP relay in front of swtpm's two ports that records every byte both ways, so a test
/// can look at what crosses the "bus".
struct Wiretap {
    port: u16,
    seen: std::sync::Arc<Mutex<Vec<u8>>>,
}

impl Wiretap {
    fn start(target_port: u16) -> Wiretap {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let port = crate::swtpm::free_port_pair().unwrap();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        for offset in [0, 1] {
            let listener = TcpListener::bind(("127.0.0.1", port + offset)).unwrap();
            let seen = std::sync::Arc::clone(&seen);
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { return };
                    let server = TcpStream::connect(("127.0.0.1", target_port + offset)).unwrap();
                    for (mut from, mut to) in
                        [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                    {
                        let seen = std::sync::Arc::clone(&seen);
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 4096];
                            while let Ok(n @ 1..) = from.read(&mut buf) {
                                seen.lock().unwrap().extend_from_slice(&buf[..n]);
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            let _ = to.shutdown(std::net::Shutdown::Write);
                        });
                    }
                }
            });
        }
        Wiretap { port, seen }
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    fn saw(&self, needle: &[u8]) -> bool {
        self.seen.lock().unwrap().windows(needle.len()).any(|w| w == needle)
    }
}

#[test]
fn tpm_parameter_encryption_keeps_the_kek_off_the_wire() {
    let tpm = tpm();
    let port: u16 = tpm.swtpm.tcti().rsplit('=').next().unwrap().parse().unwrap();
    for (encrypt, pcrs) in [(false, &[][..]), (true, &[][..]), (true, &[16][..])] {
        let tap = Wiretap::start(port);
        let mut cfg = config(&tpm, pcrs, encrypt);
        cfg.tcti = tap.tcti();
        let key = TpmRootKey::open(&cfg).unwrap();
        let mut secret = [0u8; KEK_LEN];
        aws_lc_rs::rand::fill(&mut secret).unwrap();
        let blob = key.seal(AAD, &secret).unwrap();
        assert_eq!(unseal(&key, AAD, &blob).unwrap(), secret);
        // Without encryption the KEK crosses twice (TPM2_Create in, TPM2_Unseal out): the
        // tap works. With it, never.
        assert_eq!(tap.saw(&secret), !encrypt, "parameter_encryption={encrypt} pcrs={pcrs:?}");
    }
}
