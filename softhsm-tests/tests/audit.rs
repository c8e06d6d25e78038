//! The audit trail end to end (issue 6): one record per key access, admin action, denial
//! and lease event, a hash chain `kekctl audit verify` checks, fail-closed when the trail
//! cannot be written, and forwarding to syslog.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use softhsm_tests::{exit, is_root, my_uid, Backend, Kekctl, Kekd, Tenant};

fn events<'a>(records: &'a [Value], event: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["event"] == event).collect()
}

fn verify(files: &[PathBuf]) -> softhsm_tests::Output {
    Kekctl::new().arg("audit").arg("verify").args(files).run()
}

#[test]
fn every_access_is_recorded_with_its_caller_and_metadata() {
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        // A user, not an admin, of billing; no access at all to other.
        .tenant(Tenant::new("billing").allow_uid(my_uid()))
        .tenant(Tenant::new("other").allow_uid(my_uid() + 1))
        .start();

    // A batch of three, with every kind of caller metadata.
    let made = kekd
        .kekctl()
        .json()
        .args(["generate", "--key", "default", "--count", "3"])
        .args(["--principal", "billing-svc", "--data-label", "invoices-2026"])
        .args(["--request-id", "req-42", "--source-address", "10.1.2.3"])
        .args(["--audit-field", "ticket=CHG-1", "--audit-field", "env=prod"])
        .run()
        .json();
    let edek = softhsm_tests::unb64(made[0]["edek"].as_str().expect("an edek"));
    kekd.unwrap(&edek, &[]).ok();
    let mut tampered = edek.clone();
    *tampered.last_mut().unwrap() ^= 1;
    kekd.unwrap(&tampered, &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    kekd.keys(["rotate", "default"]).ok();
    // Metadata is bounded: 1 KiB of free-form fields, no more.
    let big = format!("blob={}", "x".repeat(1100));
    let out = kekd.kekctl().args(["--audit-field", &big, "status"]).run();
    out.assert_error(exit::INVALID_ARGUMENT, "INVALID_ARGUMENT");
    assert!(out.stderr.contains("metadata.fields"), "{}", out.stderr);

    let records = kekd.audit_records("acme");
    let generated = events(&records, "generate");
    assert_eq!(generated.len(), 1, "one record per request: {generated:#?}");
    let r = generated[0];
    assert_eq!(r["v"], 2, "format 2");
    assert_eq!(r["tenant"], "acme");
    assert_eq!(r["outcome"], "ok");
    assert_eq!(r["role"], "admin");
    assert_eq!(r["peer"]["uid"], my_uid());
    assert!(r["peer"]["pid"].as_i64().unwrap() > 1, "{r}");
    let exe = r["peer"]["exe"].as_str().expect("the caller's executable");
    assert!(exe.ends_with("/kekctl"), "{exe}");
    assert_eq!(r["meta"]["principal"], "billing-svc");
    assert_eq!(r["meta"]["data_label"], "invoices-2026");
    assert_eq!(r["meta"]["request_id"], "req-42");
    assert_eq!(r["meta"]["source_address"], "10.1.2.3");
    assert_eq!(r["meta"]["fields"]["ticket"], "CHG-1");
    assert_eq!(r["meta"]["fields"]["env"], "prod");
    assert!(r["time"].as_str().unwrap().ends_with('Z'), "{r}");
    // The first item fetched the KEK from the root key; the rest of the batch reused it.
    assert_eq!(r["kek"], serde_json::json!({ "cache": 2, "root": 1 }));
    let items = r["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    for (i, (item, kek)) in items.iter().zip(["root", "cache", "cache"]).enumerate() {
        assert_eq!(item["key"], "default");
        assert_eq!(item["version"], 1);
        assert_eq!(item["outcome"], "ok");
        assert_eq!(item["kek"], kek);
        let edek = softhsm_tests::unb64(made[i]["edek"].as_str().unwrap());
        assert_eq!(item["edek"], softhsm_tests::edek_id(&edek), "each item names the EDEK it made");
    }

    let unwraps = events(&records, "unwrap");
    assert_eq!(unwraps.len(), 2, "{unwraps:#?}");
    let (good, bad) = (&unwraps[0]["items"][0], &unwraps[1]["items"][0]);
    assert_eq!((&good["outcome"], &good["kek"]), (&"ok".into(), &"cache".into()));
    assert_eq!(good["edek"], softhsm_tests::edek_id(&edek));
    assert!(unwraps[0].get("meta").is_none(), "no metadata given, none recorded");
    assert_eq!(bad["outcome"], "error");
    assert_eq!(bad["code"], "DATA_INVALID");
    assert_eq!(bad["edek"], good["edek"], "a tampered EDEK is named by the nonce it carries");

    let rotated = events(&records, "rotate_key");
    assert_eq!((&rotated[0]["key"], &rotated[0]["version"]), (&"default".into(), &2.into()));
    let invalid = events(&records, "invalid_request");
    assert_eq!(invalid.len(), 1, "{records:#?}");
    assert_eq!(invalid[0]["code"], "INVALID_ARGUMENT");
    assert!(invalid[0]["error"].as_str().unwrap().contains("metadata.fields"));
    let hellos = events(&records, "hello");
    assert!(hellos.len() >= 5 && hellos.iter().all(|h| h["outcome"] == "ok"), "{hellos:#?}");

    // A user of billing tries an admin action: denied by the worker, recorded.
    kekd.kekctl_for("billing")
        .args(["keys", "create", "x"])
        .run()
        .assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    let denied = kekd.audit_records("billing");
    let denied = events(&denied, "create_key");
    assert_eq!(denied.len(), 1);
    assert_eq!(
        (&denied[0]["code"], &denied[0]["role"], &denied[0]["key"]),
        (&"PERMISSION_DENIED".into(), &"user".into(), &"x".into())
    );

    // Not allowed at all: the supervisor refuses the Hello, and it lands in other's trail.
    kekd.kekctl_for("other").arg("status").run().assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    let refused = kekd.wait_audit("other", Duration::from_secs(5), |r| r["event"] == "hello");
    assert_eq!(refused["outcome"], "error");
    assert_eq!(refused["code"], "PERMISSION_DENIED");
    assert_eq!(refused["peer"]["uid"], my_uid());
    assert!(refused["peer"]["exe"].as_str().unwrap().ends_with("/kekctl"), "{refused}");
    assert!(refused.get("role").is_none(), "refused callers have no role: {refused}");

    for tenant in ["acme", "billing", "other"] {
        verify(&kekd.audit_files(tenant)).ok();
    }
}

/// Writes `lines` as a file in `dir` and returns its path.
fn write_lines(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(&path, text).unwrap();
    path
}

#[track_caller]
fn assert_broken(files: &[PathBuf], file: &Path, line: usize) -> String {
    let out = verify(files);
    assert_eq!(out.code, exit::AUDIT_BROKEN, "{out:?}");
    let at = format!("{}:{line}:", file.display());
    assert!(out.stderr.contains(&at), "expected the break at {at}, got: {}", out.stderr);
    out.stderr
}

#[test]
fn the_chain_continues_across_restarts_and_any_tampering_is_caught() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).start();
    let (_, edek) = kekd.generate("default", &[]);
    for _ in 0..3 {
        kekd.unwrap(&edek, &[]).ok();
    }
    kekd.kill();
    kekd.start();
    kekd.unwrap(&edek, &[]).ok();
    assert!(kekd.stop_with(Signal::SIGTERM).success());
    kekd.start();
    kekd.unwrap(&edek, &[]).ok();

    let files = kekd.audit_files("acme");
    let out = verify(&files).ok_str().to_owned();
    let records = kekd.audit_records("acme");
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=records.len() as u64).collect::<Vec<_>>(), "one chain across three runs");
    assert_eq!(events(&records, "audit").len(), 3, "each start is recorded: {records:#?}");
    assert!(out.contains(&format!("{} records", records.len())), "{out}");
    let head = records.last().unwrap()["hash"].as_str().unwrap();
    assert!(out.contains(head), "verify prints the head for comparison: {out}");

    // Tamper with copies of the real trail.
    let text = fs::read_to_string(&files[0]).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 8, "{}", lines.len());
    let dir = kekd.dir().join("tamper");
    fs::create_dir(&dir).unwrap();

    // Edited: a successful unwrap turned into a failed one.
    let i = lines.iter().position(|l| l.contains("\"event\":\"unwrap\"")).unwrap();
    let mut edited = lines.clone();
    let changed = lines[i].replace("\"outcome\":\"ok\"", "\"outcome\":\"error\"");
    edited[i] = &changed;
    let f = write_lines(&dir, "edited.jsonl", &edited);
    let why = assert_broken(std::slice::from_ref(&f), &f, i + 1);
    assert!(why.contains("edited"), "{why}");

    // Deleted: the record after the gap no longer follows.
    let mut deleted = lines.clone();
    deleted.remove(3);
    let f = write_lines(&dir, "deleted.jsonl", &deleted);
    assert_broken(std::slice::from_ref(&f), &f, 4);

    // Reordered.
    let mut swapped = lines.clone();
    swapped.swap(4, 5);
    let f = write_lines(&dir, "swapped.jsonl", &swapped);
    assert_broken(std::slice::from_ref(&f), &f, 5);

    // Truncated in the middle of the last record.
    let f = dir.join("truncated.jsonl");
    fs::write(&f, &text.as_bytes()[..text.len() - 30]).unwrap();
    assert_broken(std::slice::from_ref(&f), &f, lines.len());

    // Split into two days, then the first day's last record cut off: the next day's first
    // record no longer chains.
    let day1 = write_lines(&dir, "2026-11-22.jsonl", &lines[..5]);
    let day2 = write_lines(&dir, "2026-11-23.jsonl", &lines[5..]);
    verify(&[day1.clone(), day2.clone()]).ok();
    let day1 = write_lines(&dir, "2026-11-22.jsonl", &lines[..4]);
    assert_broken(&[day1, day2.clone()], &day2, 1);
}

/// fail_closed (the default): no record, no key. best_effort: served, and the gap is in
/// the trail once it can be written again.
#[test]
fn an_unwritable_trail_withholds_keys_unless_best_effort() {
    if !is_root() {
        eprintln!("SKIPPED (needs root): the worker must run as another user for permissions to bind it");
        return;
    }
    for best_effort in [false, true] {
        // On a TPM the worker's user needs no token files: only the trail is its own.
        let mut builder =
            Kekd::builder().tenant(Tenant::owned_by_me("acme").run_as("nobody").backend(Backend::Tpm));
        if best_effort {
            builder = builder.audit("mode = \"best_effort\"");
        }
        let kekd = builder.start();
        let (plain, edek) = kekd.generate("default", &[]);
        let trail = kekd.audit_dir("acme");
        let today = kekd.audit_files("acme").pop().expect("a day file");

        // Rotated away, and no new file can be created in its place.
        fs::rename(&today, kekd.dir().join("rotated.jsonl")).unwrap();
        fs::set_permissions(&trail, fs::Permissions::from_mode(0o500)).unwrap();
        // kekd notices the move within 200 ms; until then records go on into the moved file.
        std::thread::sleep(Duration::from_millis(300));
        let unwrap = kekd.unwrap(&edek, &[]);
        let generate = kekd.kekctl().args(["generate", "--key", "default"]).run();
        if best_effort {
            assert_eq!(unwrap.ok(), &plain[..]);
            generate.ok();
            kekd.wait_for_log("serving without them", Duration::from_secs(5));
        } else {
            unwrap.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
            assert!(unwrap.stderr.contains("audit record"), "{}", unwrap.stderr);
            generate.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
            kekd.wait_for_log("operations fail with UNAVAILABLE", Duration::from_secs(5));
        }

        fs::set_permissions(&trail, fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
        let records = kekd.audit_records("acme");
        let gap = events(&records, "audit")
            .into_iter()
            .find(|r| r["outcome"] == "error")
            .expect("the gap is recorded");
        assert_eq!(gap["code"], "UNAVAILABLE");
        // kekctl retries UNAVAILABLE, so fail_closed saw each operation more than once.
        assert!(gap["detail"]["unwritten_records"].as_u64().unwrap() >= 2, "{gap}");
        assert_eq!(gap["detail"]["mode"], if best_effort { "best_effort" } else { "fail_closed" });
        // The new file continues the chain of the one rotated away.
        let files = [kekd.dir().join("rotated.jsonl"), today.clone()];
        verify(&files).ok();
    }
}

#[test]
fn records_are_forwarded_to_syslog() {
    let dir = softhsm_tests::test_dir();
    let socket = dir.path().join("log");
    let syslog = UnixDatagram::bind(&socket).unwrap();
    syslog.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .audit(&format!("syslog = {:?}\nsyslog_facility = \"local3\"", socket.display().to_string()))
        .start();
    let (_, edek) = kekd.generate("default", &[]);
    let mut tampered = edek.clone();
    tampered[20] ^= 1;
    kekd.unwrap(&tampered, &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");

    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while got.len() < kekd.audit_records("acme").len() {
        let n = syslog.recv(&mut buf).expect("a syslog message for every record");
        got.push(String::from_utf8(buf[..n].to_vec()).unwrap());
    }
    let lines: Vec<String> = kekd
        .audit_files("acme")
        .iter()
        .flat_map(|f| fs::read_to_string(f).unwrap().lines().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert_eq!(got.len(), lines.len());
    for (msg, line) in got.iter().zip(&lines) {
        // <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG
        let parts: Vec<&str> = msg.splitn(7, ' ').collect();
        let record: Value = serde_json::from_str(line).unwrap();
        let item_failed =
            |items: &Value| items.as_array().is_some_and(|i| i.iter().any(|i| i["outcome"] == "error"));
        let failed = record["outcome"] == "error" || item_failed(&record["items"]);
        // local3 (19) * 8 + informational (6) or warning (4)
        assert_eq!(parts[0], if failed { "<156>1" } else { "<158>1" }, "{msg}");
        assert_eq!(parts[1], record["time"].as_str().unwrap());
        assert_eq!(parts[3], "kekd");
        assert_eq!(parts[5], record["event"].as_str().unwrap());
        // A record this small goes in one message, part 1 of 1 (syslog_forwarding.rs has
        // the larger ones).
        let (sd, text) = parts[6].split_once("] ").unwrap_or_else(|| panic!("{msg}"));
        let seq = &record["seq"];
        assert_eq!(sd, format!("[kekd@32473 tenant=\"acme\" seq=\"{seq}\" part=\"1\" parts=\"1\""));
        assert_eq!(text, line, "the message is the record, byte for byte");
    }
    assert!(got.iter().any(|m| m.contains("\"code\":\"DATA_INVALID\"")));
}

/// `kekctl bench` against the real daemon: every DEK it counts is an audited item.
#[test]
fn a_bench_run_is_audited_request_by_request() {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).start();
    let r = kekd
        .kekctl()
        .json()
        .args(["bench", "--op", "unwrap", "--connections", "2", "--pipeline", "2", "--batch", "4"])
        .args(["--duration", "1s", "--warmup", "0s"])
        .run()
        .json();
    let requests = r["requests"].as_u64().unwrap();
    assert!(requests > 10, "{r}");
    assert_eq!(r["deks"].as_u64().unwrap(), requests * 4, "{r}");
    assert_eq!(r["failed_requests"], 0, "{r}");
    for p in ["p50", "p90", "p99", "p99_9"] {
        assert!(r["latency_us"][p].as_u64().unwrap() > 0, "{p}: {r}");
    }
    let records = kekd.audit_records("acme");
    let unwraps = events(&records, "unwrap");
    // The bench's own EDEK pool comes from generate; every unwrap it timed is recorded,
    // an item each, plus any it sent in the last moment after the clock stopped.
    let items: Vec<&Value> = unwraps.iter().flat_map(|u| u["items"].as_array().unwrap()).collect();
    assert!(unwraps.len() as u64 >= requests, "{} records for {requests} requests", unwraps.len());
    assert!(items.len() as u64 >= requests * 4, "{} items for {} DEKs", items.len(), requests * 4);
    assert!(items.iter().all(|u| u["outcome"] == "ok" && u["edek"].is_string()));
    verify(&kekd.audit_files("acme")).ok();
}

/// The trail's start cannot be cut off unnoticed (issue 19, point 5b): verify requires the
/// genesis record unless told, with `--from SEQ:HASH`, the last record of what was removed,
/// which every verify prints for this purpose.
#[test]
fn records_cut_off_the_start_are_refused_unless_verify_is_told_where_the_trail_resumes() {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).start();
    let (_, edek) = kekd.generate("default", &[]);
    for _ in 0..4 {
        kekd.unwrap(&edek, &[]).ok();
    }
    let files = kekd.audit_files("acme");
    let text = fs::read_to_string(files.last().unwrap()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 6, "{text}");
    let seq_of = |line: &str| serde_json::from_str::<Value>(line).unwrap()["seq"].as_u64().unwrap();
    assert_eq!(seq_of(lines[0]), 1, "the real trail begins with the genesis record");

    // The real trail as two days, and the first day archived (removed).
    let dir = kekd.dir().join("archived");
    fs::create_dir(&dir).unwrap();
    let day1 = write_lines(&dir, "2026-11-22.jsonl", &lines[..3]);
    let day2 = write_lines(&dir, "2026-11-23.jsonl", &lines[3..]);
    let why = assert_broken(std::slice::from_ref(&day2), &day2, 1);
    assert!(why.contains(&format!("record seq {}", seq_of(lines[3]))), "{why}");
    assert!(why.contains("expected seq 1, found 4"), "the gap is named: {why}");
    assert!(why.contains("--from SEQ:HASH"), "the way to continue is named: {why}");

    // What the verify of the archived day printed is where the rest resumes.
    let printed = verify(std::slice::from_ref(&day1)).ok_str().to_owned();
    let last = printed
        .lines()
        .find_map(|l| l.strip_prefix("last: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("verify prints the last record as SEQ:HASH: {printed}"));
    let hash3 = serde_json::from_str::<Value>(lines[2]).unwrap()["hash"].as_str().unwrap().to_owned();
    assert_eq!(last, format!("3:{hash3}"));
    let rest = Kekctl::new().args(["audit", "verify", "--from", last]).arg(&day2).run().ok_str().to_owned();
    assert!(rest.contains(&format!("seq 4..{}", lines.len())), "{rest}");
    // The JSON form says it too, and the whole trail ends where the two parts do.
    let whole = Kekctl::new().json().args(["audit", "verify"]).arg(&day1).arg(&day2).run().json();
    let tail = Kekctl::new().json().args(["audit", "verify", "--from", last]).arg(&day2).run().json();
    assert_eq!(whole["last"], tail["last"], "{whole} {tail}");

    // A --from that is not the removed part's last record is refused, naming it.
    let wrong = format!("2:{hash3}");
    let out = Kekctl::new().args(["audit", "verify", "--from", &wrong]).arg(&day2).run();
    assert_eq!(out.code, exit::AUDIT_BROKEN, "{out:?}");
    assert!(out.stderr.contains("expected seq 3 (the record after --from 2:…), found 4"), "{}", out.stderr);

    // The live file itself, its first records cut in place: refused too.
    let live = files.last().unwrap();
    fs::write(live, lines[2..].iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let why = assert_broken(std::slice::from_ref(live), live, 1);
    assert!(why.contains("expected seq 1, found 3"), "{why}");
}
