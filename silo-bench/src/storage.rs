//! Benchmarks of the storage group: the sources beside raw positioned I/O.
//!
//! For each workload — 4 KiB random read / write and 1 MiB sequential read
//! / write, at queue depth 1 and 32 — on one file of 1 GiB (64 MiB with
//! `--quick`), measured for a fixed time each:
//!
//! * **raw** (the reference, measured first, in the same run, on the same
//!   file): `pread`/`pwrite` (`FileExt::read_exact_at`/`write_all_at`) called
//!   directly. QD1 = one thread in a loop; QD32 = 32 threads in a loop each
//!   (the honest synchronous equivalent of 32 outstanding requests).
//! * **file/io_uring**, **file/blocking**: `FileStorage` with that engine on
//!   the same file; QD1 = one task awaiting each request in turn, QD32 = 32
//!   tasks doing the same concurrently on the shared runtime.
//! * **file/auto**: `FileStorage` with `Engine::Auto`, which reads what the
//!   page cache holds inline with `preadv2(RWF_NOWAIT)` and sends the rest
//!   (and every write) to io_uring.
//! * **memory**: `MemoryStorage` of the same size, same access pattern
//!   (shown against the raw file figure for scale; no target).
//!
//! The file is buffered (not `O_DIRECT`) and prefilled, so reads come from
//! the page cache: this measures the software path, which is where the
//! engines differ. Random offsets are 4 KiB-aligned, drawn from a fixed
//! seed; QD32 sequential workers each stream their own 1/32 of the file.
//!
//! Extra rows compare io_uring with blocking at QD32 (target: ahead). The
//! notes give io_uring's average submission batch size during the QD32 runs.
//!
//! **Module stack overhead**: `Metrics<Lockable<source>>` against the bare
//! source (memory and file/io_uring), 4 KiB random read and write at QD1 and
//! QD32. Bare and stacked runs alternate three times and the best of each
//! is kept, so that a burst of load on the machine does not land on one
//! side only. Target: ≤ 10 % overhead (ratio ≥ 0.9×).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use silo_storage::modules::{Lockable, Metrics};
use silo_storage::sources::{Engine, FileStorage};
use silo_storage::{DynProvider, MemoryStorage, Provider};

use crate::report::Report;
use crate::Opts;

const GROUP: &str = "storage";
const KIB4: usize = 4096;
const MIB1: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Pattern {
    fn bs(self) -> usize {
        match self {
            Pattern::RandRead | Pattern::RandWrite => KIB4,
            Pattern::SeqRead | Pattern::SeqWrite => MIB1,
        }
    }
    fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }
    fn label(self) -> &'static str {
        match self {
            Pattern::RandRead => "4 KiB randread",
            Pattern::RandWrite => "4 KiB randwrite",
            Pattern::SeqRead => "1 MiB seqread",
            Pattern::SeqWrite => "1 MiB seqwrite",
        }
    }
    /// IOPS for 4 KiB, MB/s for 1 MiB.
    fn unit(self) -> &'static str {
        if self.bs() == KIB4 {
            "IOPS"
        } else {
            "MB/s"
        }
    }
    fn figure(self, ops: u64, secs: f64) -> f64 {
        if self.bs() == KIB4 {
            ops as f64 / secs
        } else {
            ops as f64 * self.bs() as f64 / secs / 1e6
        }
    }
}

/// Offsets for worker `w` of `qd`: random 4 KiB-aligned for random
/// patterns, a private sequential stripe for sequential ones.
struct Offsets {
    pattern: Pattern,
    state: u64,
    size: u64,
    stripe_start: u64,
    stripe_len: u64,
    cursor: u64,
}

impl Offsets {
    fn new(pattern: Pattern, size: u64, w: usize, qd: usize) -> Self {
        let bs = pattern.bs() as u64;
        let stripe_len = (size / qd as u64) / bs * bs;
        Offsets {
            pattern,
            state: 0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
            size,
            stripe_start: w as u64 * stripe_len,
            stripe_len: stripe_len.max(bs),
            cursor: 0,
        }
    }

    fn next_offset(&mut self) -> u64 {
        let bs = self.pattern.bs() as u64;
        match self.pattern {
            Pattern::RandRead | Pattern::RandWrite => {
                // xorshift64*
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                let r = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
                (r % (self.size / bs)) * bs
            }
            Pattern::SeqRead | Pattern::SeqWrite => {
                let off = self.stripe_start + self.cursor;
                self.cursor = (self.cursor + bs) % self.stripe_len;
                off.min(self.size - bs)
            }
        }
    }
}

/// Raw positioned I/O: `qd` threads calling pread/pwrite directly.
fn run_raw(file: &Arc<File>, size: u64, pattern: Pattern, qd: usize, dur: Duration) -> f64 {
    let start = Instant::now();
    let deadline = start + dur;
    let handles: Vec<_> = (0..qd)
        .map(|w| {
            let file = file.clone();
            std::thread::spawn(move || {
                let mut offs = Offsets::new(pattern, size, w, qd);
                let mut buf = vec![0x5au8; pattern.bs()];
                let mut ops = 0u64;
                while Instant::now() < deadline {
                    let off = offs.next_offset();
                    if pattern.is_write() {
                        file.write_all_at(&buf, off).expect("raw pwrite");
                    } else {
                        file.read_exact_at(&mut buf, off).expect("raw pread");
                    }
                    ops += 1;
                }
                ops
            })
        })
        .collect();
    let ops: u64 = handles
        .into_iter()
        .map(|h| h.join().expect("raw worker"))
        .sum();
    pattern.figure(ops, start.elapsed().as_secs_f64())
}

/// A provider: `qd` tasks each awaiting one request at a time.
fn run_provider(
    rt: &tokio::runtime::Runtime,
    p: Arc<dyn Provider>,
    pattern: Pattern,
    qd: usize,
    dur: Duration,
) -> f64 {
    rt.block_on(async move {
        let size = p.size();
        let start = Instant::now();
        let deadline = start + dur;
        let tasks: Vec<_> = (0..qd)
            .map(|w| {
                let p = p.clone();
                tokio::spawn(async move {
                    let mut offs = Offsets::new(pattern, size, w, qd);
                    let data = Bytes::from(vec![0xa5u8; pattern.bs()]);
                    let mut buf = BytesMut::zeroed(pattern.bs());
                    let mut ops = 0u64;
                    while Instant::now() < deadline {
                        let off = offs.next_offset();
                        if pattern.is_write() {
                            p.write_at(off, data.clone()).await.expect("write");
                        } else {
                            buf = p.read_at(off, buf).await.expect("read");
                        }
                        ops += 1;
                    }
                    ops
                })
            })
            .collect();
        let mut ops = 0;
        for t in tasks {
            ops += t.await.expect("bench task");
        }
        pattern.figure(ops, start.elapsed().as_secs_f64())
    })
}

/// Runs the storage benchmarks.
pub fn run(opts: &Opts, report: &mut Report, rt: &tokio::runtime::Runtime) {
    let size: u64 = if opts.quick { 64 << 20 } else { 1 << 30 };
    let dur = Duration::from_millis(if opts.quick { 200 } else { 2000 });
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.img");

    // Prefill the file (so reads hit real data) and the memory device.
    let mem: Arc<dyn Provider> = Arc::new(MemoryStorage::new(size));
    {
        let f = File::create(&path).expect("create bench file");
        let chunk = vec![0x3cu8; 8 << 20];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(chunk.len() as u64) as usize;
            f.write_all_at(&chunk[..n], off).expect("prefill");
            off += n as u64;
        }
        f.sync_all().expect("sync");
        rt.block_on(async {
            let c = Bytes::from(chunk);
            let mut off = 0;
            while off < size {
                let n = (size - off).min(c.len() as u64) as usize;
                mem.write_at(off, c.slice(..n))
                    .await
                    .expect("prefill memory");
                off += n as u64;
            }
        });
    }
    let raw = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open raw"),
    );
    let uring: Arc<dyn Provider> = match FileStorage::open(&path, Engine::Uring) {
        Ok(f) => Arc::new(f),
        Err(e) => {
            report.note(
                GROUP,
                &format!("io_uring unavailable, file/io_uring rows skipped: {e}"),
            );
            Arc::new(FileStorage::open(&path, Engine::Blocking).expect("open file"))
        }
    };
    let uring_ok = Engine::uring_available().is_ok();
    let blocking: Arc<dyn Provider> =
        Arc::new(FileStorage::open(&path, Engine::Blocking).expect("open file"));
    let auto: Arc<dyn Provider> =
        Arc::new(FileStorage::open(&path, Engine::Auto).expect("open file"));

    let mut batches = Vec::new();
    for pattern in [
        Pattern::RandRead,
        Pattern::RandWrite,
        Pattern::SeqRead,
        Pattern::SeqWrite,
    ] {
        for qd in [1usize, 32] {
            let raw_name = format!(
                "raw {} QD{qd}",
                if pattern.is_write() {
                    "pwrite"
                } else {
                    "pread"
                }
            );
            let what = format!("{} QD{qd}", pattern.label());
            let unit = pattern.unit();
            // Raw I/O runs before and after ours and the better figure is
            // the reference: page-cache state drifts during a row (pages
            // dirtied by earlier runs are cheaper to write again), and the
            // providers run in between.
            let raw_before = run_raw(&raw, size, pattern, qd, dur);
            let target = if qd == 1 { "≥ 0.9×" } else { "" };
            let mut u = f64::NAN;
            if uring_ok {
                let before = Engine::uring_stats().unwrap_or_default();
                u = run_provider(rt, uring.clone(), pattern, qd, dur);
                if qd == 32 {
                    let after = Engine::uring_stats().unwrap_or_default();
                    let calls = after.submit_calls - before.submit_calls;
                    let entries = after.submitted - before.submitted;
                    batches.push(format!(
                        "{}: {:.1}",
                        pattern.label(),
                        entries as f64 / calls.max(1) as f64
                    ));
                }
            }
            let b = run_provider(rt, blocking.clone(), pattern, qd, dur);
            let a = run_provider(rt, auto.clone(), pattern, qd, dur);
            let m = run_provider(rt, mem.clone(), pattern, qd, dur);
            let r = raw_before.max(run_raw(&raw, size, pattern, qd, dur));
            let mut rows = vec![
                ("file/blocking", b, target),
                ("file/auto", a, target),
                ("memory", m, ""),
            ];
            if uring_ok {
                rows.insert(0, ("file/io_uring", u, target));
            }
            for (label, value, target) in rows {
                report.add(
                    GROUP,
                    &format!("{label} {what}"),
                    value,
                    &raw_name,
                    r,
                    unit,
                    true,
                    target,
                );
            }
            if qd == 32 && uring_ok {
                report.add(
                    GROUP,
                    &format!("file/io_uring vs file/blocking {what}"),
                    u,
                    &format!("file/blocking {what}"),
                    b,
                    unit,
                    true,
                    "> 1×",
                );
            }
        }
    }
    if !batches.is_empty() {
        report.note(
            GROUP,
            &format!(
                "io_uring at QD32, average entries per submitting io_uring_enter: {}",
                batches.join(", ")
            ),
        );
    }
    for (label, bare) in [("memory", &mem), ("file/io_uring", &uring)] {
        if label == "file/io_uring" && !uring_ok {
            continue;
        }
        stack_overhead(report, rt, label, bare.clone(), dur);
    }
    report.note(
        GROUP,
        &format!(
            "file of {} MiB, buffered and prefilled (reads from the page cache), {} ms per measurement; raw QD1 = 1 thread calling pread/pwrite, raw QD32 = 32 threads, each measured before and after ours (the better one is the reference); ours QD1 = 1 task, QD32 = 32 tasks on the {}-worker tokio runtime",
            size >> 20,
            dur.as_millis(),
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        ),
    );
    for p in [&uring, &blocking, &mem] {
        let _ = rt.block_on(p.close());
    }
}

/// Rows for the overhead of a metrics + lockable stack over `bare`.
fn stack_overhead(
    report: &mut Report,
    rt: &tokio::runtime::Runtime,
    label: &str,
    bare: DynProvider,
    dur: Duration,
) {
    let stacked: DynProvider = Arc::new(Metrics::new(Lockable::new(bare.clone())));
    for pattern in [Pattern::RandRead, Pattern::RandWrite] {
        for qd in [1usize, 32] {
            let (mut b, mut s) = (0f64, 0f64);
            for _ in 0..3 {
                b = b.max(run_provider(rt, bare.clone(), pattern, qd, dur / 2));
                s = s.max(run_provider(rt, stacked.clone(), pattern, qd, dur / 2));
            }
            report.add(
                GROUP,
                &format!("metrics+lockable over {label} {} QD{qd}", pattern.label()),
                s,
                &format!("bare {label}"),
                b,
                pattern.unit(),
                true,
                "≥ 0.9×",
            );
        }
    }
}
