//! Who may do what (issue 2, points 6 and 11): the daemon reads the caller's uid and gid
//! from the socket (SO_PEERCRED) and checks them against the tenant's ACL. The multi-user
//! tests run `kekctl` as `nobody` (uid 65534) and need root; run as another user they say
//! so and return.

use softhsm_tests::{
    assert_traversable_by_others, exit, is_root, my_uid, Kekd, Tenant, NOBODY_GID, NOBODY_UID,
};

fn need_root(test: &str) -> bool {
    if !is_root() {
        eprintln!("{test}: skipped, running kekctl as uid {NOBODY_UID} needs root");
    }
    is_root()
}

#[test]
fn unknown_tenant_is_not_found() {
    let kekd = Kekd::start_default();
    kekd.kekctl_for("ghost")
        .args(["generate", "--key", "default"])
        .run()
        .assert_error(exit::NOT_FOUND, "NOT_FOUND");
    kekd.kekctl_for("ghost").args(["keys", "list"]).run().assert_error(exit::NOT_FOUND, "NOT_FOUND");
}

#[test]
fn caller_outside_the_acl_is_denied() {
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .tenant(Tenant::new("other").allow_uid(4242).allow_gid(4242).admin(4243))
        .start();
    let edek = kekd.wrap("default", b"acme's", &[]);
    let other = |args: &[&str], stdin: &[u8]| kekd.kekctl_for("other").args(args).stdin(stdin).run();
    other(&["generate", "--key", "default"], b"").assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    other(&["wrap", "--key", "default"], b"x").assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    other(&["unwrap"], &edek).assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    other(&["keys", "list"], b"").assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    other(&["status"], b"").assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
}

#[test]
fn another_user_is_denied_where_not_allowed_and_served_where_allowed() {
    if !need_root("another_user_is_denied_where_not_allowed_and_served_where_allowed") {
        return;
    }
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .tenant(Tenant::new("shared").allow_uid(NOBODY_UID).admin(my_uid()))
        .tenant(Tenant::new("bygroup").allow_gid(NOBODY_GID).admin(my_uid()))
        .start();
    assert_traversable_by_others(kekd.socket());
    let nobody = |tenant: &str| kekd.kekctl_for(tenant).as_user(NOBODY_UID, NOBODY_GID);

    // Not in acme's ACL: denied, for data and for admin operations.
    let acme_edek = kekd.wrap("default", b"acme's secret", &[]);
    nobody("acme")
        .args(["generate", "--key", "default"])
        .run()
        .assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    nobody("acme")
        .arg("unwrap")
        .stdin(acme_edek.clone())
        .run()
        .assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    nobody("acme")
        .args(["keys", "rotate", "default"])
        .run()
        .assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    assert_eq!(kekd.key("default").active_version, 1, "the denied rotate changed nothing");

    // Allowed by uid: served, so the denial above is about identity, not reachability.
    let edek =
        nobody("shared").args(["wrap", "--key", "default"]).stdin(&b"nobody's"[..]).run().ok().to_vec();
    assert_eq!(nobody("shared").arg("unwrap").stdin(edek.clone()).run().ok(), b"nobody's");
    // ... but not an admin there.
    nobody("shared")
        .args(["keys", "create", "mine"])
        .run()
        .assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    nobody("shared").args(["keys", "list"]).run().assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    // The admin (us) sees the key nobody could not create is absent.
    let keys = kekd.kekctl_for("shared").json().args(["keys", "list"]).run().json().to_string();
    assert!(keys.contains("default"), "{keys}");
    assert!(!keys.contains("mine"), "{keys}");

    // Allowed by primary group.
    let edek =
        nobody("bygroup").args(["wrap", "--key", "default"]).stdin(&b"by group"[..]).run().ok().to_vec();
    assert_eq!(nobody("bygroup").arg("unwrap").stdin(edek).run().ok(), b"by group");
}
