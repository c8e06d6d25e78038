//! `kekd check-config` and start-up errors (issue 2, points 2 and 9): a valid config is
//! accepted, and an error names the offending field by its dotted path, first thing on
//! stderr, for `check-config` and for `run` alike.

use softhsm_tests::{Backend, Kekd, Tenant};

fn prepared() -> Kekd {
    Kekd::builder().tenant(Tenant::owned_by_me("acme").kek_ttl("30s")).prepare()
}

/// [`prepared`] on SoftHSM2 whatever KEKD_TEST_BACKEND says: for the fields of the pkcs11
/// table, which a TPM tenant does not have.
fn prepared_pkcs11() -> Kekd {
    Kekd::builder().tenant(Tenant::owned_by_me("acme").kek_ttl("30s").backend(Backend::SoftHsm)).prepare()
}

/// [`assert_names_field_in`] a [`prepared`] daemon.
#[track_caller]
fn assert_names_field(edit: impl FnOnce(String) -> String, field: &str, also_mentions: &str) {
    assert_names_field_in(prepared(), edit, field, also_mentions)
}

/// Applies `edit` to the config text, then checks that `check-config` fails with exit code 1
/// and a stderr starting with `field`, and that `run` refuses to start, naming it too.
#[track_caller]
fn assert_names_field_in(
    mut kekd: Kekd,
    edit: impl FnOnce(String) -> String,
    field: &str,
    also_mentions: &str,
) {
    let text = kekd.config_text();
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit changed nothing");
    kekd.write_config_text(&edited);

    let out = kekd.check_config();
    assert_eq!(out.code, 1, "check-config should exit 1 for a bad {field}; stderr:\n{}", out.stderr);
    assert!(
        out.stderr.starts_with(field),
        "check-config should start its message with {field:?}, got:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(also_mentions),
        "the message should mention {also_mentions:?}:\n{}",
        out.stderr
    );

    let failure = kekd.try_start().expect_err("kekd run must refuse a config that check-config refuses");
    assert!(failure.status.is_some_and(|s| !s.success()), "kekd run should exit non-zero: {failure}");
    assert!(failure.stderr.contains(field), "kekd run should name {field:?}: {failure}");
}

#[test]
fn a_valid_config_is_accepted() {
    let kekd = prepared();
    let out = kekd.check_config();
    let first = out.ok_str().lines().next().unwrap_or("");
    assert!(
        first.starts_with("config OK"),
        "check-config should print \"config OK\", got {:?}",
        out.ok_str()
    );
}

#[test]
fn an_unknown_key_is_named() {
    assert_names_field(
        |t| t.replace("kek_ttl = \"30s\"", "kek_tll = \"30s\""),
        "tenants.acme.kek_tll",
        "kek_tll",
    );
    assert_names_field(|t| format!("sockets = \"/tmp/x.sock\"\n{t}"), "sockets", "sockets");
}

#[test]
fn a_bad_duration_is_named() {
    assert_names_field(|t| t.replace("\"30s\"", "\"30 parsecs\""), "tenants.acme.kek_ttl", "");
}

#[test]
fn a_missing_pin_source_is_named() {
    assert_names_field_in(
        prepared_pkcs11(),
        |t| t.lines().filter(|l| !l.starts_with("pin_file")).map(|l| format!("{l}\n")).collect(),
        "tenants.acme.pkcs11.pin_file",
        "",
    );
    // A PIN file that cannot be read.
    assert_names_field_in(
        prepared_pkcs11(),
        |t| {
            let start = t.find("pin_file = ").expect("pin_file line");
            let end = start + t[start..].find('\n').expect("end of line");
            format!("{}pin_file = \"/nonexistent/acme.pin\"{}", &t[..start], &t[end..])
        },
        "tenants.acme.pkcs11.pin_file",
        "/nonexistent/acme.pin",
    );
}

#[test]
fn an_unreadable_module_is_named() {
    assert_names_field_in(
        prepared_pkcs11(),
        |t| {
            let start = t.find("module = ").expect("module line");
            let end = start + t[start..].find('\n').expect("end of line");
            format!("{}module = \"/nonexistent/libpkcs11.so\"{}", &t[..start], &t[end..])
        },
        "tenants.acme.pkcs11.module",
        "/nonexistent/libpkcs11.so",
    );
}

/// With `create_root_key = false`, a token without the root key is a clear start-up error
/// that names the key label, not a daemon that serves nothing.
#[test]
fn a_missing_root_key_is_a_clear_start_up_error() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme").create_root_key(false)).prepare();
    let failure = kekd.try_start().expect_err("kekd must not start without its root key");
    assert!(failure.status.is_some_and(|s| !s.success()), "{failure}");
    assert!(
        failure.stderr.contains("kekd-root-acme"),
        "the error should name the missing key label: {failure}"
    );

    // The same token, once the key exists (created by a run allowed to), serves.
    let text = kekd.config_text().replace("create_root_key = false", "create_root_key = true");
    kekd.write_config_text(&text);
    kekd.start();
    let edek = kekd.wrap("default", b"now it works", &[]);
    kekd.kill();
    kekd.write_config_text(&text.replace("create_root_key = true", "create_root_key = false"));
    kekd.start();
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"now it works");
}
