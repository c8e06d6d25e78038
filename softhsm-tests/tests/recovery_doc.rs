//! The recovery contract is exact and runnable (issue 20, point 6): every recipe of
//! docs/FORMATS.md (§5.3, §6 and §7) is read from the document at run time and run with bash as
//! printed, with only the variables the document names set, on Debian's own tools (PATH is
//! `/usr/sbin:/usr/bin:/sbin:/bin`, so `python3` is Debian's, with python3-pykcs11 and
//! python3-cryptography). Each case checks what a customer would: the data key the
//! recipes recover equals the one kekd handed out, from a real SoftHSM2 token or a real
//! swtpm, with kekd stopped; that §6.7 verifies the audit checkpoints kekd made, and
//! refuses a forged MAC; and a root key made by a provisioning recipe serves kekd.
//!
//! Each case picks its backend itself, so the file means the same under
//! `KEKD_TEST_BACKEND=tpm`.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;
use softhsm_tests::{random_bytes, run_command, softhsm_module, Backend, Kekd, Output, Tenant};

/// Every recipe the document must hold, each exactly once.
const RECIPES: [&str; 12] = [
    "audit-verify-chain",
    "pkcs11-unwrap-kek",
    "kek-chain",
    "edek-unwrap",
    "tpm-unseal-kek",
    "swtpm-start-dev",
    "swtpm-stop-dev",
    "pkcs11-unwrap-audit-key",
    "tpm-unseal-audit-key",
    "verify-audit-checkpoints",
    "provision-root-key-pykcs11",
    "provision-root-key-pkcs11-tool",
];

/// A context whose order on the command line is not its canonical order, with a non-ASCII
/// value (str16 counts bytes, not characters).
const CONTEXT: [(&str, &str); 3] = [("zone", "Zürich"), ("app", "billing"), ("env", "prod")];
const CONTEXT_JSON: &str = r#"{"zone": "Zürich", "app": "billing", "env": "prod"}"#;

fn document_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/FORMATS.md")
}

/// The body of the `sh` block right after `<!-- recipe: NAME -->`, read from the document
/// now: the test runs what a customer reads, not a copy.
#[track_caller]
fn recipe(name: &str) -> String {
    let doc = fs::read_to_string(document_path()).expect("read docs/FORMATS.md");
    let marker = format!("<!-- recipe: {name} -->");
    let lines: Vec<&str> = doc.lines().collect();
    let at: Vec<usize> =
        lines.iter().enumerate().filter(|(_, l)| l.trim() == marker).map(|(i, _)| i).collect();
    assert_eq!(at.len(), 1, "docs/FORMATS.md must mark exactly one recipe {name:?}, found {}", at.len());
    assert_eq!(
        lines.get(at[0] + 1).copied(),
        Some("```sh"),
        "recipe {name:?}: no ```sh block after its marker"
    );
    let body: Vec<&str> = lines[at[0] + 2..].iter().take_while(|l| **l != "```").copied().collect();
    assert!(at[0] + 2 + body.len() < lines.len(), "recipe {name:?}: its block is not closed");
    assert!(body.iter().any(|l| !l.trim().is_empty()), "recipe {name:?} is empty");
    body.join("\n") + "\n"
}

/// Runs recipes one after the other in one bash, as a reader pasting them in turn would,
/// with a clean environment: Debian's PATH, and the variables given.
fn run_recipes(names: &[&str], work: &Path, vars: &[(&str, OsString)]) -> Output {
    let mut script = String::new();
    for name in names {
        script.push_str(&format!("# --- recipe {name} (docs/FORMATS.md)\n"));
        script.push_str(&recipe(name));
    }
    let file = work.join(format!("{}.sh", names.join("+")));
    fs::write(&file, &script).expect("write the recipe script");
    let mut cmd = Command::new("/bin/bash");
    cmd.args(["-eu", "-o", "pipefail"]).arg(&file).current_dir(work).env_clear();
    cmd.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").env("HOME", work).env("TMPDIR", work);
    cmd.env("LANG", "C.UTF-8");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    run_command(cmd, Vec::new())
}

/// [`run_recipes`], which must succeed.
#[track_caller]
fn run_ok(names: &[&str], work: &Path, vars: &[(&str, OsString)]) {
    let out = run_recipes(names, work, vars);
    assert_eq!(
        out.code, 0,
        "recipes {names:?} of docs/FORMATS.md failed (exit {}):\n{}",
        out.code, out.stderr
    );
}

fn var(name: &'static str, value: impl Into<OsString>) -> (&'static str, OsString) {
    (name, value.into())
}

/// A directory for the recovery's files, inside the test's own directory.
fn work_dir(test_dir: &Path) -> PathBuf {
    let work = test_dir.join("recovery");
    fs::create_dir_all(&work).expect("create the recovery directory");
    work
}

/// Writes a raw EDEK to a file for the recipes.
fn edek_file(work: &Path, name: &str, edek: &[u8]) -> PathBuf {
    let path = work.join(name);
    fs::write(&path, edek).expect("write the EDEK");
    path
}

/// A recovered key file: it exists, holds `len` bytes and only its owner may read it.
#[track_caller]
fn read_secret(path: &Path, len: usize) -> Vec<u8> {
    use std::os::unix::fs::PermissionsExt as _;
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("the recipe wrote no {}: {e}", path.display()));
    assert_eq!(bytes.len(), len, "{}", path.display());
    let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} is readable by others", path.display());
    bytes
}

/// `kekctl generate` with [`CONTEXT`] → (data key, EDEK).
fn generate(kekd: &Kekd, key: &str) -> (Vec<u8>, Vec<u8>) {
    let (dek, edek) = kekd.generate(key, &CONTEXT);
    assert_eq!(dek.len(), 32);
    (dek, edek)
}

/// The KEK record of one version, as the store holds it.
fn record(store: &Path, tenant: &str, key: &str, version: u32) -> serde_json::Value {
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    let path = store.join(format!("tenants/{tenant}/keys/{hex}/v{version:010}.kek"));
    serde_json::from_slice(&fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// §6.7: recovers the audit checkpoint key with `unseal` (the recipe for the backend), and
/// verifies the tenant's trail and its checkpoints with it, which must hold at least
/// `min_checkpoints`. Not vacuous: a checkpoint whose MAC is changed, or another key, fails.
fn verify_checkpoints(
    work: &Path,
    common: &[(&str, OsString)],
    unseal: &str,
    kekd: &Kekd,
    min_checkpoints: usize,
) {
    let audit_key = work.join("audit.key");
    let mut vars = common.to_vec();
    vars.extend([
        var("TENANT", "acme"),
        var("AUDIT_KEY", &audit_key),
        var("AUDIT_DIR", kekd.audit_dir("acme")),
    ]);
    let out = run_recipes(&[unseal, "verify-audit-checkpoints"], work, &vars);
    assert_eq!(out.code, 0, "recipes {unseal} + verify-audit-checkpoints failed:\n{}", out.stderr);
    read_secret(&audit_key, 32);
    let records = kekd.audit_records("acme");
    let made = records.iter().filter(|r| r["event"] == "checkpoint").count();
    assert!(made >= min_checkpoints, "{records:#?}");
    assert!(
        out.stderr.contains(&format!("ok: {} records", records.len()))
            && out.stderr.contains(&format!("{made} checkpoints verified")),
        "{}",
        out.stderr
    );

    // A checkpoint whose MAC was changed, in a copy of the trail.
    let forged = work.join("forged-audit");
    fs::create_dir_all(&forged).unwrap();
    let mut replaced = false;
    for f in kekd.audit_files("acme") {
        let text = fs::read_to_string(&f).unwrap();
        let lines: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                if replaced || v["event"] != "checkpoint" {
                    return l.to_owned();
                }
                replaced = true;
                // The MAC is inside the record: its hash changes, so recompute that too.
                let mac = v["detail"]["mac"].as_str().unwrap();
                let other = format!("{}{}", if mac.starts_with('0') { '1' } else { '0' }, &mac[1..]);
                let body = format!("{}}}", &l[..l.len() - 75]).replace(mac, &other);
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body.as_bytes());
                let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
                format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1])
            })
            .collect();
        fs::write(
            forged.join(f.file_name().unwrap()),
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }
    assert!(replaced);
    let mut vars = common.to_vec();
    vars.extend([var("TENANT", "acme"), var("AUDIT_KEY", &audit_key), var("AUDIT_DIR", &forged)]);
    let out = run_recipes(&["verify-audit-checkpoints"], work, &vars);
    // Its hash was recomputed, so the chain holds: the MAC is what fails.
    assert!(
        out.code != 0 && out.stderr.contains("MAC does not match"),
        "a forged checkpoint verified:\n{}",
        out.stderr
    );

    // Another key.
    let wrong = work.join("wrong.key");
    fs::write(&wrong, random_bytes(32)).unwrap();
    let mut vars = common.to_vec();
    vars.extend([var("TENANT", "acme"), var("AUDIT_KEY", &wrong), var("AUDIT_DIR", kekd.audit_dir("acme"))]);
    let out = run_recipes(&["verify-audit-checkpoints"], work, &vars);
    assert!(out.code != 0 && out.stderr.contains("MAC does not match"), "{}", out.stderr);
}

/// Recovers the data key of `edek` with the recipes: the KEK of `key` v1 (through its
/// parent `parent` v1 when given, whose KEK comes from the root key), then the EDEK. `root`
/// is the recipe that opens a root-sealed record; `common` the variables of the backend.
#[allow(clippy::too_many_arguments)]
fn recover_dek(
    work: &Path,
    common: &[(&str, OsString)],
    root: &[&str],
    tenant: &str,
    key: &str,
    parent: Option<&str>,
    edek: &[u8],
    tag: &str,
) -> Vec<u8> {
    let with = |extra: Vec<(&'static str, OsString)>| -> Vec<(&str, OsString)> {
        let mut v = common.to_vec();
        v.push(var("TENANT", tenant));
        v.extend(extra);
        v
    };
    let kek = work.join(format!("{tag}.kek"));
    match parent {
        None => run_ok(root, work, &with(vec![var("KEY", key), var("VERSION", "1"), var("KEK", &kek)])),
        Some(parent) => {
            let parent_kek = work.join(format!("{tag}.parent.kek"));
            run_ok(root, work, &with(vec![var("KEY", parent), var("VERSION", "1"), var("KEK", &parent_kek)]));
            read_secret(&parent_kek, 32);
            let vars = with(vec![
                var("KEY", key),
                var("VERSION", "1"),
                var("PARENT_KEK", &parent_kek),
                var("KEK", &kek),
            ]);
            run_ok(&["kek-chain"], work, &vars);
        }
    }
    read_secret(&kek, 32);
    let edek_path = edek_file(work, &format!("{tag}.edek"), edek);
    let dek = work.join(format!("{tag}.dek"));
    let vars =
        with(vec![var("EDEK", &edek_path), var("KEK", &kek), var("CONTEXT", CONTEXT_JSON), var("DEK", &dek)]);
    run_ok(&["edek-unwrap"], work, &vars);
    let recovered = read_secret(&dek, 32);

    // Not vacuous: the same recipe refuses the EDEK under another context or tenant.
    for (name, value) in [("CONTEXT", r#"{"app": "billing", "env": "prod"}"#), ("TENANT", "not-the-tenant")] {
        let refused = work.join(format!("{tag}.{name}.dek"));
        let mut vars = vars.clone();
        vars.retain(|(k, _)| *k != name && *k != "DEK");
        vars.push(var(name, value));
        vars.push(var("DEK", &refused));
        let out = run_recipes(&["edek-unwrap"], work, &vars);
        assert_ne!(out.code, 0, "edek-unwrap accepted another {name}:\n{}", out.stderr);
        assert!(out.stderr.contains("does not decrypt"), "{name}: {}", out.stderr);
        assert!(!refused.exists(), "edek-unwrap wrote a data key for another {name}");
    }
    recovered
}

#[test]
fn the_document_marks_each_recipe_once() {
    let doc = fs::read_to_string(document_path()).expect("read docs/FORMATS.md");
    let mut marked: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.trim().strip_prefix("<!-- recipe: ").and_then(|r| r.strip_suffix(" -->")))
        .collect();
    marked.sort_unstable();
    let mut expected = RECIPES.to_vec();
    expected.sort_unstable();
    assert_eq!(marked, expected, "the recipes of docs/FORMATS.md and the ones this test runs differ");
    for name in RECIPES {
        recipe(name);
    }
}

/// §5.3: a tenant's trail verifies with `jq` and `sha256sum` alone, to the head
/// `kekctl audit verify` reports, records of both formats and a 4096-item record among
/// them; an edited record, a removed one, and a cut last line each fail it, by line.
#[test]
fn the_audit_trail_verifies_with_jq_and_sha256sum_alone() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    // A trail an earlier build wrote (format 1: a record per item, no `v`), which kekd
    // continues.
    fs::create_dir_all(kekd.audit_dir("acme")).unwrap();
    fs::write(kekd.audit_dir("acme").join("2026-11-20.jsonl"), softhsm_tests::format1_trail("acme", 3))
        .unwrap();
    kekd.start();
    let (_, edek) = generate(&kekd, "default");
    let mut tampered = edek.clone();
    *tampered.last_mut().unwrap() ^= 1;
    kekd.unwrap(&tampered, &[]).assert_error(softhsm_tests::exit::DATA_INVALID, "DATA_INVALID");
    let big = kekd
        .kekctl()
        .args(["bench", "--op", "generate", "--batch", "4096", "--connections", "1"])
        .args(["--duration", "200ms", "--warmup", "0s"])
        .run();
    big.ok();
    let files = kekd.audit_files("acme");
    let records = kekd.audit_records("acme");
    assert!(
        records.iter().any(|r| r["items"].as_array().is_some_and(|i| i.len() == 4096)),
        "a record of 4096 items"
    );
    assert_eq!(records.iter().map(|r| r["v"].as_u64()).filter(Option::is_none).count(), 3, "3 of format 1");
    assert_eq!(
        (&records[3]["v"], &records[3]["prev"]),
        (&2.into(), &records[2]["hash"]),
        "the chain goes on"
    );
    let verified = softhsm_tests::Kekctl::new().args(["audit", "verify"]).args(&files).run();
    let last =
        verified.ok_str().lines().find_map(|l| l.trim().strip_prefix("last: ")).expect("verify prints last");
    let last = last.split_whitespace().next().unwrap();

    let work = softhsm_tests::test_dir();
    let run = |dir: &Path| run_recipes(&["audit-verify-chain"], work.path(), &[var("TRAIL", dir)]);
    let out = run(&kekd.audit_dir("acme"));
    assert_eq!(out.ok_str().trim(), format!("chain OK, last: {last}"));

    // Each attack on a copy: it fails, naming the line.
    let attack = |name: &str, edit: &dyn Fn(&mut Vec<String>)| {
        let dir = work.path().join(name);
        fs::create_dir(&dir).unwrap();
        fs::copy(&files[0], dir.join(files[0].file_name().unwrap())).unwrap();
        let text = fs::read_to_string(&files[1]).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        edit(&mut lines);
        fs::write(dir.join(files[1].file_name().unwrap()), lines.join("\n") + "\n").unwrap();
        run(&dir)
    };
    assert_eq!(files.len(), 2, "{files:?}");
    let line_of = |event: &str| records[3..].iter().position(|r| r["event"] == event).unwrap();
    let unwrap = line_of("unwrap");
    let out =
        attack("edited", &|l| l[unwrap] = l[unwrap].replace("\"outcome\":\"error\"", "\"outcome\":\"ok\""));
    assert!(out.stderr.contains(&format!(":{}: the record was altered", unwrap + 1)), "{out:?}");
    let out = attack("removed", &|l| {
        l.remove(unwrap);
    });
    assert!(out.stderr.contains(&format!(":{}: prev is not the hash", unwrap + 1)), "{out:?}");
    let dir = work.path().join("cut");
    fs::create_dir(&dir).unwrap();
    fs::copy(&files[0], dir.join(files[0].file_name().unwrap())).unwrap();
    let text = fs::read(&files[1]).unwrap();
    fs::write(dir.join(files[1].file_name().unwrap()), &text[..text.len() - 1]).unwrap();
    assert!(run(&dir).stderr.contains("the last record is cut off"));
}

/// §6.2, §6.3, §6.4 on SoftHSM2: a record rewrapped by a root key rotation (its `root_key`
/// names the new key; the configured one is deleted), and a two-level chain.
#[test]
fn pkcs11_recipes_recover_a_rotated_root_and_a_chain() {
    let tenant = Tenant::owned_by_me("acme").backend(Backend::SoftHsm);
    let pin = tenant.pin.clone();
    let mut kekd = Kekd::builder().tenant(tenant).audit("checkpoint_interval = \"1s\"").start();
    let (dek, edek) = generate(&kekd, "default");
    kekd.keys(["create", "billing"]).ok();
    kekd.keys(["create", "billing/invoices"]).ok();
    let (chained_dek, chained_edek) = generate(&kekd, "billing/invoices");
    // A checkpoint before the rotation: its key is then rewrapped under the new root key.
    kekd.wait_audit("acme", std::time::Duration::from_secs(15), |r| r["event"] == "checkpoint");
    kekd.kekctl().args(["root", "rotate", "--label", "acme-root-2"]).run().ok();
    assert!(kekd.stop_with(Signal::SIGTERM).success(), "{}", kekd.stderr());

    let store = kekd.dir().join("state");
    assert_eq!(record(&store, "acme", "default", 1)["root_key"], "acme-root-2");
    assert_eq!(
        record(&store, "acme", "billing/invoices", 1)["parent"],
        serde_json::json!({"key": "billing", "version": 1})
    );
    // The configured root key is gone: only a recipe that follows `root_key` recovers.
    kekd.delete_token_key("acme", &kekd.root_key_label("acme"));

    let hsm = kekd.softhsm().expect("a SoftHSM2 tenant");
    let common = vec![
        var("STORE", &store),
        var("MODULE", softhsm_module()),
        var("SOFTHSM2_CONF", hsm.conf()),
        var("TOKEN_LABEL", "acme"),
        var("PIN", pin),
        var("ROOT_KEY_LABEL", kekd.root_key_label("acme")),
    ];
    let work = work_dir(kekd.dir());
    let root = ["pkcs11-unwrap-kek"];
    assert_eq!(recover_dek(&work, &common, &root, "acme", "default", None, &edek, "default"), dek);
    let chained = recover_dek(
        &work,
        &common,
        &root,
        "acme",
        "billing/invoices",
        Some("billing"),
        &chained_edek,
        "chain",
    );
    assert_eq!(chained, chained_dek);

    // §6.4 without a KEK names the one it needs.
    let vars = [
        common.clone(),
        vec![
            var("TENANT", "acme"),
            var("EDEK", edek_file(&work, "no-kek.edek", &chained_edek)),
            var("DEK", work.join("no-kek.dek")),
        ],
    ]
    .concat();
    let out = run_recipes(&["edek-unwrap"], &work, &vars);
    assert!(out.code != 0 && out.stderr.contains("KEK of 'billing/invoices' version 1"), "{}", out.stderr);

    // §6.7, with the checkpoint key rewrapped by the rotation (the configured root key is gone).
    verify_checkpoints(&work, &common, "pkcs11-unwrap-audit-key", &kekd, 2);

    // §6.2 sends a chained record to §6.3 rather than misreading it.
    let vars = [
        common.clone(),
        vec![
            var("TENANT", "acme"),
            var("KEY", "billing/invoices"),
            var("VERSION", "1"),
            var("KEK", work.join("x.kek")),
        ],
    ]
    .concat();
    let out = run_recipes(&root, &work, &vars);
    assert!(out.code != 0 && out.stderr.contains("§6.3"), "{}", out.stderr);
}

/// §6.5, §6.3, §6.4 on the tenant's own swtpm, with KEKs bound to PCR 16 (the PolicyPCR
/// path of the recipe) and a chain; nothing is left loaded in the TPM.
#[test]
fn tpm_recipes_recover_pcr_bound_keys_and_a_chain() {
    // Parameter encryption changes only how the KEK travels to and from the TPM, not the blob.
    let tenant = Tenant::owned_by_me("acme").backend(Backend::Tpm).pcrs(&[16]).parameter_encryption(true);
    let mut kekd = Kekd::builder().tenant(tenant).start();
    let (dek, edek) = generate(&kekd, "default");
    kekd.keys(["create", "billing"]).ok();
    kekd.keys(["create", "billing/invoices"]).ok();
    let (chained_dek, chained_edek) = generate(&kekd, "billing/invoices");
    assert!(kekd.stop_with(Signal::SIGTERM).success(), "{}", kekd.stderr());

    let store = kekd.dir().join("state");
    let described = record(&store, "acme", "default", 1)["root"].as_str().unwrap().to_owned();
    assert!(described.starts_with("tpm ") && described.contains("pcrs=sha256:16"), "{described}");
    let swtpm = kekd.swtpm("acme");
    let common = vec![var("STORE", &store), var("TPM2TOOLS_TCTI", swtpm.tcti())];
    let work = work_dir(kekd.dir());
    let root = ["tpm-unseal-kek"];
    assert_eq!(recover_dek(&work, &common, &root, "acme", "default", None, &edek, "default"), dek);
    let chained = recover_dek(
        &work,
        &common,
        &root,
        "acme",
        "billing/invoices",
        Some("billing"),
        &chained_edek,
        "chain",
    );
    assert_eq!(chained, chained_dek);
    assert_eq!(swtpm.transient_handles(), Vec::<u32>::new(), "the recipe left objects in the TPM");
    // §6.7: the checkpoint of the clean shutdown, its key sealed under the PCR policy too.
    verify_checkpoints(&work, &common, "tpm-unseal-audit-key", &kekd, 1);
    assert_eq!(swtpm.transient_handles(), Vec::<u32>::new(), "the recipe left objects in the TPM");

    // A persistent primary (`primary_handle`): the template's key, made persistent as an
    // operator would; a handle that holds nothing fails, so the variable is what is used.
    let tools = |args: &[&str]| {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]).current_dir(&work).env("TPM2TOOLS_TCTI", swtpm.tcti());
        let out = run_command(cmd, Vec::new());
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
    };
    tools(&["tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb", "-c", "p.ctx"]);
    tools(&["tpm2_evictcontrol", "-Q", "-C", "o", "-c", "p.ctx", "0x81000011"]);
    tools(&["tpm2_flushcontext", "-t"]);
    let by_handle = |handle: &str, kek: &Path| {
        let mut vars = common.clone();
        vars.extend([
            var("PRIMARY_HANDLE", handle),
            var("TENANT", "acme"),
            var("KEY", "billing"),
            var("VERSION", "1"),
            var("KEK", kek),
        ]);
        run_recipes(&root, &work, &vars)
    };
    let out = by_handle("0x81000011", &work.join("persistent.kek"));
    assert_eq!(out.code, 0, "tpm-unseal-kek with PRIMARY_HANDLE failed:\n{}", out.stderr);
    assert_eq!(
        read_secret(&work.join("persistent.kek"), 32),
        read_secret(&work.join("chain.parent.kek"), 32)
    );
    let out = by_handle("0x81000012", &work.join("nothing.kek"));
    assert_ne!(out.code, 0, "tpm-unseal-kek ignored PRIMARY_HANDLE:\n{}", out.stderr);
    assert!(!work.join("nothing.kek").exists());
    assert_eq!(swtpm.transient_handles(), Vec::<u32>::new(), "the recipe left objects in the TPM");

    // The PCR policy holds: once PCR 16 changes, the recipe cannot unseal.
    swtpm.pcr_extend(16);
    let vars = [
        common,
        vec![
            var("TENANT", "acme"),
            var("KEY", "default"),
            var("VERSION", "1"),
            var("KEK", work.join("late.kek")),
        ],
    ]
    .concat();
    let out = run_recipes(&root, &work, &vars);
    assert_ne!(out.code, 0, "unsealed after PCR 16 changed:\n{}", out.stderr);
    assert!(!work.join("late.kek").exists());
}

/// Kills, on drop, the swtpm §6.6 started (its pid file names it): a failed assertion
/// must not leave it running.
struct DevSwtpm(PathBuf);

impl Drop for DevSwtpm {
    fn drop(&mut self) {
        let Some(pid) = fs::read_to_string(&self.0).ok().and_then(|s| s.trim().parse::<i32>().ok()) else {
            return;
        };
        let is_swtpm = fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "swtpm");
        if is_swtpm {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A port P with P and P+1 free on 127.0.0.1 a moment ago, outside the kernel's ephemeral
/// range (like the fixture's swtpm ports).
fn free_port_pair() -> u16 {
    let free = |p: u16| std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, p)).is_ok();
    for _ in 0..256 {
        let r = random_bytes(2);
        let port = 20000 + u16::from_le_bytes([r[0], r[1]]) % 12000;
        if free(port) && free(port + 1) {
            return port;
        }
    }
    panic!("no two consecutive free ports on 127.0.0.1");
}

/// §6.6 then §6.5 and §6.4: `kekd dev --backend tpm` stopped, its swtpm started again on
/// `DIR/swtpm` with the document's command line, the data key recovered, swtpm stopped.
#[test]
fn dev_tpm_recipes_start_its_swtpm_and_recover() {
    let mut dev = Kekd::dev_args(&["--backend", "tpm"]);
    dev.start();
    let (dek, edek) = generate(&dev, "default");
    assert!(dev.stop_with(Signal::SIGTERM).success(), "{}", dev.stderr());
    let dev_dir = dev.dev_dir().expect("kekd dev --dir").to_path_buf();
    let work = work_dir(dev.dir());
    let pid_file = dev_dir.join("swtpm.pid");
    let _guard = DevSwtpm(pid_file.clone());

    let edek_path = edek_file(&work, "dev.edek", &edek);
    let (kek, dek_path) = (work.join("dev.kek"), work.join("dev.dek"));
    let recipes = ["swtpm-start-dev", "tpm-unseal-kek", "edek-unwrap", "swtpm-stop-dev"];
    // Another process may take the ports between the check and swtpm's bind: then swtpm
    // exits at once, before writing its pid file, and another pair is tried.
    let mut attempts = 0;
    let out = loop {
        attempts += 1;
        let vars = [
            var("DEV_DIR", &dev_dir),
            var("SWTPM_PORT", free_port_pair().to_string()),
            var("STORE", dev_dir.join("state")),
            var("TENANT", "demo"),
            var("KEY", "default"),
            var("VERSION", "1"),
            var("KEK", &kek),
            var("EDEK", &edek_path),
            var("CONTEXT", CONTEXT_JSON),
            var("DEK", &dek_path),
        ];
        let out = run_recipes(&recipes, &work, &vars);
        let bind_failed = out.code != 0 && out.stderr.contains("Address already in use");
        if !bind_failed || attempts == 5 {
            break out;
        }
    };
    assert_eq!(out.code, 0, "recipes {recipes:?} failed (exit {}):\n{}", out.code, out.stderr);
    read_secret(&kek, 32);
    assert_eq!(read_secret(&dek_path, 32), dek);
    assert!(!pid_file.exists(), "swtpm-stop-dev left its pid file");
}

/// Which recipe of §7 made the root key.
#[derive(Clone, Copy, Debug)]
enum Provisioner {
    PyKcs11,
    Pkcs11Tool,
}

/// The attributes of the AES keys labelled `label` on the token, read with PyKCS11 (in
/// its own process: SoftHSM2 takes its configuration once per process).
fn key_attributes(conf: &Path, token: &str, pin: &str, label: &str, work: &Path) -> Vec<serde_json::Value> {
    const DUMP: &str = r#"
import json, os, sys
import PyKCS11
from PyKCS11 import *
lib = PyKCS11Lib()
lib.load(os.environ["MODULE"])
slot = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.rstrip(" \0") == os.environ["TOKEN_LABEL"]][0]
session = lib.openSession(slot)
session.login(os.environ["PIN"])
names = ["CKA_TOKEN", "CKA_PRIVATE", "CKA_SENSITIVE", "CKA_EXTRACTABLE", "CKA_ENCRYPT", "CKA_DECRYPT",
         "CKA_WRAP", "CKA_UNWRAP", "CKA_SIGN", "CKA_VERIFY", "CKA_MODIFIABLE", "CKA_VALUE_LEN", "CKA_ALLOWED_MECHANISMS"]
out = []
for key in session.findObjects([(CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES), (CKA_LABEL, os.environ["LABEL"])]):
    values = session.getAttributeValue(key, [PyKCS11.CKA[n] for n in names])
    out.append({n: (list(v) if isinstance(v, tuple) else v) for n, v in zip(names, values)})
json.dump(out, sys.stdout)
"#;
    let script = work.join("dump-attributes.py");
    fs::write(&script, DUMP).unwrap();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(&script).env_clear().env("PATH", "/usr/bin:/bin");
    cmd.env("MODULE", softhsm_module()).env("SOFTHSM2_CONF", conf);
    cmd.env("TOKEN_LABEL", token).env("PIN", pin).env("LABEL", label);
    run_command(cmd, Vec::new()).json().as_array().expect("a list of keys").clone()
}

/// §7: a root key made by the recipe on a fresh token, with the attributes the document
/// requires; kekd starts on it (creating nothing), serves a round trip, and §6.2 + §6.4
/// recover the data key from it.
fn provisioned_root_key_serves_and_recovers(how: Provisioner) {
    let tenant = Tenant::owned_by_me("acme").backend(Backend::SoftHsm).create_root_key(false);
    let pin = tenant.pin.clone();
    let mut kekd = Kekd::builder().tenant(tenant).prepare();
    let hsm = kekd.softhsm().expect("a SoftHSM2 tenant").clone();
    let label = kekd.root_key_label("acme");
    let work = work_dir(kekd.dir());
    let token = vec![
        var("MODULE", softhsm_module()),
        var("SOFTHSM2_CONF", hsm.conf()),
        var("TOKEN_LABEL", "acme"),
        var("PIN", &pin),
        var("ROOT_KEY_LABEL", &label),
    ];
    let name = match how {
        Provisioner::PyKcs11 => "provision-root-key-pykcs11",
        Provisioner::Pkcs11Tool => "provision-root-key-pkcs11-tool",
    };
    assert!(
        key_attributes(hsm.conf(), "acme", &pin, &label, &work).is_empty(),
        "the fresh token has a root key"
    );
    run_ok(&[name], &work, &token);

    let keys = key_attributes(hsm.conf(), "acme", &pin, &label, &work);
    assert_eq!(keys.len(), 1, "{name} made {keys:?}");
    let key = &keys[0];
    for (attr, value) in [
        ("CKA_TOKEN", true),
        ("CKA_PRIVATE", true),
        ("CKA_SENSITIVE", true),
        ("CKA_EXTRACTABLE", false),
        ("CKA_ENCRYPT", true),
        ("CKA_DECRYPT", true),
    ] {
        assert_eq!(key[attr], value, "{name}: {attr} in {key}");
    }
    assert_eq!(key["CKA_VALUE_LEN"], 32, "{name}: not AES-256: {key}");
    // CKM_AES_GCM (0x1087) is the only mechanism allowed, as a native CK_ULONG.
    let allowed: Vec<u8> = serde_json::from_value(key["CKA_ALLOWED_MECHANISMS"].clone()).unwrap();
    assert_eq!(allowed, 0x1087u64.to_ne_bytes(), "{name}: {key}");
    if let Provisioner::PyKcs11 = how {
        for attr in ["CKA_WRAP", "CKA_UNWRAP", "CKA_SIGN", "CKA_VERIFY", "CKA_MODIFIABLE"] {
            assert_eq!(key[attr], false, "{name}: {attr} in {key}");
        }
    }

    kekd.start();
    let (dek, edek) = generate(&kekd, "default");
    assert_eq!(kekd.unwrap(&edek, &CONTEXT).ok(), &dek[..], "round trip on the provisioned key");
    let wrapped = kekd.wrap("default", b"a secret", &[]);
    assert_eq!(kekd.unwrap(&wrapped, &[]).ok(), b"a secret");
    assert!(kekd.stop_with(Signal::SIGTERM).success(), "{}", kekd.stderr());
    assert_eq!(
        key_attributes(hsm.conf(), "acme", &pin, &label, &work).len(),
        1,
        "kekd made another root key"
    );

    let store = kekd.dir().join("state");
    assert!(record(&store, "acme", "default", 1).get("root_key").is_none());
    let mut common = token;
    common.push(var("STORE", &store));
    let recovered =
        recover_dek(&work, &common, &["pkcs11-unwrap-kek"], "acme", "default", None, &edek, "prov");
    assert_eq!(recovered, dek, "{name}: recovery from the provisioned key");
}

#[test]
fn a_root_key_provisioned_with_pykcs11_serves_and_recovers() {
    provisioned_root_key_serves_and_recovers(Provisioner::PyKcs11);
}

#[test]
fn a_root_key_provisioned_with_pkcs11_tool_serves_and_recovers() {
    provisioned_root_key_serves_and_recovers(Provisioner::Pkcs11Tool);
}
