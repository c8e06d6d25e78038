//! The vsock listener (issue 7, points 1 and 2) through the real binaries.
//!
//! The hand-off and the CID check are shown over Unix sockets in the daemon's own tests
//! (`supervisor::handshake`). Here: kekd really holds its vsock port, fails to start by name
//! when it cannot, and lets it go at shutdown; and a guest's whole path (kekctl --vsock, the
//! ACL by CID, the audit record naming the CID) runs where this machine has a vsock
//! loopback. Machines without one (these VMs) say so plainly. Nothing here connects to any
//! CID but 1, the local loopback.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::socket::{
    bind, connect, getsockname, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use softhsm_tests::activation::ActivatedKekd;
use softhsm_tests::{config_edit_tenant, exit, Kekd, Tenant};

const VMADDR_CID_ANY: u32 = u32::MAX;
const VMADDR_PORT_ANY: u32 = u32::MAX;
const VMADDR_CID_LOCAL: u32 = 1;

fn vsock_socket(flags: SockFlag) -> OwnedFd {
    socket(AddressFamily::Vsock, SockType::Stream, flags | SockFlag::SOCK_CLOEXEC, None)
        .expect("a vsock socket")
}

/// A port nobody holds right now, picked by the kernel.
fn free_port() -> u32 {
    let s = vsock_socket(SockFlag::empty());
    bind(s.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, VMADDR_PORT_ANY)).expect("bind any vsock port");
    getsockname::<VsockAddr>(s.as_raw_fd()).expect("getsockname").port()
}

/// Whether some socket holds `port` (on every CID, as kekd binds it).
fn port_held(port: u32) -> bool {
    let s = vsock_socket(SockFlag::empty());
    match bind(s.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port)) {
        Ok(()) => false,
        Err(Errno::EADDRINUSE) => true,
        Err(e) => panic!("binding vsock port {port}: {e}"),
    }
}

/// Connects to `port` on CID 1 within a second: `Err` says why this machine cannot.
fn loopback(port: u32) -> Result<(), String> {
    let s = vsock_socket(SockFlag::SOCK_NONBLOCK);
    match connect(s.as_raw_fd(), &VsockAddr::new(VMADDR_CID_LOCAL, port)) {
        Ok(()) => return Ok(()),
        Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.to_string()),
    }
    let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(&s), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::try_from(Duration::from_secs(1)).expect("1s")) {
        Ok(0) => Err("no answer within 1s".into()),
        Ok(_) => match nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::SocketError) {
            Ok(0) => Ok(()),
            Ok(errno) => Err(Errno::from_raw(errno).to_string()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    }
}

/// kekd for tenants `acme` (guests `cids` allowed) and `other` (no guests), listening on
/// vsock `port` too.
fn with_vsock(port: u32, cids: &str) -> Kekd {
    let kekd =
        Kekd::builder().tenant(Tenant::owned_by_me("acme")).tenant(Tenant::owned_by_me("other")).prepare();
    let text = config_edit_tenant(&kekd.config_text(), "acme", |t| {
        t.replacen("[tenants.acme]\n", &format!("[tenants.acme]\nallow_cids = [{cids}]\n"), 1)
    });
    kekd.write_config_text(&format!("vsock_port = {port}\n{text}"));
    kekd
}

#[test]
fn kekd_holds_its_vsock_port_while_serving_and_names_it_when_it_cannot() {
    let port = free_port();
    let mut kekd = with_vsock(port, "5");
    kekd.start();
    assert!(port_held(port), "kekd listens on vsock port {port}");
    // Local callers are served as before, beside the guests' listener.
    kekd.kekctl().arg("status").run().ok();

    // A second daemon cannot take the port, fails to start, and says which port.
    let mut second = with_vsock(port, "5");
    let failure = second.try_start().expect_err("the port is taken");
    assert!(failure.status.is_some(), "it exits rather than hanging: {failure}");
    assert!(failure.stderr.contains(&format!("vsock port {port}")), "the error names the port: {failure}");
    assert!(!second.socket().exists(), "a failed start leaves no socket file behind");

    // The first one was not disturbed, and lets the port go when it stops.
    kekd.kekctl().arg("status").run().ok();
    assert!(kekd.stop_with(Signal::SIGTERM).success());
    assert!(!port_held(port), "vsock port {port} is free again after shutdown");
}

/// `kekd.socket` with `ListenStream=vsock::PORT`: kekd serves the vsock socket systemd
/// passes, instead of binding one of its own.
#[test]
fn kekd_serves_a_vsock_socket_systemd_passes() {
    let port = free_port();
    let passed = vsock_socket(SockFlag::empty());
    bind(passed.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port)).expect("bind");
    listen(&passed, Backlog::new(16).unwrap()).expect("listen");
    let kekd = with_vsock(free_port(), "5");
    let config = kekd.config_path().unwrap().to_owned();

    let daemon = ActivatedKekd::start(&passed, &config, &kekd.dir().join("activated.stderr"));
    drop(passed);
    assert!(port_held(port), "kekd keeps the passed vsock socket open: it serves it");
    kekd.kekctl().arg("status").run().ok();
    let log = daemon.stderr();
    assert!(log.contains("serving the vsock sockets systemd passed"), "vsock_port gives way to it: {log}");
    assert!(!log.contains("does not serve"), "{log}");
    assert!(daemon.stop().success());
    assert!(!port_held(port), "and closes it at shutdown");
}

#[test]
fn a_guest_is_served_over_vsock_by_its_cid() {
    let port = free_port();
    let mut kekd = with_vsock(port, &VMADDR_CID_LOCAL.to_string());
    kekd.start();
    let guest = format!("{VMADDR_CID_LOCAL}:{port}");

    if let Err(why) = loopback(port) {
        // These machines have /dev/vsock but no loopback transport (DESIGN §8): a guest's
        // connection cannot be made here, and this test says so instead of passing quietly.
        eprintln!(
            "NOT RUN: this machine has no vsock loopback (connect to CID 1 port {port}: {why}); \
             the end-to-end guest path needs one (modprobe vsock_loopback, or a VM with a guest)"
        );
        // What a user sees in that case is still checked: a clear error naming the address.
        let out = kekd.kekctl().args(["--vsock", guest.as_str(), "status"]).run();
        out.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
        assert!(out.stderr.contains(&format!("vsock {guest}")), "{}", out.stderr);
        return;
    }

    // The guest (CID 1 here) may use acme, as a user.
    let (plaintext, edek) = {
        let out =
            kekd.kekctl().json().args(["--vsock", guest.as_str(), "generate", "--key", "default"]).run();
        let v = out.json();
        (
            softhsm_tests::unb64(v["plaintext"].as_str().unwrap()),
            softhsm_tests::unb64(v["edek"].as_str().unwrap()),
        )
    };
    let out = kekd.kekctl().args(["--vsock", guest.as_str(), "unwrap"]).stdin(edek.clone()).run();
    assert_eq!(out.ok(), &plaintext[..], "a key generated over vsock unwraps over vsock");
    let out = kekd.kekctl().arg("unwrap").stdin(edek).run();
    assert_eq!(out.ok(), &plaintext[..], "and over the Unix socket: one tenant, two transports");

    // Never as an admin, and not for a tenant that does not list it.
    let out = kekd.kekctl().args(["--vsock", guest.as_str(), "keys", "create", "guest-made"]).run();
    out.assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    let out = kekd.kekctl_for("other").args(["--vsock", guest.as_str(), "status"]).run();
    out.assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");
    assert!(out.stderr.contains("vsock cid 1"), "{}", out.stderr);

    // The audit trail names the guest by CID.
    let records = kekd.audit_records("acme");
    let generated = records.iter().find(|r| r["event"] == "generate").expect("the generate is audited");
    assert_eq!(generated["peer"]["cid"], VMADDR_CID_LOCAL);
    assert!(generated["peer"].get("uid").is_none(), "a guest has no uid: {generated}");
    let denied = kekd.audit_records("other");
    assert!(denied.iter().any(|r| r["code"] == "PERMISSION_DENIED" && r["peer"]["cid"] == VMADDR_CID_LOCAL));
}
