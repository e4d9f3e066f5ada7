//! Busy polling of an idle connection for its next request.
//!
//! A client that waits for each reply before it sends the next request
//! (queue depth 1: a guest's synchronous I/O, `fio --iodepth=1`) sends it a
//! few µs after the reply. If the server's thread sleeps in the meantime, on
//! a VM its vCPU halts, and waking a halted vCPU costs tens of µs: on the
//! machines we measure on, a round trip between two CPUs takes ~70 µs
//! against ~10 µs when both ends share one CPU. So, once a connection has
//! answered everything, it keeps reading its socket for a short budget
//! ([`ServerConfig::busy_poll`](crate::ServerConfig::busy_poll)) before it
//! parks, yielding to other tasks and threads between tries.
//!
//! It is adaptive: a connection only polls while its client has been quick
//! (the last request came within the budget of going idle), so a slow or
//! idle client costs at most one budget of CPU time, once.
//!
//! The socket is read through a second handle on it (a `dup`ed file
//! descriptor, non-blocking like the first): the runtime's own readiness
//! for the socket only changes when its I/O driver runs, which is exactly
//! the sleep this avoids.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use bytes::BytesMut;

/// Bytes read per try (the rest of a large request is read as usual).
const CHUNK: usize = 64 * 1024;

/// A second, non-blocking handle on a connection's socket.
#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Socket {
    /// A handle on `s`'s socket; `None` if the descriptor cannot be duplicated.
    pub(crate) fn tcp(s: &tokio::net::TcpStream) -> Option<Socket> {
        s.as_fd()
            .try_clone_to_owned()
            .ok()
            .map(|fd| Socket::Tcp(fd.into()))
    }

    /// A handle on `s`'s socket; `None` if the descriptor cannot be duplicated.
    pub(crate) fn unix(s: &tokio::net::UnixStream) -> Option<Socket> {
        s.as_fd()
            .try_clone_to_owned()
            .ok()
            .map(|fd| Socket::Unix(fd.into()))
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).read(buf),
            Socket::Unix(s) => (&*s).read(buf),
        }
    }
}

/// What one round of polling found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Polled {
    /// Bytes were appended to the read buffer.
    Data,
    /// Nothing arrived within the budget.
    Timeout,
    /// The socket reported EOF or an error, which the regular read then
    /// sees and handles.
    Closed,
}

/// A request that arrives this soon after polling starts was already on
/// its way (the client keeps several in flight) rather than sent in answer
/// to the last reply: such a client is better served by reading its
/// requests in batches than one at a time.
const MIN_TURNAROUND: Duration = Duration::from_micros(8);

/// Largest request (bytes of data read or written) after which an idle
/// connection polls. A client moving large requests spends its time on the
/// data, not waiting for our wake-up: `nbdcopy` streaming 256 KiB requests
/// over 4 connections drains each connection now and then, and polling
/// those gaps took the CPU it needed on a 2-core VM (sequential write
/// 2.23–2.33 GB/s polling against 2.54–2.64 without, sequential read
/// 2.85–3.06 against 3.99–4.03). The wake-up saved is also a smaller part
/// of a large request's time.
pub(crate) const MAX_LEN: u32 = 64 * 1024;

/// How the connection's latest request arrived.
#[derive(Debug, Clone, Copy)]
enum Woke {
    /// Not yet known (a new connection).
    Start,
    /// Found by polling, this long after polling started.
    Polled(Duration),
    /// Read by the runtime after parking, this long after going idle.
    Parked(Duration),
}

/// Per-connection busy-poll state.
#[derive(Debug)]
pub(crate) struct BusyPoll {
    socket: Socket,
    budget: Duration,
    woke: Woke,
    /// When the connection last parked idle.
    parked_at: Option<Instant>,
    scratch: Vec<u8>,
}

impl BusyPoll {
    /// Polling `socket` for up to `budget`; `None` when `budget` is zero.
    pub(crate) fn new(socket: Option<Socket>, budget: Duration) -> Option<BusyPoll> {
        if budget.is_zero() {
            return None;
        }
        Some(BusyPoll {
            socket: socket?,
            budget,
            woke: Woke::Start,
            parked_at: None,
            scratch: Vec::new(),
        })
    }

    /// Whether to poll now that the connection is idle, having served
    /// `served` requests since it was last idle, the last one of `len`
    /// bytes. Only for a client at queue depth 1: one request per round
    /// trip, each sent in answer to the previous reply, within the budget,
    /// and a small one ([`MAX_LEN`]).
    pub(crate) fn wanted(&self, served: usize, len: u32) -> bool {
        served == 1
            && len <= MAX_LEN
            && match self.woke {
                Woke::Start => true,
                Woke::Polled(gap) => gap >= MIN_TURNAROUND,
                Woke::Parked(gap) => gap <= self.budget,
            }
    }

    /// The connection parks (waits in the runtime) with nothing to do.
    pub(crate) fn parking(&mut self) {
        self.parked_at.get_or_insert_with(Instant::now);
    }

    /// The regular read returned data.
    pub(crate) fn read(&mut self) {
        if let Some(t) = self.parked_at.take() {
            self.woke = Woke::Parked(t.elapsed());
        }
    }

    /// Polls the socket for up to the budget, appending what arrives to `buf`.
    pub(crate) async fn poll(&mut self, buf: &mut BytesMut) -> Polled {
        if self.scratch.is_empty() {
            self.scratch = vec![0; CHUNK];
        }
        let start = Instant::now();
        loop {
            match self.socket.try_read(&mut self.scratch) {
                Ok(n) if n > 0 => {
                    buf.extend_from_slice(&self.scratch[..n]);
                    self.woke = Woke::Polled(start.elapsed());
                    self.parked_at = None;
                    return Polled::Data;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EOF or an error: the regular read reports it.
                _ => return Polled::Closed,
            }
            if start.elapsed() >= self.budget {
                // The gap to the next request counts from here.
                self.parked_at = Some(start);
                return Polled::Timeout;
            }
            // Let other tasks of this worker run, then other threads of
            // this CPU (the client itself, when it shares the CPU).
            tokio::task::yield_now().await;
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    #[tokio::test]
    async fn zero_budget_or_no_socket_disables() {
        let (_client, server) = pair().await;
        assert!(BusyPoll::new(Socket::tcp(&server), Duration::ZERO).is_none());
        assert!(BusyPoll::new(None, Duration::from_micros(50)).is_none());
        assert!(BusyPoll::new(Socket::tcp(&server), Duration::from_micros(50)).is_some());
    }

    #[tokio::test]
    async fn finds_data_that_arrives_within_the_budget() {
        let (mut client, server) = pair().await;
        let mut p = BusyPoll::new(Socket::tcp(&server), Duration::from_secs(5)).unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"hello").await.unwrap();
            client
        });
        let mut buf = BytesMut::new();
        assert_eq!(p.poll(&mut buf).await, Polled::Data);
        assert_eq!(&buf[..], b"hello");
        // A reply to our last one (it took 20 ms): keep polling, for one
        // request per round only.
        assert!(p.wanted(1, 4096));
        assert!(p.wanted(1, MAX_LEN));
        assert!(!p.wanted(2, 4096));
        // A large request: its client is busy with the data, not waiting.
        assert!(!p.wanted(1, MAX_LEN + 1));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn gives_up_after_the_budget_and_adapts_to_the_client() {
        let (_client, server) = pair().await;
        let mut p = BusyPoll::new(Socket::tcp(&server), Duration::from_millis(5)).unwrap();
        let mut buf = BytesMut::new();
        let t = Instant::now();
        assert_eq!(p.poll(&mut buf).await, Polled::Timeout);
        assert!(t.elapsed() >= Duration::from_millis(5));
        assert!(buf.is_empty());
        // A slow client: no more polling until one answers quickly.
        std::thread::sleep(Duration::from_millis(10));
        p.read();
        assert!(!p.wanted(1, 4096));
        p.parking();
        p.read();
        assert!(p.wanted(1, 4096));
        assert!(!p.wanted(0, 0));
    }

    #[tokio::test]
    async fn a_pipelining_client_is_read_in_batches() {
        let (mut client, server) = pair().await;
        let mut p = BusyPoll::new(Socket::tcp(&server), Duration::from_secs(5)).unwrap();
        client.write_all(b"already there").await.unwrap();
        let mut buf = BytesMut::new();
        // Wait until the bytes are in the server's receive queue.
        server.readable().await.unwrap();
        assert_eq!(p.poll(&mut buf).await, Polled::Data);
        assert_eq!(&buf[..], b"already there");
        assert!(!p.wanted(1, 4096));
    }

    #[tokio::test]
    async fn eof_is_left_to_the_regular_read() {
        let (client, server) = pair().await;
        drop(client);
        let mut p = BusyPoll::new(Socket::tcp(&server), Duration::from_secs(5)).unwrap();
        let mut buf = BytesMut::new();
        let t = Instant::now();
        assert_eq!(p.poll(&mut buf).await, Polled::Closed);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
