//! systemd integration (issue "[ops] vsock transport and systemd integration", point 3).
//!
//! - The units in `systemd/` pass `systemd-analyze verify`, and `systemd-analyze security`
//!   rates kekd.service 2.5 or better; the example config is accepted by `kekd
//!   check-config` and agrees with the units on every path; the tmpfiles.d and sysusers.d
//!   snippets apply.
//! - The unit's privileges are enough: kekd runs under the unit's capability bounding set,
//!   `no_new_privs`, LimitMEMLOCK, LimitCORE and UMask (applied with setpriv, prlimit and
//!   umask, since no systemd runs these tests) with a tenant whose worker switches user,
//!   and every system call it makes is one the unit's SystemCallFilter allows.
//! - Socket activation: kekd serves the listening socket it is given as descriptor 3
//!   (`LISTEN_FDS`, `LISTEN_PID`), leaves its file alone at exit, and a restarted kekd
//!   serves the same socket; `systemd-socket-activate` (systemd's own implementation of
//!   the protocol) starts it on the first connection.
//! - sd_notify: READY=1 once serving, WATCHDOG=1 every WATCHDOG_USEC/2 from the
//!   supervisor itself (a stopped supervisor stops pinging), RELOADING=1 and READY=1
//!   around SIGHUP, STOPPING=1 on SIGTERM; to a path or an abstract socket.
//!
//! None of this needs systemd as PID 1: `systemd-analyze` works offline on unit files.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use softhsm_tests::activation::{activated_command, ActivatedKekd};
use softhsm_tests::{
    bin, is_root, proc_file, test_dir, wait_deadline, Backend, Kekctl, Kekd, Tenant, NOBODY_GID, NOBODY_UID,
};

/// The exposure score `systemd-analyze security` may give kekd.service at most.
const MAX_EXPOSURE: f64 = 2.5;

// ---------------------------------------------------------------------------------------
// The unit files

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn read_unit_file(name: &str) -> String {
    let path = systemd_dir().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `systemd-analyze ARGS`; panics if the tool is missing.
fn systemd_analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .env("SYSTEMD_PAGER", "")
        .env("SYSTEMD_COLORS", "0")
        .output()
        .expect("run systemd-analyze (Debian package systemd; ./scripts/install-deps installs it)")
}

/// Copies of kekd.service and kekd.socket in `dir`, with `/usr/bin/kekd` replaced by the
/// binary under test: `verify` checks that ExecStart= names an executable.
fn units_for_analysis(dir: &Path) -> (PathBuf, PathBuf) {
    let kekd = bin("kekd");
    let kekd = kekd.to_str().expect("UTF-8 path");
    for name in ["kekd.service", "kekd.socket"] {
        let text = read_unit_file(name);
        fs::write(dir.join(name), text.replace("/usr/bin/kekd", kekd)).expect("write a unit copy");
    }
    (dir.join("kekd.service"), dir.join("kekd.socket"))
}

/// The values of `key` in `section` of a unit file, in order (repeated keys add up).
fn unit_values(text: &str, section: &str, key: &str) -> Vec<String> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line.trim_matches(|c| c == '[' || c == ']').to_owned();
        } else if !line.starts_with('#') && current == section {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    out.push(v.trim().to_owned());
                }
            }
        }
    }
    out
}

fn unit_value(text: &str, section: &str, key: &str) -> String {
    let values = unit_values(text, section, key);
    assert_eq!(values.len(), 1, "{key}= in [{section}]: {values:?}");
    values.into_iter().next().unwrap()
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let dir = test_dir();
    let (service, socket) = units_for_analysis(dir.path());
    let out = systemd_analyze(&["verify", "--man=no", socket.to_str().unwrap(), service.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {}\n{stderr}", out.status);
    // Unknown keys and bad values are only warnings to verify: none is allowed.
    assert!(stderr.trim().is_empty(), "systemd-analyze verify warns:\n{stderr}");
}

#[test]
fn the_service_rates_at_most_2_5_in_systemd_analyze_security() {
    let dir = test_dir();
    let (service, _) = units_for_analysis(dir.path());
    let out = systemd_analyze(&["security", "--offline=true", "--no-pager", service.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze security: {}\n{stdout}\n{stderr}", out.status);
    let overall = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for kekd.service"))
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{stdout}\n{stderr}"));
    let score: f64 = overall
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the score of {overall:?}"));
    println!("systemd-analyze security kekd.service: exposure {score} ({})", overall.trim());
    for line in stdout.lines().filter(|l| l.starts_with('✗')) {
        println!("  {}", line.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    assert!(score <= MAX_EXPOSURE, "exposure {score} is above {MAX_EXPOSURE}:\n{stdout}");
    // The comment at the top of the unit quotes the score: keep it true.
    assert!(
        read_unit_file("kekd.service").contains(&format!("rates this unit {score:.1} ")),
        "update the score quoted at the top of systemd/kekd.service to {score:.1}"
    );
}

#[test]
fn the_example_config_is_accepted_and_agrees_with_the_units() {
    let example = systemd_dir().join("kekd.toml");
    // The PIN comes from the service's environment (EnvironmentFile=), as in production.
    let mut cmd = Command::new(bin("kekd"));
    cmd.args(["check-config", "--config"]).arg(&example).env("KEKD_PIN_ACME", "1234");
    let out = cmd.output().expect("run kekd check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "config OK: 1 tenant(s)");

    // Without it, the error names the field and the variable.
    let out = Command::new(bin("kekd"))
        .args(["check-config", "--config"])
        .arg(&example)
        .env_remove("KEKD_PIN_ACME")
        .output()
        .expect("run kekd check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("tenants.acme.pkcs11.pin_env"), "{stderr}");

    // The paths agree: the socket kekd.socket listens on is the config's, and every
    // directory kekd writes is writable under ProtectSystem=strict and made by tmpfiles.d.
    let config = fs::read_to_string(&example).unwrap();
    let setting = |key: &str| -> String {
        config
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in kekd.toml"))
            .trim_matches('"')
            .to_owned()
    };
    let socket = setting("socket");
    let state_dir = setting("state_dir");
    let audit_dir = setting("dir");
    assert_eq!(socket, "/run/kekd/kekd.sock", "config.rs's default");
    assert_eq!(state_dir, "/var/lib/kekd", "config.rs's default");
    assert_eq!(audit_dir, "/var/log/kekd/audit", "config.rs's default");

    let unit_socket = read_unit_file("kekd.socket");
    let listen = unit_values(&unit_socket, "Socket", "ListenStream");
    assert_eq!(listen, std::slice::from_ref(&socket), "kekd.socket listens on the config's socket");
    let service = read_unit_file("kekd.service");
    let writable: Vec<String> = unit_values(&service, "Service", "ReadWritePaths")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let tmpfiles = read_unit_file("kekd.tmpfiles.conf");
    let made: BTreeMap<String, String> = tmpfiles
        .lines()
        .filter(|l| l.starts_with("d "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1].to_owned(), f[2].to_owned())
        })
        .collect();
    let socket_dir = Path::new(&socket).parent().unwrap().to_str().unwrap().to_owned();
    for dir in [&state_dir, &audit_dir, &socket_dir] {
        assert!(
            writable.iter().any(|w| Path::new(dir).starts_with(w)),
            "{dir} is not in ReadWritePaths= {writable:?}"
        );
        assert!(made.contains_key(dir.as_str()), "tmpfiles.d does not create {dir}: {made:?}");
    }
    // Run-as workers must pass through the key store and the audit trail.
    for dir in [&state_dir, &audit_dir] {
        assert_eq!(made[dir.as_str()], "0711", "{dir}");
    }
    let exec = unit_value(&service, "Service", "ExecStart");
    assert_eq!(exec, "/usr/bin/kekd run --config /etc/kekd/kekd.toml");
}

#[test]
fn tmpfiles_and_sysusers_snippets_apply() {
    let dir = test_dir();
    let root = dir.path().join("root");
    for (snippet, tool, dest) in [
        ("kekd.tmpfiles.conf", "systemd-tmpfiles", "usr/lib/tmpfiles.d"),
        ("kekd.sysusers.conf", "systemd-sysusers", "usr/lib/sysusers.d"),
    ] {
        fs::create_dir_all(root.join(dest)).unwrap();
        fs::copy(systemd_dir().join(snippet), root.join(dest).join("kekd.conf")).unwrap();
        let mut cmd = Command::new(tool);
        cmd.arg(format!("--root={}", root.display()));
        if tool == "systemd-tmpfiles" {
            cmd.arg("--create");
        }
        let out = cmd.arg("kekd.conf").output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(out.status.success(), "{tool}: {out:?}");
    }
    for (path, mode) in [
        ("var/lib/kekd", 0o711),
        ("var/lib/kekd/tenants", 0o711),
        ("var/log/kekd", 0o711),
        ("var/log/kekd/audit", 0o711),
        ("run/kekd", 0o755),
    ] {
        let meta = fs::metadata(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(meta.is_dir(), "{path}");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path}");
        assert_eq!(meta.uid(), 0, "{path}");
    }
    let group = fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("kekd:x:")), "no group kekd in:\n{group}");
    assert_eq!(
        unit_value(&read_unit_file("kekd.socket"), "Socket", "SocketGroup"),
        "kekd",
        "the socket's group is the one sysusers.d creates"
    );
}

// ---------------------------------------------------------------------------------------
// The unit's confinement, applied without systemd

/// The unit's `CapabilityBoundingSet=`, as setpriv's `-all,+cap,...`.
fn unit_bounding_set() -> String {
    let service = read_unit_file("kekd.service");
    let caps = unit_value(&service, "Service", "CapabilityBoundingSet");
    let mut set = String::from("-all");
    for cap in caps.split_whitespace() {
        let name = cap.strip_prefix("CAP_").unwrap_or_else(|| panic!("{cap}")).to_lowercase();
        set.push_str(&format!(",+{name}"));
    }
    set
}

/// The unit's `LimitMEMLOCK=` in bytes, or the test's own hard limit if that is lower:
/// raising it takes CAP_SYS_RESOURCE, which systemd has and a container may not.
fn memlock_for_test() -> u64 {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK).unwrap();
    let unit = unit_memlock();
    if hard < unit {
        println!("LimitMEMLOCK={unit} is above this process's hard limit {hard}: testing with {hard}");
    }
    unit.min(hard)
}

/// The unit's `LimitMEMLOCK=` in bytes.
fn unit_memlock() -> u64 {
    let v = unit_value(&read_unit_file("kekd.service"), "Service", "LimitMEMLOCK");
    let (digits, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = digits.parse().unwrap_or_else(|_| panic!("LimitMEMLOCK={v}"));
    n * match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => panic!("LimitMEMLOCK={v}"),
    }
}

/// Runs kekd as kekd.service would: the unit's capability bounding set and no_new_privs
/// (setpriv), its LimitMEMLOCK and LimitCORE (prlimit), its UMask.
fn confine_like_the_unit(kekd: &mut Kekd) {
    let service = read_unit_file("kekd.service");
    assert_eq!(unit_value(&service, "Service", "NoNewPrivileges"), "yes");
    assert_eq!(unit_value(&service, "Service", "LimitCORE"), "0");
    let umask = unit_value(&service, "Service", "UMask");
    let memlock = memlock_for_test();
    // prlimit first: raising the hard limit needs CAP_SYS_RESOURCE, which setpriv drops.
    kekd.wrap_with([
        "prlimit".to_owned(),
        format!("--memlock={memlock}:{memlock}"),
        "--core=0:0".to_owned(),
        "--".to_owned(),
        "setpriv".to_owned(),
        "--no-new-privs".to_owned(),
        "--bounding-set".to_owned(),
        unit_bounding_set(),
        "--inh-caps".to_owned(),
        "-all".to_owned(),
        "sh".to_owned(),
        "-c".to_owned(),
        format!("umask {umask} && exec \"$0\" \"$@\""),
    ]);
}

#[test]
fn the_units_privileges_are_enough_for_a_worker_that_switches_user() {
    if !is_root() {
        eprintln!("SKIPPED (needs root): the unit's capability set, and a worker switching user");
        return;
    }
    // SoftHSM2: its token files are handed to the worker's user, as an operator would.
    let mut kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme").allow_uid(NOBODY_UID).run_as("nobody").backend(Backend::SoftHsm))
        .prepare();
    // kekd creates the audit directory itself, under the unit's UMask (0077), and still
    // lets the worker's user through it.
    let audit = kekd.dir().join("audit");
    assert!(!audit.exists());
    confine_like_the_unit(&mut kekd);

    // First start as root's own worker: it creates the root key and the key store.
    let config = kekd.config_text();
    kekd.write_config_text(&config.replace("run_as = \"nobody\"\n", ""));
    kekd.start();
    assert_eq!(fs::metadata(&audit).unwrap().permissions().mode() & 0o777, 0o711, "whatever the umask");
    let (plain, edek) = kekd.generate("default", &[]);
    assert!(kekd.stop_with(Signal::SIGTERM).success(), "{}", kekd.stderr());
    let tokens = kekd.softhsm().unwrap().token_dir().to_path_buf();
    let out = Command::new("chown").arg("-R").arg(format!("{NOBODY_UID}:{NOBODY_GID}")).arg(&tokens).output();
    assert!(out.as_ref().is_ok_and(|o| o.status.success()), "chown: {out:?}");

    // Then with run_as: the worker (CAP_SETUID, CAP_SETGID) hands its key store and audit
    // trail to nobody (CAP_CHOWN) and switches; started again, it reopens them as root
    // before switching (CAP_DAC_OVERRIDE).
    kekd.write_config_text(&config);
    kekd.start();
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
    assert!(kekd.stop_with(Signal::SIGTERM).success(), "{}", kekd.stderr());
    kekd.start();
    let supervisor = kekd.pid().unwrap();
    let worker = kekd.worker_pid("acme");
    assert_eq!(softhsm_tests::proc_status_field(worker, "Uid"), format!("{0} {0} {0} {0}", NOBODY_UID));
    assert_eq!(softhsm_tests::proc_status_field(supervisor, "NoNewPrivs"), "1");
    let limits = proc_file(supervisor, "limits");
    let memlock = limits.lines().find(|l| l.starts_with("Max locked memory")).expect("a memlock line");
    assert_eq!(memlock.split_whitespace().nth(3), Some(memlock_for_test().to_string().as_str()), "{memlock}");

    // Served as before, to its admin (root) and to nobody, whose executable the audit
    // trail names (the supervisor reads /proc/PID/exe of another user: CAP_SYS_PTRACE).
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
    kekd.keys(["rotate", "default"]).ok();
    let by_nobody = kekd
        .kekctl()
        .as_user(NOBODY_UID, NOBODY_GID)
        .args(["wrap", "--key", "default"])
        .stdin(&b"x"[..])
        .run();
    let theirs = by_nobody.ok().to_vec();
    assert_eq!(kekd.unwrap(&theirs, &[]).ok(), b"x");
    let record = kekd.wait_audit("acme", Duration::from_secs(5), |r| {
        r["event"] == "wrap" && r["peer"]["uid"] == NOBODY_UID
    });
    let exe = record["peer"]["exe"].as_str().unwrap_or_else(|| panic!("no exe in {record}"));
    assert!(exe.ends_with("/kekctl"), "{record}");

    // SIGHUP with a changed tenant: the supervisor stops nobody's worker at once (SIGTERM
    // to another user: CAP_KILL) and starts another, well within the drain bound (10 s)
    // that would otherwise end the old worker.
    kekd.write_config_text(&config.replace("[tenants.acme]\n", "[tenants.acme]\nidle_ttl = \"7m\"\n"));
    kekd.signal(Signal::SIGHUP);
    kekd.wait_for_log("configuration reloaded", Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_worker = loop {
        let out = kekd.kekctl().json().arg("status").run();
        if out.code == 0 {
            let pid = out.json()["worker_pid"].as_u64().unwrap() as u32;
            if pid != worker {
                break pid;
            }
        }
        assert!(Instant::now() < deadline, "the worker was not replaced:\n{}", kekd.stderr());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!Path::new(&format!("/proc/{worker}")).exists(), "the old worker {worker} is still there");
    assert_eq!(softhsm_tests::proc_status_field(new_worker, "Uid"), format!("{0} {0} {0} {0}", NOBODY_UID));
    assert_eq!(kekd.unwrap(&theirs, &[]).ok(), b"x");
    kekd.signal(Signal::SIGTERM);
    assert!(kekd.wait_exit(Duration::from_secs(5)).success(), "{}", kekd.stderr());
    let log = kekd.stderr();
    assert!(!log.contains("did not stop within") && !log.contains("Operation not permitted"), "{log}");
}

/// Every system call of a group of `systemd-analyze syscall-filter`, nested groups
/// included.
fn syscall_group(group: &str, cache: &mut BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if let Some(s) = cache.get(group) {
        return s.clone();
    }
    let out = systemd_analyze(&["syscall-filter", "--no-pager", group]);
    assert!(out.status.success(), "systemd-analyze syscall-filter {group}: {out:?}");
    let mut set = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('@') {
            set.extend(syscall_group(line, cache));
        } else {
            set.insert(line.to_owned());
        }
    }
    cache.insert(group.to_owned(), set.clone());
    set
}

/// What the unit's SystemCallFilter= lines allow: the first is an allow list, each
/// later `~` line takes groups away.
fn unit_allowed_syscalls() -> BTreeSet<String> {
    let mut cache = BTreeMap::new();
    let mut allowed = BTreeSet::new();
    for (i, line) in
        unit_values(&read_unit_file("kekd.service"), "Service", "SystemCallFilter").iter().enumerate()
    {
        match line.strip_prefix('~') {
            Some(denied) => {
                assert!(i > 0, "the first SystemCallFilter= is the allow list");
                for item in denied.split_whitespace() {
                    let set = if item.starts_with('@') {
                        syscall_group(item, &mut cache)
                    } else {
                        [item.to_owned()].into()
                    };
                    allowed.retain(|s| !set.contains(s));
                }
            }
            None => {
                for item in line.split_whitespace() {
                    if item.starts_with('@') {
                        allowed.extend(syscall_group(item, &mut cache));
                    } else {
                        allowed.insert(item.to_owned());
                    }
                }
            }
        }
    }
    allowed
}

#[test]
fn every_system_call_kekd_makes_is_allowed_by_the_units_filter() {
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is missing: ./scripts/install-deps installs it");
    }
    let allowed = unit_allowed_syscalls();
    assert!(allowed.contains("read") && !allowed.contains("ptrace") && !allowed.contains("mount"));

    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    let trace = kekd.dir().join("strace.out");
    let notify = kekd.dir().join("notify.sock");
    let _listener = UnixDatagram::bind(&notify).unwrap();
    // Every process kekd starts is traced too (-f): the workers and the PKCS#11 module.
    kekd.wrap_with([
        "strace".to_owned(),
        "-f".to_owned(),
        "-qq".to_owned(),
        "-o".to_owned(),
        trace.to_str().unwrap().to_owned(),
        "env".to_owned(),
        format!("NOTIFY_SOCKET={}", notify.display()),
        "WATCHDOG_USEC=100000".to_owned(),
    ]);
    kekd.start();
    // Signals go to kekd, strace's child (env execs it), not to strace.
    let tracer = kekd.pid().unwrap();
    let children = proc_file(tracer, &format!("task/{tracer}/children"));
    let supervisor = Pid::from_raw(children.trim().parse().expect("strace runs one child: kekd"));
    let (plain, edek) = kekd.generate("default", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
    kekd.keys(["rotate", "default"]).ok();
    kekd.write_config_text(
        &kekd.config_text().replace("[tenants.acme]\n", "[tenants.acme]\nidle_ttl = \"7m\"\n"),
    );
    kill(supervisor, Signal::SIGHUP).unwrap();
    kekd.wait_for_log("configuration reloaded", Duration::from_secs(30));
    let out = kekd.kekctl().arg("status").run();
    assert_eq!(out.code, 0, "{out:?}");
    kill(supervisor, Signal::SIGTERM).unwrap();
    assert!(kekd.wait_exit(Duration::from_secs(60)).success(), "{}", kekd.stderr());

    let text = fs::read_to_string(&trace).unwrap();
    let mut used = BTreeSet::new();
    for line in text.lines() {
        // `PID name(args...) = ...`; resumed and signal lines name no new call.
        let Some((_, rest)) = line.split_once(char::is_whitespace) else { continue };
        let rest = rest.trim_start();
        if let Some(paren) = rest.find('(') {
            let name = &rest[..paren];
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                used.insert(name.to_owned());
            }
        }
    }
    assert!(used.contains("execve") && used.contains("accept4"), "strace saw: {used:?}");
    // execve of kekd itself happens before systemd's filter applies to the real service
    // too; everything else must be allowed.
    let refused: Vec<&String> = used.iter().filter(|s| !allowed.contains(*s)).collect();
    println!("kekd made {} distinct system calls; all allowed: {}", used.len(), refused.is_empty());
    assert!(
        refused.is_empty(),
        "system calls kekd makes that kekd.service's SystemCallFilter= refuses: {refused:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Socket activation

fn socket_inode(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).ino()
}

#[test]
fn kekd_serves_the_socket_systemd_passes_and_leaves_it_in_place() {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    let config = kekd.config_path().unwrap().to_owned();
    // Somewhere else than the configured socket: the activated one wins.
    let path = kekd.dir().join("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    let inode = socket_inode(&path);
    let kekctl = || Kekctl::new().socket(&path).tenant("acme");

    let daemon = ActivatedKekd::start(&listener, &config, &kekd.dir().join("kekd-1.stderr"));
    assert_eq!(daemon.ready, path.to_str().unwrap(), "the ready line names the activated socket");
    assert!(!kekd.socket().exists(), "kekd bound the configured socket as well");
    let edek = kekctl().args(["wrap", "--key", "default"]).stdin(&b"activated"[..]).run().ok().to_vec();
    assert_eq!(kekctl().arg("unwrap").stdin(edek.clone()).run().ok(), b"activated");
    let log = daemon.stderr();
    assert!(log.contains("serving the socket systemd passed"), "{log}");
    // Not inherited by the worker: it is close-on-exec in the supervisor.
    let worker = kekctl().json().arg("status").run().json()["worker_pid"].as_u64().unwrap() as u32;
    let listening = softhsm_tests::unix_socket_inode(&path);
    assert!(
        !softhsm_tests::open_fds(worker).iter().any(|fd| fd.contains(&listening)),
        "the worker holds the listening socket"
    );

    assert!(daemon.stop().success());
    // systemd's file: still there, still the same socket, still listening (connections
    // queue until the next start).
    assert_eq!(socket_inode(&path), inode, "kekd removed or replaced the activated socket");
    let queued = std::os::unix::net::UnixStream::connect(&path).expect("the socket still listens");
    drop(queued);

    // A restart (as systemd does after a crash or an upgrade) serves the same socket.
    let daemon = ActivatedKekd::start(&listener, &config, &kekd.dir().join("kekd-2.stderr"));
    assert_eq!(kekctl().arg("unwrap").stdin(edek).run().ok(), b"activated");
    assert!(daemon.stop().success());
    assert_eq!(socket_inode(&path), inode);
}

#[test]
fn a_listen_pid_of_another_process_is_ignored_and_kekd_binds_its_socket() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    // As if inherited from a socket-activated parent: meant for pid 1, not for kekd.
    kekd.wrap_with(["env", "LISTEN_PID=1", "LISTEN_FDS=1"]);
    kekd.start();
    assert!(kekd.socket().exists());
    let edek = kekd.wrap("default", b"bound", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"bound");
    assert!(kekd.stop_with(Signal::SIGTERM).success());
    assert!(!kekd.socket().exists(), "kekd removes the socket it bound itself");
}

#[test]
fn a_passed_descriptor_that_is_not_a_listening_socket_stops_the_start() {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    let path = kekd.dir().join("not-listening.sock");
    // A bound datagram socket: kekd serves stream sockets only.
    let dgram = UnixDatagram::bind(&path).unwrap();
    let out = activated_command(dgram.as_raw_fd(), kekd.config_path().unwrap())
        .stdin(Stdio::null())
        .output()
        .expect("run kekd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("socket activation: descriptor 3") && stderr.contains("Datagram"), "{stderr}");
    assert!(!kekd.socket().exists(), "kekd bound its own socket instead");
}

#[test]
fn systemd_socket_activate_starts_kekd_on_the_first_connection() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    let socket = kekd.socket().to_owned();
    // systemd's own implementation of the protocol (LISTEN_FDS, LISTEN_PID,
    // LISTEN_FDNAMES): it listens, and execs kekd when the first client knocks.
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg("--fdname=kekd")
        .arg(bin("kekd"))
        .args(["run", "--config"])
        .arg(kekd.config_path().unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(kekd.dir().join("activate.stderr")).unwrap())
        .process_group(0)
        .spawn()
        .expect("run systemd-socket-activate (Debian package systemd)");
    struct Reap(Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "systemd-socket-activate did not listen");
        assert!(child.try_wait().unwrap().is_none(), "systemd-socket-activate exited");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut child = Reap(child);
    // The first client waits in the backlog while kekd starts its worker.
    let edek = kekd.wrap("default", b"on demand", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"on demand");
    assert_eq!(proc_file(pid, "comm").trim(), "kekd", "kekd runs in systemd-socket-activate's place");
    let log = fs::read_to_string(kekd.dir().join("activate.stderr")).unwrap();
    assert!(log.contains("serving the socket systemd passed") && log.contains("name=\"kekd\""), "{log}");
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = wait_deadline(&mut child.0, Duration::from_secs(30)).expect("kekd stops");
    assert!(status.success(), "{status}");
    kekd.kill();
}

// ---------------------------------------------------------------------------------------
// sd_notify

/// The test's end of NOTIFY_SOCKET.
struct Notifications(UnixDatagram);

impl Notifications {
    fn next(&self, timeout: Duration) -> Option<String> {
        self.0.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        match self.0.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                None
            }
            Err(e) => panic!("receive a notification: {e}"),
        }
    }

    /// Waits for a message containing `line`, skipping WATCHDOG=1 pings; panics with what
    /// came instead.
    #[track_caller]
    fn expect(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while let Some(msg) = self.next(deadline.saturating_duration_since(Instant::now())) {
            if msg.lines().any(|l| l == line) {
                return msg;
            }
            if msg != "WATCHDOG=1" {
                seen.push(msg);
            }
        }
        panic!("no {line:?} notification; got {seen:?}");
    }

    /// Counts WATCHDOG=1 pings during `window`; anything else is a failure.
    #[track_caller]
    fn count_pings(&self, window: Duration) -> usize {
        let end = Instant::now() + window;
        let mut pings = 0;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return pings;
            }
            match self.next(left) {
                Some(m) if m == "WATCHDOG=1" => pings += 1,
                Some(m) => panic!("unexpected notification {m:?}"),
                None => return pings,
            }
        }
    }

    fn drain(&self) {
        while self.next(Duration::from_millis(1)).is_some() {}
    }
}

#[test]
fn kekd_notifies_ready_pings_the_watchdog_and_notifies_reload_and_stop() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    let path = kekd.dir().join("notify.sock");
    let notes = Notifications(UnixDatagram::bind(&path).unwrap());
    // 200 ms: a ping every 100 ms.
    kekd.wrap_with([
        "env".to_owned(),
        format!("NOTIFY_SOCKET={}", path.display()),
        "WATCHDOG_USEC=200000".to_owned(),
    ]);
    kekd.start();

    let ready = notes.next(Duration::from_secs(5)).expect("a READY=1 notification");
    assert!(ready.lines().any(|l| l == "READY=1"), "the first notification is READY=1: {ready:?}");
    assert!(ready.contains("STATUS=serving 1 tenant(s) on "), "{ready:?}");
    let pings = notes.count_pings(Duration::from_secs(1));
    assert!((4..=15).contains(&pings), "{pings} watchdog pings in 1 s, expected about 10");

    // The pings come from the supervisor's own event loop: stopped, it stops pinging.
    kekd.signal(Signal::SIGSTOP);
    let pid = kekd.pid().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    // Stopped for sure (state T) before the last pings are drained.
    while !proc_file(pid, "stat").rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    {
        assert!(Instant::now() < deadline, "kekd did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(20));
    notes.drain();
    assert_eq!(notes.count_pings(Duration::from_millis(600)), 0, "pings from a stopped supervisor");
    kekd.signal(Signal::SIGCONT);
    assert!(notes.count_pings(Duration::from_millis(600)) >= 2, "pings resume");

    // The workers get none of it: nothing but the supervisor can notify systemd.
    if is_root() {
        let worker = kekd.worker_pid("acme");
        let environ = proc_file(worker, "environ");
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_"] {
            assert!(!environ.contains(var), "the worker's environment has {var}: {environ:?}");
        }
    }

    kekd.signal(Signal::SIGHUP);
    let reloading = notes.expect("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    notes.expect("READY=1");

    kekd.signal(Signal::SIGTERM);
    let stopping = notes.expect("STOPPING=1");
    assert!(stopping.contains("STATUS=stopping"), "{stopping:?}");
    assert!(kekd.wait_exit(Duration::from_secs(30)).success(), "{}", kekd.stderr());
}

#[test]
fn an_abstract_notify_socket_works_and_a_watchdog_meant_for_another_process_is_not_pinged() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    let dir_name = kekd.dir().file_name().unwrap().to_str().unwrap().to_owned();
    let name = format!("kekd-test-notify-{dir_name}");
    let addr = <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
        name.as_bytes(),
    )
    .unwrap();
    let notes = Notifications(UnixDatagram::bind_addr(&addr).unwrap());
    kekd.wrap_with([
        "env".to_owned(),
        format!("NOTIFY_SOCKET=@{name}"),
        "WATCHDOG_USEC=100000".to_owned(),
        "WATCHDOG_PID=1".to_owned(),
    ]);
    kekd.start();
    notes.expect("READY=1");
    assert_eq!(notes.count_pings(Duration::from_millis(500)), 0, "WATCHDOG_PID names another process");
    kekd.signal(Signal::SIGTERM);
    notes.expect("STOPPING=1");
    assert!(kekd.wait_exit(Duration::from_secs(30)).success());
}
