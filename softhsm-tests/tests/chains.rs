//! Key chains (issue 5, point 3; DESIGN §1 L3): `billing/invoices` is sealed by the KEK
//! of `billing`, not by the root key; disabling or destroying a parent version makes
//! everything under it unusable; chains are limited to `max_key_depth` levels.

use std::fs;

use softhsm_tests::{exit, Kekd, Tenant};

/// The KEK record of one version (docs/FORMATS.md §2).
fn record(kekd: &Kekd, tenant: &str, key: &str, version: u32) -> serde_json::Value {
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    let path = kekd.dir().join(format!("state/tenants/{tenant}/keys/{hex}/v{version:010}.kek"));
    serde_json::from_slice(&fs::read(&path).unwrap()).unwrap()
}

#[test]
fn a_child_key_is_sealed_by_its_parent_and_dies_with_it() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).start();
    kekd.keys(["create", "billing"]).ok();
    kekd.keys(["create", "billing/invoices"]).ok();
    let rec = record(&kekd, "acme", "billing/invoices", 1);
    assert_eq!(rec["parent"], serde_json::json!({"key": "billing", "version": 1}), "{rec}");
    assert!(record(&kekd, "acme", "billing", 1).get("parent").is_none(), "billing is sealed by the root key");

    let v1 = kekd.wrap("billing/invoices", b"invoice 1", &[]);
    assert_eq!(kekd.unwrap(&v1, &[]).ok(), b"invoice 1");
    // Cold, after a restart: the child is unsealed with its parent, itself with the root key.
    kekd.restart_after_kill();
    assert_eq!(kekd.unwrap(&v1, &[]).ok(), b"invoice 1");

    // Rotating the parent leaves the child where it is; rotating the child seals its new
    // version under the parent's active version.
    kekd.keys(["rotate", "billing"]).ok();
    kekd.keys(["rotate", "billing/invoices"]).ok();
    assert_eq!(record(&kekd, "acme", "billing/invoices", 2)["parent"]["version"], 2);
    let v2 = kekd.wrap("billing/invoices", b"invoice 2", &[]);

    // Disabling a parent version disables what it sealed, cached or not.
    kekd.keys(["disable", "billing", "--version", "1"]).ok();
    let out = kekd.unwrap(&v1, &[]);
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("billing") && out.stderr.contains("disabled"), "{}", out.stderr);
    assert_eq!(kekd.unwrap(&v2, &[]).ok(), b"invoice 2", "sealed under billing v2: unaffected");
    kekd.keys(["enable", "billing", "--version", "1"]).ok();
    assert_eq!(kekd.unwrap(&v1, &[]).ok(), b"invoice 1");

    // Destroying it crypto-shreds everything below it.
    kekd.keys(["destroy", "billing", "--version", "1"]).ok();
    let out = kekd.unwrap(&v1, &[]);
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("destroyed"), "{}", out.stderr);
    assert_eq!(kekd.unwrap(&v2, &[]).ok(), b"invoice 2");
    kekd.restart_after_kill();
    kekd.unwrap(&v1, &[]).assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert_eq!(kekd.unwrap(&v2, &[]).ok(), b"invoice 2");
}

#[test]
fn chains_are_limited_to_max_key_depth() {
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .tenant(Tenant::owned_by_me("deep").max_key_depth(5))
        .start();
    // Default 4 levels: customer root, tenant (billing), service (billing/invoices), DEK.
    kekd.keys(["create", "billing"]).ok();
    kekd.keys(["create", "billing/invoices"]).ok();
    let out = kekd.keys(["create", "billing/invoices/2026"]);
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("limited to 4 levels"), "{}", out.stderr);

    let deep = |args: &[&str]| kekd.kekctl_for("deep").arg("keys").args(args).run();
    deep(&["create", "billing"]).ok();
    deep(&["create", "billing/invoices"]).ok();
    deep(&["create", "billing/invoices/2026"]).ok();
    let edek = kekd
        .kekctl_for("deep")
        .args(["wrap", "--key", "billing/invoices/2026"])
        .stdin(&b"deep"[..])
        .run()
        .ok()
        .to_vec();
    assert_eq!(kekd.kekctl_for("deep").arg("unwrap").stdin(edek).run().ok(), b"deep");
    assert_eq!(record(&kekd, "deep", "billing/invoices/2026", 1)["parent"]["key"], "billing/invoices");
}
