//! The encryption budget of a KEK version (issue 5, point 4; DESIGN §1): reaching it
//! rotates the key by itself, and the count is reserved on disk ahead of use, so a
//! SIGKILL never lets a version encrypt more than its budget.

use softhsm_tests::{parse_edek, Kekd, Tenant};

/// `kekctl generate --count n --edek-only`, returning each EDEK's KEK version.
fn generate(kekd: &Kekd, n: usize) -> Vec<u32> {
    let out = kekd
        .kekctl()
        .json()
        .args(["generate", "--key", "default", "--edek-only", "--count"])
        .arg(n.to_string())
        .run();
    let v = out.json();
    let items = if n == 1 { vec![v] } else { v.as_array().expect("an array for --count > 1").clone() };
    items.iter().map(|i| i["version"].as_u64().expect("version") as u32).collect()
}

#[test]
fn a_spent_budget_rotates_and_survives_kill_9() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme").encryption_budget(1000)).start();
    let old = kekd.wrap("default", b"under version 1", &[]);
    assert_eq!(parse_edek(&old).version, 1);
    assert!(generate(&kekd, 9).iter().all(|&v| v == 1));

    // 10 used, 62 (budget / 16) reserved on disk. A crash loses the difference, never the
    // count: after a restart version 1 takes only 1000 - 62 more.
    kekd.restart_after_kill();
    for _ in 0..2 {
        assert!(generate(&kekd, 469).iter().all(|&v| v == 1));
    }
    assert_eq!(generate(&kekd, 1), [2], "62 + 938 = 1000: the next encryption rotates the key");
    let key = kekd.key("default");
    assert_eq!(key.active_version, 2);
    assert_eq!(key.state(1), "decrypt-only");
    assert_eq!(kekd.unwrap(&old, &[]).ok(), b"under version 1");

    // A batch that does not fit in what is left of a version moves to the next one whole.
    assert!(generate(&kekd, 998).iter().all(|&v| v == 2));
    assert!(generate(&kekd, 5).iter().all(|&v| v == 3));
    assert!(kekd.stderr().contains("encryption budget of the active version reached: rotated"));
}
