//! kekd adopts only a root key that stays in its HSM (issue 20, point 4).
//!
//! The keys are made the way operators make them, with OpenSC's pkcs11-tool (0.23 on
//! Debian 12: it ignores `--usage-*` for AES keys, and without `--private` makes a public
//! object, usable without the PIN), and with cryptoki for the attributes pkcs11-tool cannot
//! set. kekd must refuse each key that can leave the token (public, extractable, not
//! sensitive) or is not AES-256, naming the attribute, unless the tenant says the key is
//! escrowed (`allow_exportable_root = true`): then it serves, and says so at every start and
//! in `kekctl status`. A key that cannot seal with AES-GCM is refused either way, and said
//! so in those words, not as a `CKR_*` from its first use.

use std::process::Command;
use std::sync::{Mutex, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use nix::sys::signal::Signal;
use softhsm_tests::*;

/// A tenant `acme` on SoftHSM2 whose root key is made by the test, not by kekd.
fn acme() -> Tenant {
    Tenant::owned_by_me("acme").create_root_key(false)
}

fn prepared() -> (Kekd, String) {
    let tenant = acme();
    let pin = tenant.pin.clone();
    (Kekd::builder().tenant(tenant).prepare(), pin)
}

/// `pkcs11-tool --keygen ARGS` making acme's root key, as an operator would.
#[track_caller]
fn pkcs11_tool_key(kekd: &Kekd, pin: &str, args: &[&str]) {
    let mut cmd = Command::new("pkcs11-tool");
    cmd.arg("--module").arg(softhsm_module()).env("SOFTHSM2_CONF", kekd.softhsm().unwrap().conf());
    cmd.args(["--token-label", "acme", "--login", "--pin", pin, "--keygen", "--label"]);
    cmd.arg(kekd.root_key_label("acme")).args(args);
    let out = run_command(cmd, Vec::new());
    assert_eq!(out.code, 0, "`{}`: {}", out.command, out.stderr);
}

/// One test at a time may hold SoftHSM2 in this process: it reads SOFTHSM2_CONF (an
/// environment variable) at C_Initialize.
static IN_PROCESS_HSM: Mutex<()> = Mutex::new(());

/// Makes acme's root key with cryptoki: a key kekd would make itself (every attribute
/// explicit), with `changes` in place of the attributes of the same type.
#[track_caller]
fn fixture_key(kekd: &Kekd, pin: &str, changes: &[Attribute]) {
    let _one = IN_PROCESS_HSM.lock().unwrap_or_else(PoisonError::into_inner);
    std::env::set_var("SOFTHSM2_CONF", kekd.softhsm().unwrap().conf());
    let pkcs11 = Pkcs11::new(softhsm_module()).expect("load SoftHSM2");
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize");
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).is_ok_and(|t| t.label() == "acme"))
        .expect("acme's token");
    {
        let session = pkcs11.open_rw_session(slot).unwrap();
        session.login(UserType::User, Some(&AuthPin::from(pin))).expect("log in");
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Label(kekd.root_key_label("acme").into_bytes()),
        ];
        for change in changes {
            template.retain(|a| a.attribute_type() != change.attribute_type());
            template.push(change.clone());
        }
        session.generate_key(&Mechanism::AesKeyGen, &template).expect("C_GenerateKey");
    }
    pkcs11.finalize().expect("C_Finalize");
}

/// Starts kekd, which must refuse acme's root key: returns its `kekd: tenant acme: ...`
/// line.
#[track_caller]
fn refused(kekd: &mut Kekd) -> String {
    let failure = match kekd.try_start() {
        Ok(()) => {
            let status = kekd.kekctl().arg("status").run();
            panic!("kekd adopted the root key:\n{}", String::from_utf8_lossy(&status.stdout));
        }
        Err(f) => f,
    };
    assert!(failure.status.is_some_and(|s| !s.success()), "kekd must exit with an error: {failure}");
    let line = failure.stderr.lines().find(|l| l.starts_with("kekd: tenant acme:"));
    line.unwrap_or_else(|| panic!("no `kekd: tenant acme:` line: {failure}")).to_owned()
}

/// The attributes a message may name; each test says which one it must, and no other.
const ATTRIBUTES: [&str; 7] = [
    "CKA_PRIVATE",
    "CKA_EXTRACTABLE",
    "CKA_SENSITIVE",
    "CKA_VALUE_LEN",
    "CKA_ENCRYPT",
    "CKA_DECRYPT",
    "CKA_ALLOWED_MECHANISMS",
];

#[track_caller]
fn assert_names_only(line: &str, attribute: &str, says: &str) {
    // The advice names every attribute of a good key: only the part before it counts.
    let finding = line.split(". A root key must").next().unwrap_or(line);
    assert!(finding.contains(says), "{says:?} expected: {line}");
    for other in ATTRIBUTES.iter().filter(|a| **a != attribute) {
        assert!(!finding.contains(other), "only {attribute} is at fault, not {other}: {line}");
    }
}

#[test]
fn keys_made_by_pkcs11_tool_that_can_leave_the_token_are_refused_by_attribute() {
    let (mut kekd, pin) = prepared();
    let label = kekd.root_key_label("acme");
    for (args, attribute, says) in [
        // The key: no --private, so a public object, whatever --usage-* says.
        (
            &["--key-type", "AES:32", "--sensitive", "--usage-decrypt"][..],
            "CKA_PRIVATE",
            "CKA_PRIVATE is false",
        ),
        (
            &["--key-type", "AES:32", "--private", "--sensitive", "--extractable"],
            "CKA_EXTRACTABLE",
            "CKA_EXTRACTABLE is true",
        ),
        (&["--key-type", "AES:32", "--private"], "CKA_SENSITIVE", "CKA_SENSITIVE is false"),
        (
            &["--key-type", "AES:16", "--private", "--sensitive"],
            "CKA_VALUE_LEN",
            "an AES-128 key, not AES-256",
        ),
    ] {
        pkcs11_tool_key(&kekd, &pin, args);
        let line = refused(&mut kekd);
        assert_names_only(&line, attribute, says);
        assert!(line.contains(&format!("{label:?}")) && line.contains("token \"acme\""), "{line}");
        assert!(line.contains("tenants.acme.pkcs11.allow_exportable_root = true"), "the way out: {line}");
        kekd.delete_token_key("acme", &label);
    }

    // The same tool, the right flags: adopted, healthy, no exception.
    pkcs11_tool_key(&kekd, &pin, &["--key-type", "AES:32", "--private", "--sensitive"]);
    kekd.start();
    let status = kekd.kekctl().arg("status").run();
    let text = status.ok_str();
    assert!(text.contains("\nhealth: ok\n") && !text.contains("exception"), "{text}");
    let (plain, edek) = kekd.generate("default", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
}

#[test]
fn keys_made_by_the_fixture_are_refused_by_attribute_escrow_or_not() {
    let (mut kekd, pin) = prepared();
    let label = kekd.root_key_label("acme");
    let config = kekd.config_text();
    let escrow = config
        .replace("create_root_key = false\n", "create_root_key = false\nallow_exportable_root = true\n");
    assert_ne!(escrow, config);
    for (change, attribute, says, excusable) in [
        (Attribute::Private(false), "CKA_PRIVATE", "CKA_PRIVATE is false", true),
        (Attribute::Extractable(true), "CKA_EXTRACTABLE", "CKA_EXTRACTABLE is true", true),
        (Attribute::Sensitive(false), "CKA_SENSITIVE", "CKA_SENSITIVE is false", true),
        (Attribute::Encrypt(false), "CKA_ENCRYPT", "CKA_ENCRYPT is false: the key may not encrypt", false),
        (Attribute::Decrypt(false), "CKA_DECRYPT", "CKA_DECRYPT is false: the key may not decrypt", false),
        (
            Attribute::AllowedMechanisms(vec![MechanismType::AES_CBC_PAD]),
            "CKA_ALLOWED_MECHANISMS",
            "CKA_ALLOWED_MECHANISMS does not list CKM_AES_GCM",
            false,
        ),
    ] {
        fixture_key(&kekd, &pin, std::slice::from_ref(&change));
        let line = refused(&mut kekd);
        assert_names_only(&line, attribute, says);
        assert!(!line.contains("CKR_"), "said in words, not as a PKCS#11 return value: {line}");
        // Escrow excuses a key that can leave, never one that cannot seal.
        kekd.write_config_text(&escrow);
        if excusable {
            kekd.start();
            let (plain, edek) = kekd.generate("default", &[]);
            assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..], "{change:?}");
            assert!(kekd.stop_with(Signal::SIGTERM).success());
        } else {
            let line = refused(&mut kekd);
            assert_names_only(&line, attribute, says);
            assert!(!line.contains("allow_exportable_root"), "no use suggesting it: {line}");
        }
        kekd.write_config_text(&config);
        kekd.delete_token_key("acme", &label);
        let _ = std::fs::remove_dir_all(kekd.dir().join("state/tenants/acme"));
    }
}

#[test]
fn an_escrowed_root_key_is_adopted_visibly_at_every_start() {
    let (mut kekd, pin) = prepared();
    pkcs11_tool_key(&kekd, &pin, &["--key-type", "AES:32", "--private", "--sensitive", "--extractable"]);
    assert_names_only(&refused(&mut kekd), "CKA_EXTRACTABLE", "CKA_EXTRACTABLE is true");

    // A typo in the setting is named, not taken for "off".
    let config = kekd.config_text();
    let with = |line: &str| {
        config.replace("create_root_key = false\n", &format!("create_root_key = false\n{line}\n"))
    };
    kekd.write_config_text(&with("allow_exportable_roots = true"));
    let out = kekd.check_config();
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.starts_with("tenants.acme.pkcs11.allow_exportable_roots: unknown field"),
        "{}",
        out.stderr
    );

    kekd.write_config_text(&with("allow_exportable_root = true"));
    kekd.check_config().ok();
    for start in 1..=2 {
        kekd.start();
        let log = kekd.wait_for_log("adopted by exception", std::time::Duration::from_secs(5));
        let line = log.lines().find(|l| l.contains("adopted by exception")).expect("found above");
        assert!(line.contains("WARN") && line.contains("CKA_EXTRACTABLE is true"), "start {start}: {line}");
        assert!(line.contains("acme") && line.contains("allow_exportable_root"), "start {start}: {line}");

        let text = kekd.kekctl().arg("status").run().ok_str().to_owned();
        assert!(
            text.contains("root key exception (allow_exportable_root): CKA_EXTRACTABLE is true"),
            "start {start}: {text}"
        );
        let json = kekd.kekctl().json().arg("status").run().json();
        let exceptions = json["root_key_exceptions"].as_array().unwrap_or_else(|| panic!("{json}"));
        assert_eq!(exceptions.len(), 1, "{json}");
        assert!(exceptions[0].as_str().unwrap().starts_with("CKA_EXTRACTABLE is true"), "{json}");
        let (plain, edek) = kekd.generate("default", &[]);
        assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
        assert!(kekd.stop_with(Signal::SIGTERM).success());
    }
}
