//! Memory hygiene (issue 9, point 3), read from outside as root would: once a KEK is
//! evicted, and once the worker has taken SIGTERM, its memory (`/proc/<pid>/mem`) holds no
//! copy of the KEK or of a data key it served; while KEKs are cached they are locked
//! (VmLck) in a mapping excluded from core dumps (MADV_DONTDUMP), and core dumps are off.
//!
//! The test KEK is recovered from its record with the token's root key, as a customer
//! holding the HSM would (docs/FORMATS.md §2), so the scan looks for the real bytes; each
//! scan is shown to work by finding them while they are meant to be there.

use std::fs;
use std::time::{Duration, Instant};

use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use softhsm_tests::{is_root, memory_contains, proc_file, proc_status_field, Backend, Kekd, Tenant};

/// The address ranges of `pid`'s readable mappings that hold `needle`.
fn mappings_holding(pid: u32, needle: &[u8]) -> Vec<String> {
    use std::os::unix::fs::FileExt;
    let mem = fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut found = Vec::new();
    for line in proc_file(pid, "maps").lines() {
        let range = line.split_whitespace().next().expect("a range");
        let (start, end) = range.split_once('-').expect("start-end");
        let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
        let mut buf = vec![0u8; (end - start) as usize];
        let Ok(n) = mem.read_at(&mut buf, start) else { continue };
        if buf[..n].windows(needle.len()).any(|w| w == needle) {
            found.push(range.to_owned());
        }
    }
    found
}

/// The `VmFlags` of the mapping `range` (`start-end` as in /proc/PID/maps).
fn vm_flags(pid: u32, range: &str) -> String {
    let smaps = proc_file(pid, "smaps");
    let block = smaps.split_once(range).unwrap_or_else(|| panic!("no mapping {range}")).1;
    let line = block.lines().find(|l| l.starts_with("VmFlags:")).expect("VmFlags");
    line.to_owned()
}

fn kb(field: &str) -> u64 {
    field.trim_end_matches(" kB").parse().unwrap_or_else(|_| panic!("not a size in kB: {field}"))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// kekd with one SoftHSM2 tenant; its default key's KEK (recovered from the token), a data
/// key, and that key's EDEK.
fn setup() -> (Kekd, Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme").backend(Backend::SoftHsm)).start();
    let (dek, edek) = kekd.generate("default", &[]);
    assert!(kekd.stop_with(Signal::SIGTERM).success());
    let kek = kekd.recover_kek("acme", "default", 1);
    kekd.start();
    (kekd, kek, dek, edek)
}

#[test]
fn an_evicted_kek_and_the_keys_it_served_leave_no_copy_in_the_workers_memory() {
    if !is_root() {
        eprintln!("NOT RUN: reading another process's memory needs root");
        return;
    }
    let (kekd, kek, dek, edek) = setup();
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &dek[..]);
    let worker = kekd.worker_pid("acme");

    // Cached: the KEK is in exactly one place, the locked arena, which core dumps skip.
    let holding = mappings_holding(worker, &kek);
    assert_eq!(holding.len(), 1, "the KEK is in one mapping (the arena), found in {holding:?}");
    let flags = vm_flags(worker, &holding[0]);
    assert!(flags.contains(" dd"), "the arena is MADV_DONTDUMP: {flags}");
    assert!(flags.contains(" lo"), "the arena is mlocked: {flags}");
    assert!(kb(&proc_status_field(worker, "VmLck")) > 0, "VmLck while KEKs are cached");
    let limits = proc_file(worker, "limits");
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).expect("a core limit");
    assert!(core.split_whitespace().skip(4).take(2).all(|v| v == "0"), "core dumps are off: {core}");

    // Evicted (disabling the version evicts it at once; idle_ttl and a revoked root key
    // go through the same eviction): nothing of the KEK, nor of the data key it unwrapped,
    // remains.
    kekd.keys(["disable", "default", "--version", "1"]).ok();
    wait_until("the KEK is evicted", || {
        kekd.kekctl().json().arg("status").run().json()["cached_keks"].as_u64() == Some(0)
    });
    assert!(!memory_contains(worker, &kek), "a copy of the evicted KEK is in the worker's memory");
    assert!(!memory_contains(worker, &dek), "a copy of a served data key is in the worker's memory");
}

#[test]
fn after_sigterm_the_exiting_worker_holds_no_kek_or_data_key() {
    if !is_root() {
        eprintln!("NOT RUN: tracing and reading another process's memory needs root");
        return;
    }
    let (mut kekd, kek, dek, edek) = setup();
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &dek[..]);
    let worker = kekd.worker_pid("acme");
    assert!(memory_contains(worker, &kek), "the scan finds the cached KEK (the control)");

    // Stop the worker at its very end, after its SIGTERM handling and before the kernel
    // takes its memory away (PTRACE_EVENT_EXIT), and read it there.
    let pid = Pid::from_raw(worker as i32);
    ptrace::seize(pid, ptrace::Options::PTRACE_O_TRACEEXIT).expect("seize the worker");
    kekd.signal(Signal::SIGTERM);
    let mut scanned = false;
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)).expect("waitpid") {
            WaitStatus::PtraceEvent(_, _, event) if event == ptrace::Event::PTRACE_EVENT_EXIT as i32 => {
                assert!(!memory_contains(worker, &kek), "the exiting worker still holds the KEK");
                assert!(!memory_contains(worker, &dek), "the exiting worker still holds a data key");
                scanned = true;
                let _ = ptrace::cont(pid, None);
            }
            // A signal on its way to the worker (its SIGTERM): deliver it.
            WaitStatus::Stopped(_, sig) => ptrace::cont(pid, Some(sig)).expect("continue"),
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => break,
            _ => {
                let _ = ptrace::cont(pid, None);
            }
        }
    }
    assert!(scanned, "the worker was not seen exiting");
    assert!(kekd.wait_exit(Duration::from_secs(30)).success(), "{}", kekd.stderr());
}
