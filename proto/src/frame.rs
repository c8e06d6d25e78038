//! Length-prefixed framing: `u32` big-endian length ‖ protobuf message.
//!
//! The length is checked against the limit before any buffer grows, so a peer announcing
//! 4 GiB costs us nothing but its four bytes. Frame buffers are zeroized because requests
//! and responses carry plaintext data keys.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::{Zeroize, Zeroizing};

/// Default largest frame accepted: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// What one `read` of the stream may bring while frames are small: a page, room for a few
/// dozen pipelined requests or answers in one system call.
const READ_AHEAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("malformed protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames from a stream through one buffer, so that a single `read` of the stream
/// usually brings a whole frame or several pipelined ones: reading the length prefix and
/// then the body took three system calls per frame.
///
/// The buffer holds at most one frame at the limit with its prefix, `4 + max` bytes, and
/// grows for a frame only once its length was checked against the limit. Bytes are wiped
/// as soon as their frame is decoded, when they move to the front of the buffer or into a
/// larger one, and when the reader is dropped: no plaintext stays behind in memory the
/// reader no longer uses.
///
/// Bytes read past the frame returned belong to the frames after it and live only here:
/// a stream is handed on by handing on its reader, which is why there is no way to take
/// the stream out.
pub struct FrameReader<R> {
    inner: R,
    /// Initialised throughout (its length is its capacity), so that it is read into
    /// without `unsafe` and wiped whole when dropped.
    buf: Zeroizing<Vec<u8>>,
    /// The bytes read and not yet consumed are `buf[start..end]`; everything else is zero.
    start: usize,
    end: usize,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        Self { inner, buf: Zeroizing::new(Vec::new()), start: 0, end: 0, max }
    }

    /// Reads and decodes the next message. `Ok(None)` means the peer closed cleanly
    /// between frames.
    ///
    /// Cancel safe: its only await is one read of the stream, whose bytes are kept before
    /// anything else happens, so a `read` dropped unfinished (a `select!` that took another
    /// branch) loses nothing and the next one goes on where it stopped.
    ///
    /// A frame that does not decode is consumed, and the next read goes on with the frame
    /// after it. After [`FrameError::TooLarge`] the stream is out of step: what was
    /// buffered is wiped, and the connection should be closed.
    pub async fn read<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        loop {
            let have = self.end - self.start;
            let need = if have < 4 {
                4
            } else {
                let prefix = &self.buf[self.start..self.start + 4];
                let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
                if len > self.max {
                    self.discard();
                    return Err(FrameError::TooLarge { len, max: self.max });
                }
                if have - 4 >= len {
                    return self.take(len).map(Some);
                }
                4 + len
            };
            self.make_room(need);
            let n = self.inner.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return if have == 0 { Ok(None) } else { Err(FrameError::Truncated) };
            }
            self.end += n;
        }
    }

    /// Decodes the complete frame of `len` bytes at the front and wipes it.
    fn take<M: Message + Default>(&mut self, len: usize) -> Result<M, FrameError> {
        let frame = self.start..self.start + 4 + len;
        let decoded = M::decode(&self.buf[frame.start + 4..frame.end]);
        self.buf[frame.clone()].zeroize();
        self.start = frame.end;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        Ok(decoded?)
    }

    fn discard(&mut self) {
        self.buf[self.start..self.end].zeroize();
        (self.start, self.end) = (0, 0);
    }

    /// Moves the unconsumed bytes to the front, so that the next read may fill the rest,
    /// into a buffer of `need` bytes at least. A buffer grows to the size of the frame, not
    /// amortised: doubling would overshoot the limit, as much as twice it.
    fn make_room(&mut self, need: usize) {
        let have = self.end - self.start;
        if need > self.buf.len() {
            let size = need.max(READ_AHEAD.min(self.max.saturating_add(4)));
            let mut grown = Zeroizing::new(vec![0; size]);
            grown[..have].copy_from_slice(&self.buf[self.start..self.end]);
            // The old buffer is wiped as it drops.
            self.buf = grown;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.buf[have..self.end].zeroize();
        } else {
            return;
        }
        (self.start, self.end) = (0, have);
    }
}

/// Appends one frame (length prefix and message) to `out`.
pub fn encode_frame<M: Message>(msg: &M, out: &mut Vec<u8>) {
    let len = msg.encoded_len();
    out.reserve(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(out).expect("Vec grows as needed");
}

/// Writes one frame and wipes the staging buffer.
pub async fn write_frame<W: AsyncWrite + Unpin, M: Message>(w: &mut W, msg: &M) -> std::io::Result<()> {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf);
    let res = w.write_all(&buf).await;
    buf.zeroize();
    res
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use tokio::io::ReadBuf;

    use super::*;
    use crate::pb;

    /// A stream handing out its bytes at most `chunk` at a time, counting the reads.
    struct Chunked<'a> {
        data: &'a [u8],
        chunk: usize,
        reads: usize,
    }

    impl<'a> Chunked<'a> {
        fn new(data: &'a [u8], chunk: usize) -> Self {
            Self { data, chunk, reads: 0 }
        }
    }

    impl AsyncRead for Chunked<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.chunk.min(self.data.len()).min(buf.remaining());
            buf.put_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.reads += 1;
            Poll::Ready(Ok(()))
        }
    }

    /// Frames of `len` bytes that decode as any message: field 1 = 0, over and over.
    fn frames(lens: &[usize]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for &len in lens {
            assert!(len % 2 == 0);
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            bytes.extend([8, 0].repeat(len / 2));
        }
        bytes
    }

    fn assert_wiped_but_unconsumed<R>(r: &FrameReader<R>, context: &str) {
        let stale = r.buf[..r.start].iter().chain(&r.buf[r.end..]).filter(|&&b| b != 0).count();
        assert_eq!(stale, 0, "{context}: {stale} bytes left behind outside the unconsumed ones");
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[1; 100]);
        let mut r = FrameReader::new(&bytes[..], DEFAULT_MAX_FRAME);
        let err = r.read::<pb::Request>().await.unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, max: DEFAULT_MAX_FRAME } if len == u32::MAX as usize)
        );
        assert_eq!(r.buf.capacity(), READ_AHEAD, "the buffer did not grow for the refused frame");
        assert_eq!((r.start, r.end), (0, 0));
        assert_wiped_but_unconsumed(&r, "after the refusal");
    }

    /// Caught by the allocation check of the `frame` fuzz target: a frame larger than the
    /// one before it grew the buffer amortised, to as much as twice the limit.
    #[tokio::test]
    async fn the_buffer_never_grows_past_the_limit() {
        let cases: [(usize, &[usize]); 3] = [
            (1024, &[600, 1000, 1024]),
            (3 * READ_AHEAD, &[READ_AHEAD + 600, 2 * READ_AHEAD, 3 * READ_AHEAD - 2, 3 * READ_AHEAD]),
            (16, &[0, 16, 2, 16]),
        ];
        for (max, lens) in cases {
            for chunk in [usize::MAX, 1000, 7] {
                let bytes = frames(lens);
                let mut r = FrameReader::new(Chunked::new(&bytes, chunk), max);
                for _ in lens {
                    r.read::<()>().await.unwrap().unwrap();
                    assert!(r.buf.capacity() <= 4 + max, "a buffer of {} bytes", r.buf.capacity());
                }
                assert!(r.read::<()>().await.unwrap().is_none());
            }
        }
    }

    #[tokio::test]
    async fn pipelined_frames_come_in_one_read() {
        let msg = pb::Request { request_id: 7, ..Default::default() };
        let mut bytes = Vec::new();
        for _ in 0..10 {
            encode_frame(&msg, &mut bytes);
        }
        let mut r = FrameReader::new(Chunked::new(&bytes, usize::MAX), DEFAULT_MAX_FRAME);
        for _ in 0..10 {
            assert_eq!(r.read::<pb::Request>().await.unwrap().unwrap().request_id, 7);
        }
        assert_eq!(r.inner.reads, 1);
        assert!(r.read::<pb::Request>().await.unwrap().is_none());
        assert_eq!(r.inner.reads, 2, "and one more to see the end");

        // A frame larger than the read-ahead: one read for its start, one for the rest.
        let bytes = frames(&[10 * READ_AHEAD]);
        let mut r = FrameReader::new(Chunked::new(&bytes, usize::MAX), DEFAULT_MAX_FRAME);
        r.read::<()>().await.unwrap().unwrap();
        assert_eq!(r.inner.reads, 2);
    }

    /// Frames carry plaintext keys: once a frame is decoded, no copy of it may remain in
    /// the buffer, wherever the reads cut the stream and however the buffer moved or grew.
    #[tokio::test]
    async fn consumed_bytes_leave_nothing_behind() {
        let lens = [20, 90, 0, READ_AHEAD - 4, 2 * READ_AHEAD, 60, READ_AHEAD, 90];
        let bytes = frames(&lens);
        for chunk in [1, 3, 50, 91, 1000, READ_AHEAD - 1, READ_AHEAD + 1, usize::MAX] {
            let mut r = FrameReader::new(Chunked::new(&bytes, chunk), DEFAULT_MAX_FRAME);
            for (i, _) in lens.iter().enumerate() {
                r.read::<()>().await.unwrap().unwrap();
                assert_wiped_but_unconsumed(&r, &format!("chunks of {chunk}, after frame {i}"));
            }
            assert!(r.read::<()>().await.unwrap().is_none());
            assert!(r.buf.iter().all(|&b| b == 0), "chunks of {chunk}: all wiped at the end");
        }
    }

    /// A `read` dropped mid-frame, as `select!` drops it, keeps what it read.
    #[tokio::test]
    async fn a_cancelled_read_loses_nothing() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let msg = pb::Request { request_id: 7, ..Default::default() };
        let mut bytes = Vec::new();
        encode_frame(&msg, &mut bytes);
        let half = bytes.len() / 2;
        let mut r = FrameReader::new(server, DEFAULT_MAX_FRAME);
        for cut in [1, 4, half] {
            client.write_all(&bytes[..cut]).await.unwrap();
            let mut read = Box::pin(r.read::<pb::Request>());
            assert!(read.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending());
            drop(read);
            assert_eq!(r.end - r.start, cut, "the bytes read stay buffered");
            client.write_all(&bytes[cut..]).await.unwrap();
            assert_eq!(r.read::<pb::Request>().await.unwrap().unwrap().request_id, 7);
        }
    }

    #[tokio::test]
    async fn round_trip_and_clean_eof() {
        let msg = pb::Request { request_id: 7, ..Default::default() };
        let mut bytes = Vec::new();
        encode_frame(&msg, &mut bytes);
        encode_frame(&msg, &mut bytes);
        let mut r = FrameReader::new(&bytes[..], 1024);
        assert_eq!(r.read::<pb::Request>().await.unwrap().unwrap().request_id, 7);
        assert_eq!(r.read::<pb::Request>().await.unwrap().unwrap().request_id, 7);
        assert!(r.read::<pb::Request>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncated_frame_and_garbage_are_errors() {
        for cut in [1, 3, 4, 7] {
            let mut bytes = 10u32.to_be_bytes().to_vec();
            bytes.extend_from_slice(b"abc");
            let mut r = FrameReader::new(&bytes[..cut], 1024);
            assert!(matches!(r.read::<pb::Request>().await, Err(FrameError::Truncated)), "{cut} bytes");
        }

        let mut bytes = 4u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        let mut r = FrameReader::new(&bytes[..], 1024);
        assert!(matches!(r.read::<pb::Request>().await, Err(FrameError::Decode(_))));
    }
}
