//! Key lifecycle through `kekctl keys` (issue 2, point 3): the default key of a new tenant,
//! create, rotate, disable, enable, destroy, and what each does to EDEKs made earlier.

use softhsm_tests::{
    batch_items, code, exit, item_code, my_uid, now_unix, parse_edek, req, Code, Kekd, Tenant,
};

#[test]
fn a_new_tenant_has_key_default_version_1() {
    let kekd = Kekd::start_default();
    let keys = kekd.list_keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let k = &keys[0];
    assert_eq!((k.name.as_str(), k.active_version), ("default", 1));
    assert_eq!(k.versions.len(), 1);
    let (version, state, created) = &k.versions[0];
    assert_eq!((*version, state.as_str()), (1, "active"));
    let now = now_unix();
    assert!(
        *created <= now && now - created < 3600,
        "created_unix {created} is not a recent time (now {now})"
    );
}

#[test]
fn create_lists_the_key_and_refuses_duplicates_and_bad_names() {
    let kekd = Kekd::start_default();
    kekd.keys(["create", "billing/invoices"]).ok();
    let k = kekd.key("billing/invoices");
    assert_eq!(k.active_version, 1);
    assert_eq!(k.state(1), "active");
    let mut names: Vec<_> = kekd.list_keys().into_iter().map(|k| k.name).collect();
    names.sort();
    assert_eq!(names, ["billing/invoices", "default"]);

    // The new key works at once.
    let edek = kekd.wrap("billing/invoices", b"invoice key", &[]);
    assert_eq!(parse_edek(&edek).key, "billing/invoices");
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"invoice key");

    kekd.keys(["create", "billing/invoices"]).assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    // kekctl checks names before it connects (a usage error, exit 2); the daemon checks
    // them again for other clients (INVALID_ARGUMENT).
    let mut conn = kekd.raw("acme");
    for (i, bad) in ["../escape", "a//b", "has space"].into_iter().enumerate() {
        let out = kekd.keys(["create", bad]);
        assert_eq!(out.code, exit::USAGE, "keys create {bad:?}: {}", out.stderr);
        assert!(out.stderr.contains(bad), "the error should quote the bad name: {}", out.stderr);
        let resp = conn.call(&req::create_key(i as u64 + 1, bad));
        assert_eq!(code(&resp), Code::InvalidArgument, "create_key {bad:?} on the wire: {resp:?}");
    }
    assert_eq!(kekd.list_keys().len(), 2, "failed creates must not leave keys behind");
}

#[test]
fn unknown_keys_and_versions_are_not_found() {
    let kekd = Kekd::start_default();
    kekd.keys(["rotate", "ghost"]).assert_error(exit::NOT_FOUND, "NOT_FOUND");
    kekd.kekctl()
        .args(["wrap", "--key", "ghost"])
        .stdin(&b"x"[..])
        .run()
        .assert_error(exit::NOT_FOUND, "NOT_FOUND");
    kekd.keys(["disable", "default", "--version", "9"]).assert_error(exit::NOT_FOUND, "NOT_FOUND");
    kekd.keys(["disable", "ghost", "--version", "1"]).assert_error(exit::NOT_FOUND, "NOT_FOUND");
}

#[test]
fn rotation_keeps_old_edeks_and_rewrap_moves_them_forward() {
    let kekd = Kekd::start_default();
    let old = kekd.wrap("default", b"written under v1", &[("doc", "1")]);
    let (old_dek, old_generated) = kekd.generate("default", &[]);
    assert_eq!(parse_edek(&old).version, 1);

    kekd.keys(["rotate", "default"]).ok();
    let k = kekd.key("default");
    assert_eq!(k.active_version, 2);
    assert_eq!((k.state(1), k.state(2)), ("decrypt-only", "active"));

    // New wraps and generates use version 2.
    let new = kekd.wrap("default", b"written under v2", &[("doc", "2")]);
    assert_eq!(parse_edek(&new).version, 2);
    assert_eq!(parse_edek(&kekd.generate("default", &[]).1).version, 2);

    // Old EDEKs still unwrap.
    assert_eq!(kekd.unwrap(&old, &[("doc", "1")]).ok(), b"written under v1");
    assert_eq!(kekd.unwrap(&old_generated, &[]).ok(), &old_dek[..]);
    assert_eq!(kekd.unwrap(&new, &[("doc", "2")]).ok(), b"written under v2");

    // Rewrap moves an old EDEK to the active version; the secret inside is unchanged.
    let moved = kekd.rewrap(&old, &[("doc", "1")]).ok().to_vec();
    let h = parse_edek(&moved);
    assert_eq!((h.key.as_str(), h.version), ("default", 2));
    assert_eq!(kekd.unwrap(&moved, &[("doc", "1")]).ok(), b"written under v1");
    // The context stays bound through the rewrap.
    kekd.unwrap(&moved, &[("doc", "2")]).assert_error(exit::DATA_INVALID, "DATA_INVALID");

    // On the wire, a rewrap answer carries the new EDEK and no plaintext.
    let mut conn = kekd.raw("acme");
    let it = batch_items(conn.call(&req::rewrap(1, &[old_generated], &[]))).remove(0);
    assert_eq!(item_code(&it), Code::Ok, "{it:?}");
    assert!(it.plaintext.is_empty(), "rewrap must not return the plaintext");
    assert_eq!((it.key_name.as_str(), it.key_version), ("default", 2));
    assert_eq!(parse_edek(&it.edek).version, 2);
}

#[test]
fn disable_enable_and_destroy_versions() {
    let kekd = Kekd::start_default();
    let v1 = kekd.wrap("default", b"v1 data", &[]);
    kekd.keys(["rotate", "default"]).ok();
    let v2 = kekd.wrap("default", b"v2 data", &[]);

    // Disabled: refused, and says so (FAILED_PRECONDITION, not DATA_INVALID); reversible.
    kekd.keys(["disable", "default", "--version", "1"]).ok();
    assert_eq!(kekd.key("default").state(1), "disabled");
    kekd.unwrap(&v1, &[]).assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    kekd.rewrap(&v1, &[]).assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert_eq!(kekd.unwrap(&v2, &[]).ok(), b"v2 data", "other versions are unaffected");

    kekd.keys(["enable", "default", "--version", "1"]).ok();
    assert_eq!(kekd.key("default").state(1), "decrypt-only");
    assert_eq!(kekd.unwrap(&v1, &[]).ok(), b"v1 data");

    // The active version cannot be destroyed; it keeps working.
    kekd.keys(["destroy", "default", "--version", "2"])
        .assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert_eq!(kekd.key("default").state(2), "active");
    assert_eq!(kekd.unwrap(&v2, &[]).ok(), b"v2 data");

    // Destroyed: gone for good. The daemon answers DATA_INVALID (the version no longer
    // exists as key material, which is indistinguishable from an unknown version).
    kekd.keys(["destroy", "default", "--version", "1"]).ok();
    assert_eq!(kekd.key("default").state(1), "destroyed");
    kekd.unwrap(&v1, &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    kekd.rewrap(&v1, &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    let out = kekd.keys(["enable", "default", "--version", "1"]);
    assert_ne!(out.code, 0, "a destroyed version cannot be enabled again");
    assert_eq!(kekd.key("default").state(1), "destroyed");
    kekd.unwrap(&v1, &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");

    // Version numbers are never reused.
    kekd.keys(["rotate", "default"]).ok();
    assert_eq!(kekd.key("default").active_version, 3);
    assert_eq!(kekd.unwrap(&v2, &[]).ok(), b"v2 data");
}

#[test]
fn admin_operations_need_an_admin() {
    // We may use the tenant's data operations, but we are not its admin.
    let kekd = Kekd::builder().tenant(Tenant::new("acme").allow_uid(my_uid()).admin(4242)).start();
    let edek = kekd.wrap("default", b"data ops are fine", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"data ops are fine");

    for args in [
        &["create", "mine"][..],
        &["rotate", "default"][..],
        &["disable", "default", "--version", "1"][..],
        &["destroy", "default", "--version", "1"][..],
        &["list"][..],
    ] {
        kekd.keys(args).assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    }
    // Nothing changed: the EDEK still unwraps, with version 1 still the one in use.
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"data ops are fine");
    assert_eq!(parse_edek(&kekd.wrap("default", b"x", &[])).version, 1);
}

/// Error messages name keys the way the user typed them (`"default"`), not as Rust values
/// (`KeyName("default")`).
#[test]
fn error_messages_name_keys_plainly() {
    let kekd = Kekd::start_default();
    let edek = kekd.wrap("default", b"x", &[]);
    kekd.keys(["rotate", "default"]).ok();
    kekd.keys(["disable", "default", "--version", "1"]).ok();
    let outs = [
        kekd.unwrap(&edek, &[]),
        kekd.keys(["create", "default"]),
        kekd.keys(["destroy", "default", "--version", "2"]),
        kekd.keys(["enable", "default", "--version", "9"]),
    ];
    for out in outs {
        assert_ne!(out.code, 0, "{}", out.command);
        assert!(out.stderr.contains("default"), "`{}` should name the key: {}", out.command, out.stderr);
        assert!(
            !out.stderr.contains("KeyName("),
            "`{}` shows a Rust debug value: {}",
            out.command,
            out.stderr
        );
    }
}
