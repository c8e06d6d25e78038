//! `kekctl status` (issue "[ops]", point 5): per tenant, the worker's pid and uptime, the
//! backend's health, the lease, cached KEKs, each key's versions, the operations served
//! and the errors by code, as text and as `--json`, for one tenant or several.

use std::time::Instant;

use serde_json::{json, Value};
use softhsm_tests::{code, exit, my_gid, my_uid, proc_file, proc_status_field, Code, Kekd, Tenant};

/// Seconds since `pid` started, from /proc (clock ticks of 1/100 s since boot).
fn process_age(pid: u32) -> f64 {
    let stat = proc_file(pid, "stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').expect("a comm field") + 2..];
    let start_ticks: f64 = after.split(' ').nth(19).expect("starttime").parse().unwrap();
    let uptime: f64 = proc_file(1, "../uptime").split(' ').next().unwrap().parse().unwrap();
    uptime - start_ticks / 100.0
}

/// The rows of a text table (or lines) whose words are exactly `words`.
fn has_row(text: &str, words: &[&str]) -> bool {
    text.lines().any(|l| l.split_whitespace().eq(words.iter().copied()))
}

#[test]
fn status_shows_what_the_worker_served_as_json_and_text() {
    let before_start = Instant::now();
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .tenant(Tenant::new("plain").allow_uid(my_uid()).allow_gid(my_gid()))
        .start();

    // Known operations, some failing with known codes.
    kekd.kekctl().json().arg("status").run().ok();
    let generated =
        kekd.kekctl().json().args(["generate", "--key", "default", "--count", "5", "--edek-only"]).run();
    assert_eq!(generated.json().as_array().map(Vec::len), Some(5));
    let edek = kekd.wrap("default", b"one", &[]);
    kekd.wrap("default", b"two", &[]);
    kekd.unwrap(&edek, &[]).ok();
    let mut tampered = edek.clone();
    *tampered.last_mut().unwrap() ^= 1;
    kekd.unwrap(&tampered, &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    kekd.kekctl()
        .args(["wrap", "--key", "nope"])
        .stdin(*b"x")
        .run()
        .assert_error(exit::NOT_FOUND, "NOT_FOUND");
    kekd.keys(["create", "billing"]).ok();
    kekd.keys(["rotate", "default"]).ok();
    kekd.keys(["disable", "default", "--version", "1"]).ok();
    kekd.unwrap(&edek, &[]).assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    // Two malformed requests: one answered on a connection that stays open, one that
    // ends its connection.
    let mut raw = kekd.raw("acme");
    let resp = raw.call(&kekd_proto::pb::Request { request_id: 7, metadata: None, op: None });
    assert_eq!(code(&resp), Code::InvalidArgument);
    raw.send_bytes(&[0, 0, 0, 2, 0xff, 0xff]).unwrap();
    assert_eq!(raw.recv().map(|r| code(&r)), Some(Code::InvalidArgument));
    raw.assert_closed();

    let s = kekd.kekctl().json().arg("status").run().json();
    let since_start = before_start.elapsed();
    assert_eq!(
        s["operations"],
        json!({
            "status": {"requests": 1, "items": 0},
            "generate": {"requests": 1, "items": 5},
            "wrap": {"requests": 3, "items": 3},
            "unwrap": {"requests": 3, "items": 3},
            "create_key": {"requests": 1, "items": 0},
            "rotate_key": {"requests": 1, "items": 0},
            "set_key_version_state": {"requests": 1, "items": 0},
        }),
        "{s}"
    );
    assert_eq!(
        s["errors"],
        json!({
            "INVALID_ARGUMENT": {"requests": 2, "items": 0},
            "NOT_FOUND": {"requests": 1, "items": 0},
            "FAILED_PRECONDITION": {"requests": 0, "items": 1},
            "DATA_INVALID": {"requests": 0, "items": 1},
        }),
        "{s}"
    );
    let versions = |k: &Value| -> Vec<(u64, String)> {
        k["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["version"].as_u64().unwrap(), v["state"].as_str().unwrap().to_owned()))
            .collect()
    };
    let keys = s["key_versions"].as_array().unwrap_or_else(|| panic!("no key_versions: {s}"));
    let names: Vec<&str> = keys.iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["billing", "default"]);
    assert_eq!(keys[1]["active_version"], 2);
    assert_eq!(versions(&keys[1]), [(1, "disabled".into()), (2, "active".into())]);
    assert_eq!(versions(&keys[0]), [(1, "active".into())]);
    assert_eq!(
        (s["keys"].as_u64(), s["lease"].as_str(), s["backend_healthy"].as_bool()),
        (Some(2), Some("online"), Some(true))
    );
    // Version 1, the one unwrap used, was evicted when it was disabled; 2 was never used.
    assert_eq!(s["cached_keks"], 0, "{s}");

    // The pid is the tenant's worker: a child of the supervisor, serving acme.
    let pid = s["worker_pid"].as_u64().unwrap() as u32;
    assert_ne!(Some(pid), kekd.pid());
    assert_eq!(proc_status_field(pid, "PPid"), kekd.pid().unwrap().to_string());
    let cmdline = proc_file(pid, "cmdline").replace('\0', " ");
    assert!(cmdline.contains("--tenant acme"), "{cmdline}");
    // The uptime is that worker's: as old as the process, and no older than the daemon.
    let uptime = s["uptime_seconds"].as_u64().unwrap();
    assert!(
        uptime <= since_start.as_secs() + 1,
        "uptime {uptime}s, but the daemon started {since_start:?} ago"
    );
    let age = process_age(pid);
    assert!((age - uptime as f64).abs() < 2.0, "uptime {uptime}s, but the worker is {age:.1}s old");

    // The text names the same, as lines and tables.
    let text = kekd.kekctl().arg("status").run().ok_str().to_owned();
    for line in ["tenant: acme", &format!("worker pid: {pid}"), "lease: online", "health: ok", "keys: 2"] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
    }
    assert!(text.lines().any(|l| l.starts_with("uptime: ")), "{text}");
    for row in [
        &["default", "2", "1:disabled", "2:active"][..],
        &["billing", "1", "1:active"],
        &["OPERATION", "REQUESTS", "ITEMS"],
        &["generate", "1", "5"],
        &["unwrap", "3", "3"],
        &["status", "2", "0"],
        &["ERROR", "REQUESTS", "ITEMS"],
        &["DATA_INVALID", "0", "1"],
        &["NOT_FOUND", "1", "0"],
        &["INVALID_ARGUMENT", "2", "0"],
    ] {
        assert!(has_row(&text, row), "no row {row:?} in:\n{text}");
    }
}

#[test]
fn status_of_several_tenants_one_connection_each() {
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .tenant(Tenant::new("plain").allow_uid(my_uid()).allow_gid(my_gid()))
        .start();
    kekd.kekctl_for("plain").args(["generate", "--key", "default", "--count", "3"]).run().ok();

    let all = kekd.kekctl().json().args(["status", "--tenants", "acme,plain"]).run().json();
    let all = all.as_array().unwrap_or_else(|| panic!("--tenants gives an array: {all}"));
    assert_eq!(all.len(), 2);
    let (acme, plain) = (&all[0], &all[1]);
    assert_eq!((acme["tenant"].as_str(), plain["tenant"].as_str()), (Some("acme"), Some("plain")));
    assert_ne!(acme["worker_pid"], plain["worker_pid"], "a worker per tenant");
    assert_eq!(acme["operations"], json!({}), "acme served nothing: {acme}");
    assert_eq!(plain["operations"], json!({"generate": {"requests": 1, "items": 3}}));
    // Keys and their versions are for admins, like `keys list`.
    assert_eq!(acme["key_versions"][0]["name"], "default");
    assert_eq!((plain["keys"].as_u64(), plain["key_versions"].clone()), (Some(1), json!([])));

    // A tenant that cannot be asked is shown with its error, and sets the exit status;
    // the others are still shown.
    let out = kekd.kekctl().args(["status", "--tenants", "acme,ghost,plain"]).run();
    assert_eq!(out.code, exit::NOT_FOUND, "{}", out.stderr);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("tenant: acme\n"), "{text}");
    assert!(text.contains("\n\ntenant: ghost\nerror: NOT_FOUND: "), "{text}");
    assert!(text.contains("\n\ntenant: plain\nworker pid: "), "{text}");
    assert!(has_row(&text, &["generate", "1", "3"]), "{text}");
    let out = kekd.kekctl().json().args(["status", "--tenants", "ghost"]).run();
    assert_eq!(out.code, exit::NOT_FOUND, "{}", out.stderr);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["tenant"], "ghost");
    assert_eq!(v[0]["error"]["code"], "NOT_FOUND", "{v}");
    assert!(out.stderr.starts_with("kekctl: NOT_FOUND: "), "{}", out.stderr);
}
