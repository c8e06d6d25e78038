//! The control channel between the supervisor and one worker.
//!
//! A `SOCK_SEQPACKET` socket pair: the kernel keeps message boundaries and delivers a
//! passed descriptor together with the message that describes it, so a connection and its
//! peer identity can never be paired up wrongly. The worker's end is its stdin, so it
//! survives the worker closing every other inherited descriptor.
//!
//! Messages are small JSON documents. Nothing secret crosses this channel: the supervisor
//! holds no key material, and a PIN from the environment reaches the worker through its own
//! environment, never through here.
#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::audit::Caller;
use crate::service::Peer;
use crate::worker::WorkerSpec;

/// Largest control message; a worker's setup is a few hundred bytes.
const MAX_MESSAGE: usize = 64 * 1024;
/// Most descriptors one message carries: a connection and its lease.
const MAX_FDS: usize = 2;

/// Supervisor to worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// The first message: what to open and how to serve.
    Setup(Box<WorkerSpec>),
    /// A greeted connection, passed as the message's first descriptor. The second is its
    /// lease: one end of a socket pair whose other end the supervisor watches, to count the
    /// connection as open until the worker closes the lease with it.
    Connection(Handoff),
    /// A Hello for this tenant that the supervisor turned away, for the tenant's audit
    /// trail (the supervisor writes none of its own).
    Refused(Refusal),
    /// The supervisor's heartbeat: answered with [`FromWorker::Pong`] by the runtime that
    /// serves requests, so a worker whose serving has stopped stops answering too.
    Ping { seq: u64 },
}

/// A connection the supervisor has authenticated: who is calling, what they may do, and
/// the Hello to answer (the worker answers it, once it has taken the connection over).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handoff {
    pub caller: Caller,
    pub hello_id: u64,
}

/// Who was refused, and the error they were answered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub peer: Peer,
    pub exe: Option<String>,
    pub hello_id: u64,
    /// The status code's name, e.g. `PERMISSION_DENIED`.
    pub code: String,
    pub message: String,
    /// How many refusals of this caller this one stands for: the supervisor folds repeated
    /// ones (`supervisor::denials`), and this one names the last of them.
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

/// Worker to supervisor.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// Sandboxed, backend open: hand connections over.
    Ready,
    /// Could not start; the message says why (it names the failing part, never a secret).
    Failed { message: String },
    /// The answer to [`ToWorker::Ping`] with the same number.
    Pong { seq: u64 },
    /// A root-key call hung past its bound: the worker stops taking connections, lets the
    /// requests it holds finish (they fail fast) and exits, to be replaced.
    Wedged {
        /// The root-key call that hung, e.g. `unseal`.
        call: String,
        /// The setting that bounds it, e.g. `tenants.acme.pkcs11.call_timeout`.
        setting: String,
        #[serde(with = "humantime_serde")]
        after: std::time::Duration,
    },
}

/// A connected pair: (supervisor end, worker end). Both close on exec; the worker's end
/// becomes its stdin through `Command::stdin`, which clears that flag on the copy.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?)
}

fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("control messages always serialise")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad control message: {e}")))
}

fn send_raw(fd: RawFd, bytes: &[u8], pass: &[BorrowedFd<'_>]) -> nix::Result<()> {
    let fds: Vec<RawFd> = pass.iter().map(|p| p.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let sent = sendmsg::<()>(fd, &[IoSlice::new(bytes)], cmsgs, flags, None)?;
    if sent != bytes.len() {
        return Err(Errno::EMSGSIZE);
    }
    Ok(())
}

/// One received message and its descriptors: `None` at end of stream (the other side is
/// gone).
fn recv_raw(fd: RawFd, flags: MsgFlags) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), flags | MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut passed = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: SCM_RIGHTS just installed `raw` in this process's descriptor table
                // for us alone; nothing else knows the number, so taking ownership is sound
                // (and makes sure an unexpected extra descriptor gets closed).
                passed.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    let (bytes, truncated) = (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC));
    if bytes == 0 && passed.is_empty() {
        return Ok(None);
    }
    if truncated || passed.len() > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed control message"));
    }
    buf.truncate(bytes);
    Ok(Some((buf, passed)))
}

/// At most one descriptor, for the messages that carry no more.
fn single(mut fds: Vec<OwnedFd>) -> io::Result<Option<OwnedFd>> {
    if fds.len() > 1 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected descriptors"));
    }
    Ok(fds.pop())
}

/// Blocking use of a channel, while the worker is still single-threaded (before its
/// runtime starts).
pub struct BlockingChannel(OwnedFd);

impl BlockingChannel {
    pub fn new(fd: OwnedFd) -> Self {
        Self(fd)
    }

    pub fn recv<T: DeserializeOwned>(&self) -> io::Result<T> {
        match recv_raw(self.0.as_raw_fd(), MsgFlags::empty())? {
            Some((bytes, fds)) if fds.is_empty() => decode(&bytes),
            Some(_) => Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected descriptor")),
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the supervisor closed the channel")),
        }
    }

    pub fn send<T: Serialize>(&self, msg: &T) -> io::Result<()> {
        // MSG_DONTWAIT on a fresh channel fails only if the supervisor stopped reading,
        // and then waiting would not help either.
        Ok(send_raw(self.0.as_raw_fd(), &encode(msg), &[])?)
    }

    pub fn into_inner(self) -> OwnedFd {
        self.0
    }
}

/// Async use of a channel, on a tokio runtime.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: an OwnedFd keeps its descriptor open, unchanged, for as long as it lives,
        // and the AsyncFd owns it from here on; that is all `register` requires.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Sends one message, with `pass` as its descriptor if given. Concurrent senders are
    /// fine: each message is one atomic `sendmsg`.
    pub async fn send<T: Serialize>(&self, msg: &T, pass: Option<BorrowedFd<'_>>) -> io::Result<()> {
        self.send_fds(msg, pass.as_slice()).await
    }

    /// Sends one message without descriptors if the channel can take it now, else fails
    /// with `WouldBlock`: for heartbeats, which must never hold up their sender behind a
    /// peer that stopped reading.
    pub fn try_send<T: Serialize>(&self, msg: &T) -> io::Result<()> {
        Ok(send_raw(self.fd.get_ref().as_raw_fd(), &encode(msg), &[])?)
    }

    /// [`Self::send`] with any number of descriptors, up to [`MAX_FDS`].
    pub async fn send_fds<T: Serialize>(&self, msg: &T, pass: &[BorrowedFd<'_>]) -> io::Result<()> {
        let bytes = encode(msg);
        loop {
            let mut ready = self.fd.writable().await?;
            match ready.try_io(|fd| Ok(send_raw(fd.as_raw_fd(), &bytes, pass)?)) {
                Ok(res) => return res,
                Err(_would_block) => continue,
            }
        }
    }

    /// Next message and its descriptor; `None` once the other side has closed.
    pub async fn recv<T: DeserializeOwned>(&self) -> io::Result<Option<(T, Option<OwnedFd>)>> {
        match self.recv_fds().await? {
            Some((msg, fds)) => Ok(Some((msg, single(fds)?))),
            None => Ok(None),
        }
    }

    /// Next message and its descriptors (a connection comes with two); `None` once the
    /// other side has closed.
    pub async fn recv_fds<T: DeserializeOwned>(&self) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| recv_raw(fd.as_raw_fd(), MsgFlags::MSG_DONTWAIT)) {
                Ok(Ok(Some((bytes, fd)))) => return Ok(Some((decode(&bytes)?, fd))),
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::service::Role;

    #[tokio::test]
    async fn a_connection_travels_with_its_identity() {
        let (a, b) = pair().unwrap();
        let (sup, work) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let (mut client, server) = UnixStream::pair().unwrap();
        let caller = Caller {
            peer: Peer::Unix { uid: 7, gid: 8, pid: 9 },
            exe: Some("/usr/bin/app".into()),
            role: Role::Admin,
        };
        let handoff = Handoff { caller: caller.clone(), hello_id: 42 };
        sup.send(&ToWorker::Connection(handoff), Some(server.as_fd())).await.unwrap();
        drop(server);

        let (msg, fd) = work.recv::<ToWorker>().await.unwrap().unwrap();
        let ToWorker::Connection(h) = msg else { panic!("expected a connection, got {msg:?}") };
        assert_eq!((h.caller, h.hello_id), (caller, 42));
        // The passed descriptor is the very connection the client holds.
        let mut passed = UnixStream::from(fd.expect("a descriptor"));
        client.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        passed.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");

        drop(sup);
        assert!(
            work.recv::<ToWorker>().await.unwrap().is_none(),
            "end of stream once the supervisor is gone"
        );
    }

    #[tokio::test]
    async fn heartbeats_do_not_wait_for_a_peer_that_stopped_reading() {
        let (a, b) = pair().unwrap();
        let (sup, work) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        sup.try_send(&ToWorker::Ping { seq: 1 }).unwrap();
        let (msg, fd) = work.recv::<ToWorker>().await.unwrap().unwrap();
        assert!(matches!(msg, ToWorker::Ping { seq: 1 }) && fd.is_none(), "{msg:?}");
        work.try_send(&FromWorker::Pong { seq: 1 }).unwrap();
        assert!(matches!(sup.recv::<FromWorker>().await.unwrap().unwrap().0, FromWorker::Pong { seq: 1 }));

        // Nobody reads `work` any more: the channel fills, and a heartbeat fails at once
        // rather than waiting.
        let full = (0..100_000u64).map(|seq| sup.try_send(&ToWorker::Ping { seq })).find_map(Result::err);
        assert_eq!(full.map(|e| e.kind()), Some(io::ErrorKind::WouldBlock));
    }

    #[test]
    fn blocking_side_sees_messages_in_order() {
        let (a, b) = pair().unwrap();
        let (sup, work) = (BlockingChannel::new(a), BlockingChannel::new(b));
        work.send(&FromWorker::Failed { message: "token \"x\": no such token".into() }).unwrap();
        work.send(&FromWorker::Ready).unwrap();
        assert!(
            matches!(sup.recv::<FromWorker>().unwrap(), FromWorker::Failed { message } if message.contains("no such token"))
        );
        assert!(matches!(sup.recv::<FromWorker>().unwrap(), FromWorker::Ready));
        drop(work);
        assert_eq!(sup.recv::<FromWorker>().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
