//! Where kekd listens: its Unix socket on this machine, or a vsock port (from a virtual
//! machine or enclave to its host, or the other way).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncWrite};

/// A kekd listener. Paths convert into it, so `Client::connect(path, …)` keeps working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// A context id (the host is 2) and a port.
    Vsock {
        cid: u32,
        port: u32,
    },
}

impl From<PathBuf> for Endpoint {
    fn from(p: PathBuf) -> Self {
        Endpoint::Unix(p)
    }
}

impl From<&Path> for Endpoint {
    fn from(p: &Path) -> Self {
        Endpoint::Unix(p.to_owned())
    }
}

impl From<&PathBuf> for Endpoint {
    fn from(p: &PathBuf) -> Self {
        Endpoint::Unix(p.clone())
    }
}

impl From<&Endpoint> for Endpoint {
    fn from(e: &Endpoint) -> Self {
        e.clone()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
        }
    }
}

/// The `--vsock` argument: `CID:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not CID:PORT (for example 2:7000; both are 32-bit numbers)")]
pub struct BadVsockAddress(String);

impl Endpoint {
    pub fn parse_vsock(s: &str) -> Result<Endpoint, BadVsockAddress> {
        let bad = || BadVsockAddress(s.to_owned());
        let (cid, port) = s.split_once(':').ok_or_else(bad)?;
        let cid = u32::from_str(cid).map_err(|_| bad())?;
        let port = u32::from_str(port).map_err(|_| bad())?;
        Ok(Endpoint::Vsock { cid, port })
    }
}

pub(crate) type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// A connected stream of either kind, as the halves the connection's two tasks own.
pub(crate) async fn connect(endpoint: &Endpoint) -> std::io::Result<(ReadHalf, WriteHalf)> {
    match endpoint {
        Endpoint::Unix(path) => {
            let (r, w) = tokio::net::UnixStream::connect(path).await?.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Endpoint::Vsock { cid, port } => {
            let addr = tokio_vsock::VsockAddr::new(*cid, *port);
            let (r, w) = tokio_vsock::VsockStream::connect(addr).await?.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_addresses_parse_and_bad_ones_are_named() {
        assert_eq!(Endpoint::parse_vsock("2:7000"), Ok(Endpoint::Vsock { cid: 2, port: 7000 }));
        for bad in ["2", "2:", ":7000", "x:1", "2:7000:1", "-1:5", "4294967296:1"] {
            let e = Endpoint::parse_vsock(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(Endpoint::Vsock { cid: 3, port: 9 }.to_string(), "vsock 3:9");
    }
}
