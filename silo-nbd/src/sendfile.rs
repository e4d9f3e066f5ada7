//! Read payloads copied from a file to the socket in the kernel.
//!
//! A read of a range a provider keeps in a cached file
//! ([`Provider::read_file`](silo_storage::Provider::read_file)) is sent
//! with `sendfile(2)`: the kernel copies the bytes from the page cache into
//! the socket, where reading them into a buffer first and writing that
//! would copy every byte twice. [`ReplySink`] is what a connection's
//! writing half needs for it; TCP and Unix sockets implement it, other
//! streams (in-memory pipes, the kernel client's socketpairs wrapped in a
//! generic stream) send every payload from memory.
//!
//! The only `unsafe` code is the syscall, with its `// SAFETY:` comment.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::task::{Context, Poll};

use tokio::io::{AsyncWrite, Interest};

/// The writing half of a connection.
pub(crate) trait ReplySink: AsyncWrite + Unpin + Send + 'static {
    /// Whether [`poll_sendfile`](Self::poll_sendfile) can send file ranges.
    fn can_sendfile(&self) -> bool {
        false
    }

    /// Sends up to `len` bytes of `file` from `offset`: `Ready(Ok(n))`
    /// with how many were sent (0 only at the file's end), `Pending` with
    /// the waker registered while the socket is full.
    fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let _ = (cx, file, offset, len);
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }
}

/// `poll_sendfile` for a tokio socket: try, and on `EAGAIN` wait for the
/// socket to become writable (`try_io` clears the readiness tokio saw).
macro_rules! socket_sink {
    ($half:ty, $stream:ty) => {
        impl ReplySink for $half {
            fn can_sendfile(&self) -> bool {
                true
            }

            fn poll_sendfile(
                &mut self,
                cx: &mut Context<'_>,
                file: &File,
                offset: u64,
                len: usize,
            ) -> Poll<io::Result<usize>> {
                let s: &$stream = self.as_ref();
                loop {
                    std::task::ready!(s.poll_write_ready(cx))?;
                    match s.try_io(Interest::WRITABLE, || {
                        sendfile(s.as_fd(), file, offset, len)
                    }) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        r => return Poll::Ready(r),
                    }
                }
            }
        }
    };
}

socket_sink!(tokio::net::tcp::OwnedWriteHalf, tokio::net::TcpStream);
socket_sink!(tokio::net::unix::OwnedWriteHalf, tokio::net::UnixStream);

impl<S: tokio::io::AsyncRead + AsyncWrite + Send + 'static> ReplySink for tokio::io::WriteHalf<S> {}

/// `sendfile(2)` of up to `len` bytes of `file` at `offset` to `sock`,
/// retried on `EINTR`; `Ok(n)` may be short (the socket filled up).
pub(crate) fn sendfile(
    sock: BorrowedFd<'_>,
    file: &File,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    let mut off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // The kernel sends at most this much per call anyway.
    let len = len.min(0x7fff_f000);
    loop {
        #[allow(unsafe_code)]
        // SAFETY: both descriptors are open for the duration of this
        // synchronous call (`sock` is borrowed, `file` referenced); `off`
        // is a live `off_t` the kernel reads and updates; no other memory
        // is passed.
        let r = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut off, len) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn sendfile_sends_the_file_range() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        f.write_all(&data).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        let (mut off, end) = (1000u64, 150_000u64);
        while off < end {
            let n = sendfile(a.as_fd(), &f, off, (end - off) as usize).unwrap();
            assert!(n > 0);
            off += n as u64;
        }
        // At the end of the file: nothing more.
        assert_eq!(sendfile(a.as_fd(), &f, data.len() as u64, 10).unwrap(), 0);
        drop(a);
        assert!(t.join().unwrap() == data[1000..150_000]);
    }
}
