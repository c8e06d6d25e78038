//! One tenant cannot take the machine's memory or disk (issue 19, point 4), through the
//! real daemon: the answers a worker holds unwritten are bounded per connection and per
//! tenant (`limits.max_pending_reply_bytes`: backpressure, and the memory goes back to
//! the system afterwards), and each tenant's audit records per day are capped
//! (`audit.max_bytes_per_day`: RESOURCE_EXHAUSTED for that tenant only).

use std::fs;

use softhsm_tests::{batch_items, code, exit, req, Code, Kekctl, Kekd, RawConn, Tenant};

/// A tenant that floods its audit trail reaches `audit.max_bytes_per_day`: its operations
/// then fail with RESOURCE_EXHAUSTED naming the setting, its trail stops there (one record
/// past the limit says why, and the chain still verifies), and a tenant writing to the
/// same audit directory is served all along.
#[test]
fn a_tenant_past_its_daily_audit_bytes_fails_closed_and_the_others_are_served() {
    const CAP: u64 = 64 << 10;
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .tenant(Tenant::owned_by_me("globex"))
        .audit(&format!("max_bytes_per_day = {CAP}"))
        .start();
    let mut flood = RawConn::open(kekd.socket(), "acme");
    let mut other = RawConn::open(kekd.socket(), "globex");
    let mut refused = None;
    // Each batch adds some 20 KB of records: the cap is reached within a few.
    for id in 1..=40 {
        let resp = flood.call(&req::generate(id, "default", 64));
        match code(&resp) {
            Code::Ok => assert_eq!(batch_items(resp).len(), 64),
            Code::ResourceExhausted => {
                refused = Some(resp);
                break;
            }
            _ => panic!("neither served nor refused for the audit budget: {resp:?}"),
        }
        // The other tenant, on the same audit directory, is served throughout.
        assert_eq!(code(&other.call(&req::generate(1000 + id, "default", 1))), Code::Ok);
    }
    let refused = refused.expect("64 KiB of records a day is reached within 40 batches of 64");
    let message = refused.status.map(|s| s.message).unwrap_or_default();
    assert!(message.contains("audit.max_bytes_per_day"), "the refusal names the setting: {message}");

    // Every operation of that tenant fails, through kekctl as well; the other tenant's do not.
    assert_eq!(code(&flood.call(&req::status(100))), Code::ResourceExhausted);
    let out = kekd.kekctl_for("acme").args(["generate", "--key", "default"]).run();
    out.assert_error(exit::RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED");
    assert!(out.stderr.contains("audit.max_bytes_per_day"), "{}", out.stderr);
    let edek = kekd.kekctl_for("globex").args(["wrap", "--key", "default"]).stdin(&b"served"[..]).run();
    let back = kekd.kekctl_for("globex").arg("unwrap").stdin(edek.ok().to_vec()).run();
    assert_eq!(back.ok(), b"served");

    // The capped trail holds at most the cap and the one record that says it was reached.
    let files = kekd.audit_files("acme");
    let size: u64 = files.iter().map(|f| fs::metadata(f).unwrap().len()).sum();
    let records = kekd.audit_records("acme");
    let note = records.last().expect("records");
    assert_eq!(
        (note["event"].as_str(), note["code"].as_str()),
        (Some("audit"), Some("RESOURCE_EXHAUSTED")),
        "{note}"
    );
    assert_eq!(note["detail"]["max_bytes_per_day"], CAP, "{note}");
    let note_len = serde_json::to_string(note).unwrap().len() as u64 + 1;
    assert!(size <= CAP + note_len, "{size} bytes in a trail capped at {CAP}");
    Kekctl::new().args(["audit", "verify"]).args(&files).run().ok();
    let globex: u64 = kekd.audit_files("globex").iter().map(|f| fs::metadata(f).unwrap().len()).sum();
    assert!(globex > 0 && globex < CAP, "the other tenant's trail goes on: {globex} bytes");
}
