//! Logging (issue "[ops]", point 4): every line a client can cause is rate-limited per call
//! site, with the count of what was left out in the next line written; with stderr on the
//! journal, lines carry a syslog priority and no timestamp, workers' lines too; a bad
//! `log_level` is a config error naming the field.

use std::time::{Duration, Instant};

use softhsm_tests::{batch_items, code, req, Code, Kekd, RawConn, Tenant};

/// The daemon's limit per call site (kekd's `ratelimit`): a burst, then one line a second.
const BURST: u64 = 10;

const UNKNOWN: &str = "hello for an unknown tenant";
const DENIED: &str = "caller not allowed";
const BAD_FRAME: &str = "closing connection after a bad frame";

/// The value of `suppressed=N` in a log line, 0 without one.
fn suppressed(line: &str) -> u64 {
    line.split_once("suppressed=").map_or(0, |(_, rest)| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap_or_else(|_| panic!("suppressed= without a number: {line}"))
    })
}

/// The lines of `log` holding `message`.
fn lines_of<'a>(log: &'a str, message: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(message)).collect()
}

/// Runs `n` connections spread over 4 threads, each doing `one`.
fn flood(n: usize, one: impl Fn() + Sync) {
    std::thread::scope(|s| {
        for t in 0..4 {
            let one = &one;
            s.spawn(move || (t..n).step_by(4).for_each(|_| one()));
        }
    });
}

#[test]
fn a_flood_of_bad_clients_is_rate_limited_and_counted_while_others_are_served() {
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .tenant(Tenant::new("locked").allow_uid(4242).allow_gid(4242))
        .start();
    let socket = kekd.socket().to_path_buf();
    let hello_to = |tenant: &str, expect: Code| {
        let mut c = RawConn::connect(&socket);
        let resp = c.call(&req::hello(1, tenant));
        assert_eq!(code(&resp), expect, "{resp:?}");
    };
    let bad_frame = || {
        let mut c = RawConn::open(&socket, "acme");
        c.send_bytes(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).expect("send a garbage frame");
        let resp = c.recv().expect("an answer to a garbage frame");
        assert_eq!(code(&resp), Code::InvalidArgument, "{resp:?}");
    };
    let (n_unknown, n_denied, n_bad) = (5000, 1000, 1000);
    let lines_before = kekd.stderr().lines().count();

    let flooding = std::sync::atomic::AtomicBool::new(true);
    let started = Instant::now();
    let (served, slowest) = std::thread::scope(|s| {
        // A well-behaved client of the same tenant keeps being served throughout.
        let good = s.spawn(|| {
            let mut c = RawConn::open(&socket, "acme");
            let (mut n, mut slowest) = (0u64, Duration::ZERO);
            while flooding.load(std::sync::atomic::Ordering::Relaxed) || n < 10 {
                let t = Instant::now();
                let edek = batch_items(c.call(&req::wrap(2 * n, "default", &[b"still here".to_vec()], &[])))
                    .remove(0)
                    .edek;
                let back = batch_items(c.call(&req::unwrap(2 * n + 1, &[edek], &[]))).remove(0);
                assert_eq!(back.plaintext, b"still here");
                slowest = slowest.max(t.elapsed());
                n += 1;
            }
            (n, slowest)
        });
        flood(n_unknown, || hello_to("ghost", Code::NotFound));
        flood(n_denied, || hello_to("locked", Code::PermissionDenied));
        flood(n_bad, bad_frame);
        flooding.store(false, std::sync::atomic::Ordering::Relaxed);
        good.join().unwrap()
    });
    let flood_time = started.elapsed();
    let log = kekd.stderr();
    let new_lines = log.lines().count() - lines_before;
    eprintln!(
        "{} bad connections in {flood_time:?} gave {new_lines} log lines; the good client made {served} \
         wrap+unwrap round trips meanwhile, the slowest in {slowest:?}",
        n_unknown + n_denied + n_bad
    );

    // Each call site wrote its burst, then at most one line a second.
    let secs = flood_time.as_secs() + 1;
    for message in [UNKNOWN, DENIED, BAD_FRAME] {
        let lines = lines_of(&log, message);
        assert!(
            (BURST as usize..=(BURST + secs) as usize).contains(&lines.len()),
            "{} lines of {message:?} in {flood_time:?}:\n{}",
            lines.len(),
            lines.join("\n")
        );
    }
    assert!(new_lines as u64 <= 3 * (BURST + secs) + 10, "{new_lines} new lines:\n{log}");
    assert!(served >= 10, "the good client was served only {served} times");
    assert!(slowest < Duration::from_secs(5), "a round trip of the good client took {slowest:?}");

    // A second later each call site may write again, and its line counts what it left out
    // since its last line: every bad connection is either a line or in a count. (Under
    // load a flood may outlast a second, and a line allowed during it counts what was left
    // out until then; so the count may be on an earlier line than the last.)
    std::thread::sleep(Duration::from_millis(1200));
    hello_to("ghost", Code::NotFound);
    hello_to("locked", Code::PermissionDenied);
    bad_frame();
    let log = kekd.stderr();
    for (message, n) in [(UNKNOWN, n_unknown), (DENIED, n_denied), (BAD_FRAME, n_bad)] {
        let lines = lines_of(&log, message);
        assert!(
            lines.iter().any(|l| suppressed(l) > 0),
            "no {message:?} line names a count:\n{}",
            lines.join("\n")
        );
        let accounted: u64 = lines.iter().map(|l| 1 + suppressed(l)).sum();
        assert_eq!(
            accounted,
            n as u64 + 1,
            "{message:?}: lines and counts do not add up:\n{}",
            lines.join("\n")
        );
    }
}

/// `2026-01-31T12:34:56` anywhere in the line.
fn has_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    (0..b.len().saturating_sub(18)).any(|i| {
        digits(i..i + 4)
            && b[i + 4] == b'-'
            && digits(i + 5..i + 7)
            && b[i + 7] == b'-'
            && digits(i + 8..i + 10)
            && b[i + 10] == b'T'
            && digits(i + 11..i + 13)
            && b[i + 13] == b':'
    })
}

/// Some lines of each kind: a worker's ("tenant opened", at start), the supervisor's at
/// info (an unknown tenant) and at warning (a caller not allowed).
fn log_some_lines(kekd: &Kekd) -> String {
    kekd.kekctl_for("ghost").arg("status").run().assert_error(softhsm_tests::exit::NOT_FOUND, "NOT_FOUND");
    kekd.kekctl_for("locked")
        .arg("status")
        .run()
        .assert_error(softhsm_tests::exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    kekd.wait_for_log(DENIED, Duration::from_secs(5))
}

fn two_tenants() -> softhsm_tests::KekdBuilder {
    Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .tenant(Tenant::new("locked").allow_uid(4242).allow_gid(4242))
}

#[test]
fn on_the_journal_lines_carry_a_priority_and_no_timestamp() {
    let mut kekd = two_tenants().prepare();
    kekd.stderr_as_journal();
    kekd.start();
    let log = log_some_lines(&kekd);
    let line = |message: &str| {
        *lines_of(&log, message).first().unwrap_or_else(|| panic!("no {message:?} line in:\n{log}"))
    };
    // The workers' lines too: they were told through their (otherwise empty) environment.
    let opened = lines_of(&log, "tenant opened");
    assert_eq!(opened.len(), 2, "{log}");
    assert!(opened.iter().all(|l| l.starts_with("<6>")), "{log}");
    assert!(line(UNKNOWN).starts_with("<6>"), "{log}");
    assert!(line(DENIED).starts_with("<4>"), "{log}");
    for l in log.lines().filter(|l| !l.is_empty()) {
        let prio = l.get(..3).unwrap_or_default();
        assert!(["<3>", "<4>", "<6>", "<7>"].contains(&prio), "a line without its priority: {l:?}\n{log}");
        assert!(!has_timestamp(l), "a timestamp on the journal: {l:?}");
        assert!(!l.contains('\x1b'), "colours on the journal: {l:?}");
    }
}

#[test]
fn elsewhere_lines_carry_a_timestamp_and_no_priority() {
    let mut kekd = two_tenants().prepare();
    // JOURNAL_STREAM inherited from a journald-connected shell, with stderr redirected to
    // a file since: that file is no journal.
    kekd.env("JOURNAL_STREAM", "1:2");
    kekd.start();
    let log = log_some_lines(&kekd);
    for message in ["tenant opened", UNKNOWN, DENIED] {
        for l in lines_of(&log, message) {
            assert!(has_timestamp(l) && !l.starts_with('<'), "{l:?}");
        }
    }
}

#[test]
fn a_bad_log_level_is_a_config_error_naming_the_field() {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    let text = kekd.config_text();
    assert!(text.contains("log_level = \"info\"\n"), "{text}");
    for (level, ok) in [("info,kekd=debug", true), ("verbose", false), ("kekd=loud", false)] {
        kekd.write_config_text(&text.replace("log_level = \"info\"", &format!("log_level = {level:?}")));
        let out = kekd.check_config();
        if ok {
            out.ok();
        } else {
            assert_eq!(out.code, 1, "{level:?}: {}", out.stderr);
            assert!(out.stderr.starts_with("log_level: "), "{level:?}: {}", out.stderr);
        }
    }
}
