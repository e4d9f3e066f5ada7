//! Benchmarks of the protocol group.
//!
//! * 1 MiB write-at frames over loopback TCP through `silo_protocol`'s
//!   transport (requests in flight, acknowledged by the peer) beside a raw
//!   TCP copy of the same bytes in 1 MiB writes, in the same run.
//! * Each write-at encoding (LZ4, zero elision) on zero, text-like, sparse
//!   and random blocks beside a Go-silo-style RLE (the reference): encode
//!   speed, decode speed and wire bytes.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use silo_protocol::compress;
use silo_protocol::transport::{Config, Connection, Priority};
use silo_protocol::{Compression, Kind, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::report::Report;
use crate::Opts;

const GROUP: &str = "protocol";
const MIB: usize = 1 << 20;
/// Frame header + write-at fixed fields in silo-protocol.
const OUR_WRITE_HEADERS: usize = 32;
/// Go silo: 12-byte frame header + command, sub-type and offset.
const GO_WRITE_HEADERS: usize = 22;

/// Runs the protocol benchmarks.
pub fn run(opts: &Opts, report: &mut Report, rt: &tokio::runtime::Runtime) {
    let total = if opts.quick { 64 * MIB } else { 1024 * MIB };
    // Interleaved, best of three each: a busy machine hurts both alike.
    let (mut raw, mut ours) = (0f64, 0f64);
    let (mut raw_cpu, mut ours_cpu) = (u64::MAX, u64::MAX);
    for _ in 0..3 {
        let c = process_cpu_ns();
        raw = raw.max(rt.block_on(raw_tcp_copy(total)));
        raw_cpu = raw_cpu.min(process_cpu_ns().saturating_sub(c));
        let c = process_cpu_ns();
        ours = ours.max(rt.block_on(write_at_frames(total, 16)));
        ours_cpu = ours_cpu.min(process_cpu_ns().saturating_sub(c));
    }
    cpu_note(
        report,
        GROUP,
        "protocol transport",
        3,
        ours_cpu,
        raw_cpu,
        (total / MIB) as u64,
    );
    report.add(
        GROUP,
        "write-at 1 MiB frames, loopback TCP, 16 in flight",
        ours,
        "raw TCP copy, 1 MiB writes",
        raw,
        "MB/s",
        true,
        "≥ 0.9×",
    );
    report.note(
        GROUP,
        &format!(
            "Transport (best of 3 interleaved runs each): {} MiB sent as 1 MiB plain write-at requests (the same `Bytes` each time, \
             never copied by the sender), each acknowledged by the receiver's consumer, beside one \
             task writing the same bytes with `write_all` in 1 MiB chunks and one reading them into \
             a reused 1 MiB buffer, on the same loopback, same runtime. Both with TCP_NODELAY.",
            total / MIB
        ),
    );
    compression(opts, report);
}

/// CPU time of every thread of this process so far, in nanoseconds (sum of
/// Prints and notes the CPU time per MiB of ours and the raw reference
/// (least of `rounds`), a steadier figure than wall time on a shared machine.
pub(crate) fn cpu_note(
    report: &mut Report,
    group: &str,
    what: &str,
    rounds: usize,
    ours_ns: u64,
    raw_ns: u64,
    mib: u64,
) {
    let cpu = format!(
        "{what}: CPU time per MiB (both ends, least of {rounds}): ours {:.1} µs, raw {:.1} µs",
        ours_ns as f64 / 1e3 / mib as f64,
        raw_ns as f64 / 1e3 / mib as f64
    );
    eprintln!("{cpu}");
    report.note(
        group,
        &format!(
            "{cpu} (summed thread CPU time from /proc/self/task/*/schedstat; steadier than \
             wall time on a shared machine)."
        ),
    );
}

/// `/proc/self/task/*/schedstat`; 0 where that is unavailable). A diagnostic
/// beside wall-clock figures on a shared machine.
pub(crate) fn process_cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| {
        let path = e.ok()?.path().join("schedstat");
        std::fs::read_to_string(path)
            .ok()?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    })
    .sum()
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let a = a.expect("connect");
    let b = b.expect("accept").0;
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

async fn raw_tcp_copy(total: usize) -> f64 {
    let (mut a, mut b) = tcp_pair().await;
    let data = vec![0x5au8; MIB];
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; MIB];
        let mut got = 0usize;
        while got < total {
            let n = b.read(&mut buf).await.expect("read");
            assert!(n > 0, "raw copy ended early");
            got += n;
        }
    });
    for _ in 0..total / MIB {
        a.write_all(&data).await.expect("write");
    }
    reader.await.expect("reader");
    mb_per_s(total, start.elapsed())
}

async fn write_at_frames(total: usize, in_flight: usize) -> f64 {
    let (a, b) = tcp_pair().await;
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let (src, dst) = tokio::join!(
        Connection::from_split(ar, aw, Config::default()),
        Connection::from_split(br, bw, Config::default())
    );
    let (src, dst) = (src.expect("handshake"), dst.expect("handshake"));
    let mut incoming = dst.incoming(1, Kind::WriteAt).expect("incoming");
    let sink = tokio::spawn(async move {
        while let Ok(req) = incoming.recv().await {
            let length = match &req.message {
                Message::WriteAt(w) => w.length,
                _ => 0,
            };
            if req.respond(Message::WriteAtOk { length }).await.is_err() {
                break;
            }
        }
    });
    let data = Bytes::from(vec![0x5au8; MIB]);
    let blocks = total / MIB;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..in_flight {
        let src = src.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < blocks {
                src.write_at(
                    1,
                    (i * MIB) as u64,
                    &data,
                    Compression::None,
                    Priority::Bulk,
                )
                .await
                .expect("write-at");
                i += in_flight;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let elapsed = start.elapsed();
    src.close();
    drop(dst);
    let _ = sink.await;
    mb_per_s(total, elapsed)
}

/// Go silo's RLE (the reference encoding): LEB128 tag, even = literal of
/// `tag >> 1` bytes, odd = the next byte repeated `tag >> 1` times; repeat
/// runs of at least 4 bytes.
fn rle_encode(data: &[u8]) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = Vec::with_capacity(data.len() / 2);
    let mut lit_start = 0;
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        let mut j = i + 1;
        while j < data.len() && data[j] == b {
            j += 1;
        }
        if j - i >= 4 {
            if lit_start < i {
                varint(&mut out, ((i - lit_start) as u64) << 1);
                out.extend_from_slice(&data[lit_start..i]);
            }
            varint(&mut out, (((j - i) as u64) << 1) | 1);
            out.push(b);
            lit_start = j;
        }
        i = j;
    }
    if lit_start < data.len() {
        varint(&mut out, ((data.len() - lit_start) as u64) << 1);
        out.extend_from_slice(&data[lit_start..]);
    }
    out
}

fn rle_decode(mut p: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while !p.is_empty() {
        let mut tag = 0u64;
        let mut shift = 0;
        loop {
            let b = p[0];
            p = &p[1..];
            tag |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b < 0x80 {
                break;
            }
        }
        let n = (tag >> 1) as usize;
        if tag & 1 == 1 {
            out.resize(out.len() + n, p[0]);
            p = &p[1..];
        } else {
            out.extend_from_slice(&p[..n]);
            p = &p[n..];
        }
    }
    out
}

fn datasets() -> Vec<(&'static str, Bytes)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let words = [
        "the",
        "block",
        "device",
        "migration",
        "silo",
        "source",
        "destination",
        "dirty",
        "write",
        "read",
        "kernel",
        "page",
        "cache",
        "memory",
        "and",
        "of",
        "to",
        "in",
        "is",
        "for",
    ];
    let mut text = Vec::with_capacity(MIB);
    while text.len() < MIB {
        text.extend_from_slice(words[rng.gen_range(0..words.len())].as_bytes());
        text.push(if rng.gen_ratio(1, 12) { b'\n' } else { b' ' });
    }
    text.truncate(MIB);
    let random: Vec<u8> = (0..MIB).map(|_| rng.gen()).collect();
    // A filesystem-like block: 4 KiB pages, 1 in 8 holding random data.
    let mut sparse = vec![0u8; MIB];
    for page in sparse.chunks_mut(4096) {
        if rng.gen_ratio(1, 8) {
            rng.fill(page);
        }
    }
    vec![
        ("zero", Bytes::from(vec![0u8; MIB])),
        ("text-like", Bytes::from(text)),
        ("sparse 1/8 random pages", Bytes::from(sparse)),
        ("random", Bytes::from(random)),
    ]
}

fn time_per_mib(iters: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    mb_per_s(iters * MIB, start.elapsed())
}

fn compression(opts: &Opts, report: &mut Report) {
    let iters = if opts.quick { 5 } else { 50 };
    for (name, data) in datasets() {
        let rle = rle_encode(&data);
        assert_eq!(
            rle_decode(&rle, data.len()),
            &data[..],
            "RLE reference round trip"
        );
        let rle_enc = time_per_mib(iters, || {
            std::hint::black_box(rle_encode(&data));
        });
        let rle_dec = time_per_mib(iters, || {
            std::hint::black_box(rle_decode(&rle, data.len()));
        });
        for (policy, label) in [
            (Compression::Lz4, "lz4"),
            (Compression::ZeroElision, "zero-elision"),
        ] {
            let (enc, payload) = compress::encode(&data, policy, silo_protocol::Features::ALL);
            let back = compress::decode(enc, &payload, data.len() as u32).expect("decode");
            assert_eq!(back, data, "{label} round trip");
            let speed = time_per_mib(iters, || {
                std::hint::black_box(compress::encode(
                    &data,
                    policy,
                    silo_protocol::Features::ALL,
                ));
            });
            let dspeed = time_per_mib(iters, || {
                std::hint::black_box(compress::decode(enc, &payload, data.len() as u32).ok());
            });
            report.add(
                GROUP,
                &format!(
                    "{label} wire bytes per 1 MiB, {name} (sent as {})",
                    enc.name()
                ),
                (payload.len() + OUR_WRITE_HEADERS) as f64,
                "Go-style RLE",
                (rle.len() + GO_WRITE_HEADERS) as f64,
                "bytes",
                false,
                "",
            );
            report.add(
                GROUP,
                &format!("{label} encode, {name}"),
                speed,
                "Go-style RLE encode",
                rle_enc,
                "MB/s",
                true,
                "",
            );
            if enc == silo_protocol::Encoding::Plain {
                continue; // nothing to decode: the payload is the data
            }
            report.add(
                GROUP,
                &format!("{label} decode, {name}"),
                dspeed,
                "Go-style RLE decode",
                rle_dec,
                "MB/s",
                true,
                "",
            );
        }
    }
    report.note(
        GROUP,
        "Compression: one 1 MiB block per data set, single thread. `zero-elision` is the default \
         policy (all-zero blocks become a header-only `zeroes` frame, zero runs of 32+ bytes are \
         skipped, blocks it cannot shrink by 1/16 go plain); `lz4` replaces the skips by LZ4 and \
         suits links slower than its encode speed. The reference is Go silo's RLE token stream, \
         re-implemented here. Wire bytes include the headers: 32 bytes of frame and write-at \
         header here, 22 (12-byte frame + 10-byte write-at header) in Go silo. gzip (Go's other \
         option) is not measured: no deflate crate is a dependency.",
    );
}
