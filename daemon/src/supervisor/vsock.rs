//! The vsock listener: how virtual machines and enclaves on this host reach kekd.
//!
//! A guest gets exactly what a local process gets (the Hello, the tenant's ACL, the
//! hand-off of its socket to the tenant's worker, [`super::handshake::greet`]); only the
//! identity differs. It is the context id the hypervisor reports for the connection, which
//! a guest cannot choose, and each tenant's `allow_cids` lists the guests it serves.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use super::{handshake, State};
use crate::service::Peer;

/// The vsock listeners to serve: the ones systemd passed (`kekd.socket` with
/// `ListenStream=vsock::PORT`), each with its port, or else `vsock_port` bound on every CID
/// of this machine. An error names the port.
pub fn listeners(
    port: Option<u32>,
    activated: Vec<(OwnedFd, u32)>,
) -> Result<Vec<VsockListener>, (u32, std::io::Error)> {
    if activated.is_empty() {
        return match port {
            Some(port) => {
                Ok(vec![VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port)).map_err(|e| (port, e))?])
            }
            None => Ok(Vec::new()),
        };
    }
    let ports: Vec<u32> = activated.iter().map(|(_, p)| *p).collect();
    if let Some(port) = port.filter(|p| !ports.contains(p)) {
        tracing::warn!(vsock_port = port, activated = ?ports, "serving the vsock sockets systemd passed, not vsock_port");
    }
    // Registering a listening descriptor with the runtime cannot fail short of the
    // kernel running out of memory; tokio-vsock's conversion panics then.
    Ok(activated.into_iter().map(|(fd, _)| VsockListener::from(fd)).collect())
}

/// Accepts guests until the task is aborted (shutdown).
pub async fn accept(listener: VsockListener, state: Arc<State>) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let peer = Peer::Vsock { cid: addr.cid(), port: addr.port() };
                handshake::accepted_guest(stream, peer, &state);
                // As on the Unix socket: greet what was taken before taking more.
                tokio::task::yield_now().await;
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                limited_warn!(error = %e, "vsock accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
