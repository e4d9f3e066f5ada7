//! Benchmarks of the nbd group: silo-nbd beside `qemu-nbd` and `nbdkit`,
//! measured in the same run, serving the same backing.
//!
//! Backings (1 GiB, 256 MiB with `--quick`):
//! * **memory**: silo `MemoryStorage`; `nbdkit memory`; `qemu-nbd` on a raw
//!   file in `/dev/shm` (tmpfs: its page cache is memory).
//! * **file**: a fresh sparse raw file on disk per server (buffered I/O for
//!   all three); silo uses `FileStorage` (engine `Auto`: io_uring if allowed).
//!
//! Every server runs in a process of its own (ours is this binary started
//! as `silo-bench __serve-nbd`). Workloads, one server at a time, in this
//! order (so reads see real data); the servers take turns in two rounds and
//! every figure is a server's best round:
//! 1. `nbdcopy --no-extents SRC URI`: sequential write of random data from a
//!    tmpfs file (MB/s): a first pass fills the fresh export, then the best
//!    of three overwrites counts.
//! 2. `nbdcopy --no-extents URI null:`: sequential read (MB/s, best of three).
//! 3. `fio --ioengine=nbd --rw=randrw --bs=4k --iodepth=32`: read + write IOPS.
//! 4. the same at `--iodepth=1`: mean completion latency of reads and writes
//!    (µs, lower is better).
//!
//! nbdcopy uses its defaults (4 connections when the server allows
//! multi-conn, 64 requests in flight); qemu-nbd gets `--shared=16` so it
//! accepts those connections. Every row is silo beside one peer (two rows
//! per measurement); the target is "> 1" (ahead of the peer).

#![allow(clippy::print_stdout)]

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use silo_nbd::{Export, Server, ServerConfig};
use silo_storage::sources::{Engine, FileStorage};
use silo_storage::{DynProvider, MemoryStorage};

use crate::report::Report;
use crate::Opts;

const GROUP: &str = "nbd";
const TARGET: &str = "> 1× (ahead)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    Memory,
    File,
}

impl Backing {
    fn label(self) -> &'static str {
        match self {
            Backing::Memory => "memory",
            Backing::File => "file",
        }
    }
}

/// Figures of one server on one backing.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    write_mbs: f64,
    read_mbs: f64,
    qd32_iops: f64,
    qd1_read_us: f64,
    qd1_write_us: f64,
    /// QD1 latencies with the server and fio pinned to CPU 0.
    pinned_read_us: f64,
    pinned_write_us: f64,
}

impl Figures {
    /// The better of each figure of `a` (if any) and `b`: the higher
    /// throughput, the lower latency.
    fn best(a: Option<Figures>, b: Figures) -> Figures {
        let Some(a) = a else { return b };
        Figures {
            write_mbs: a.write_mbs.max(b.write_mbs),
            read_mbs: a.read_mbs.max(b.read_mbs),
            qd32_iops: a.qd32_iops.max(b.qd32_iops),
            qd1_read_us: a.qd1_read_us.min(b.qd1_read_us),
            qd1_write_us: a.qd1_write_us.min(b.qd1_write_us),
            pinned_read_us: a.pinned_read_us.min(b.pinned_read_us),
            pinned_write_us: a.pinned_write_us.min(b.pinned_write_us),
        }
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_for_port(port: u16, child: &mut Option<Child>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(c) = child.as_mut() {
            if let Ok(Some(s)) = c.try_wait() {
                return Err(format!("server exited early: {s}"));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("port {port} never opened"))
}

/// Runs a command, returning stdout or a description of the failure.
fn run_cmd(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first number after the anchors, in order, in fio's JSON output.
fn json_number(s: &str, anchors: &[&str]) -> Option<f64> {
    let mut pos = 0;
    for a in anchors {
        pos += s[pos..].find(a)? + a.len();
    }
    let rest = s[pos..].trim_start_matches([' ', ':']);
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e' || c == '+'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn fio(uri: &str, size: u64, qd: u32, runtime: u64) -> Result<(f64, f64, f64), String> {
    fio_on(None, uri, size, qd, runtime)
}

/// `fio` on every CPU, or (`Some(cpu)`) pinned to one.
fn fio_on(
    cpu: Option<usize>,
    uri: &str,
    size: u64,
    qd: u32,
    runtime: u64,
) -> Result<(f64, f64, f64), String> {
    let mut cmd = match cpu {
        Some(c) => {
            let mut t = Command::new("taskset");
            t.args(["-c", &c.to_string(), "fio"]);
            t
        }
        None => Command::new("fio"),
    };
    let out = run_cmd(cmd.args([
        "--name=nbd",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randrw",
        "--bs=4k",
        &format!("--iodepth={qd}"),
        &format!("--size={size}"),
        &format!("--runtime={runtime}"),
        "--time_based",
        "--randrepeat=1",
        "--output-format=json",
    ]))?;
    let riops = json_number(&out, &["\"read\" : {", "\"iops\" :"]).ok_or("no read iops")?;
    let wiops = json_number(&out, &["\"write\" : {", "\"iops\" :"]).ok_or("no write iops")?;
    let rlat = json_number(&out, &["\"read\" : {", "\"lat_ns\" : {", "\"mean\" :"])
        .ok_or("no read latency")?;
    let wlat = json_number(&out, &["\"write\" : {", "\"lat_ns\" : {", "\"mean\" :"])
        .ok_or("no write latency")?;
    Ok((riops + wiops, rlat / 1000.0, wlat / 1000.0))
}

fn nbdcopy_mbs(args: &[&str], bytes: u64) -> Result<f64, String> {
    let start = Instant::now();
    run_cmd(Command::new("nbdcopy").arg("--no-extents").args(args))?;
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// Sets the CPU affinity of every thread of process `pid` (`taskset -a`).
fn pin_process(pid: u32, cpus: &str) -> Result<(), String> {
    run_cmd(Command::new("taskset").args(["-a", "-p", "-c", cpus, &pid.to_string()])).map(drop)
}

/// Measured nbdcopy passes per direction and server (the best counts).
const SEQ_RUNS: usize = 3;

/// Rounds of the whole comparison (every server in turn, each round); each
/// figure is the best of its rounds. Interleaving the servers keeps a slow
/// spell of this shared VM from landing on one server only.
const ROUNDS: usize = 2;

/// `server` is the pid of the process serving `uri` (pinned for the
/// one-CPU latency run, then released to every CPU again).
fn measure(uri: &str, src: &Path, size: u64, runtime: u64, server: u32) -> Result<Figures, String> {
    warm_memory(size + size / 4);
    let copy_in = [src.to_str().expect("utf-8 path"), uri];
    // The first pass fills the fresh export (allocating its memory or page
    // cache); the measured ones overwrite it. Best of `SEQ_RUNS` for each
    // direction: one nbdcopy pass takes about a second, and a single
    // neighbour's burst on this shared VM moved one pass by 10 % either way.
    nbdcopy_mbs(&copy_in, size)?;
    let mut write_mbs = 0f64;
    for _ in 0..SEQ_RUNS {
        write_mbs = write_mbs.max(nbdcopy_mbs(&copy_in, size)?);
    }
    let mut read_mbs = 0f64;
    for _ in 0..SEQ_RUNS {
        read_mbs = read_mbs.max(nbdcopy_mbs(&[uri, "null:"], size)?);
    }
    let (qd32_iops, _, _) = fio(uri, size, 32, runtime)?;
    let (_, qd1_read_us, qd1_write_us) = fio(uri, size, 1, runtime)?;
    let all = format!(
        "0-{}",
        std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
    );
    pin_process(server, "0")?;
    let pinned = fio_on(Some(0), uri, size, 1, runtime);
    pin_process(server, &all)?;
    let (_, pinned_read_us, pinned_write_us) = pinned?;
    Ok(Figures {
        write_mbs,
        read_mbs,
        qd32_iops,
        qd1_read_us,
        qd1_write_us,
        pinned_read_us,
        pinned_write_us,
    })
}

/// Touches `bytes` of fresh anonymous memory, then frees it, so the pages
/// a server is about to allocate are backed by the host already (on this
/// VM the first touch of a guest page is several times slower). The freed
/// pages go back to the host after a few seconds, so this only evens out
/// the first write pass; the measured passes after it do not depend on it.
fn warm_memory(bytes: u64) {
    let mut v: Vec<u8> = Vec::with_capacity(bytes as usize);
    v.resize(bytes as usize, 1);
    std::hint::black_box(&v);
}

/// Creates (or truncates) a sparse file of `size` bytes.
fn sparse_file(path: &Path, size: u64) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(size)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A peer server process, killed (by its own pid) when dropped.
struct Peer(Option<Child>);

impl Peer {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_peer(cmd: &mut Command, port: u16) -> Result<Peer, String> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let mut c = Some(child);
    wait_for_port(port, &mut c)?;
    Ok(Peer(c))
}

/// Runs our server in a child process of its own (`silo-bench __serve-nbd`),
/// like the peers: the pinned QD1 run pins every thread of the serving
/// process, and in this process that would include whatever earlier
/// benchmark groups left running.
fn silo(
    backing: Backing,
    dir: &Path,
    src: &Path,
    size: u64,
    runtime: u64,
) -> Result<Figures, String> {
    let port = free_port();
    let path = dir.join("silo.raw");
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg(SERVE_ARG)
        .arg(backing.label())
        .arg(&path)
        .arg(size.to_string())
        .arg(port.to_string());
    let peer = spawn_peer(&mut cmd, port)?;
    measure_peer(peer, port, src, size, runtime, &path)
}

/// First argument that makes `silo-bench` an NBD server process (see
/// [`serve_child`]).
pub const SERVE_ARG: &str = "__serve-nbd";

/// The server process: `silo-bench __serve-nbd memory|file PATH SIZE PORT`
/// serves one export named `disk` (a `MemoryStorage`, or a fresh
/// `FileStorage` at PATH with engine `Auto`) on 127.0.0.1:PORT with the
/// default `ServerConfig`, until it is killed.
pub fn serve_child(args: &[String]) -> Result<(), String> {
    let [backing, path, size, port] = args else {
        return Err(format!(
            "usage: silo-bench {SERVE_ARG} memory|file PATH SIZE PORT"
        ));
    };
    let size: u64 = size.parse().map_err(|e| format!("size {size:?}: {e}"))?;
    let port: u16 = port.parse().map_err(|e| format!("port {port:?}: {e}"))?;
    let provider: DynProvider = match backing.as_str() {
        "memory" => Arc::new(MemoryStorage::new(size)),
        "file" => {
            Arc::new(FileStorage::create(path, size, Engine::Auto).map_err(|e| e.to_string())?)
        }
        other => return Err(format!("unknown backing {other:?}")),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let server = Server::new(ServerConfig::default());
        server
            .add_export(Export::new("disk", provider))
            .map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        server.serve_tcp(listener).await.map_err(|e| e.to_string())
    })
}

fn qemu_nbd(
    backing: Backing,
    dir: &Path,
    shm: &Path,
    src: &Path,
    size: u64,
    runtime: u64,
) -> Result<Figures, String> {
    let path: PathBuf = match backing {
        Backing::Memory => shm.join("qemu.raw"),
        Backing::File => dir.join("qemu.raw"),
    };
    sparse_file(&path, size)?;
    let port = free_port();
    let peer = spawn_peer(
        Command::new("qemu-nbd").args([
            "-f",
            "raw",
            "-x",
            "disk",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "--shared=16",
            path.to_str().expect("utf-8 path"),
        ]),
        port,
    )?;
    measure_peer(peer, port, src, size, runtime, &path)
}

/// Measures a peer serving `disk` on `port`, then stops it and removes its
/// backing file.
fn measure_peer(
    peer: Peer,
    port: u16,
    src: &Path,
    size: u64,
    runtime: u64,
    backing: &Path,
) -> Result<Figures, String> {
    let res = measure(
        &format!("nbd://127.0.0.1:{port}/disk"),
        src,
        size,
        runtime,
        peer.pid(),
    );
    drop(peer);
    let _ = std::fs::remove_file(backing);
    res
}

fn nbdkit(
    backing: Backing,
    dir: &Path,
    src: &Path,
    size: u64,
    runtime: u64,
) -> Result<Figures, String> {
    let port = free_port();
    let path = dir.join("nbdkit.raw");
    let mut cmd = Command::new("nbdkit");
    cmd.args([
        "-f",
        "--exit-with-parent",
        "-i",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-e",
        "disk",
    ]);
    match backing {
        Backing::Memory => {
            cmd.args(["memory", &size.to_string()]);
        }
        Backing::File => {
            sparse_file(&path, size)?;
            cmd.arg("file").arg(&path);
        }
    }
    let peer = spawn_peer(&mut cmd, port)?;
    measure_peer(peer, port, src, size, runtime, &path)
}

fn rows(report: &mut Report, backing: Backing, ours: &Figures, peer: &str, theirs: &Figures) {
    let b = backing.label();
    report.add(
        GROUP,
        &format!("{b}: nbdcopy sequential write (overwrite)"),
        ours.write_mbs,
        peer,
        theirs.write_mbs,
        "MB/s",
        true,
        TARGET,
    );
    report.add(
        GROUP,
        &format!("{b}: nbdcopy sequential read"),
        ours.read_mbs,
        peer,
        theirs.read_mbs,
        "MB/s",
        true,
        TARGET,
    );
    report.add(
        GROUP,
        &format!("{b}: fio 4 KiB randrw QD32 (r+w)"),
        ours.qd32_iops,
        peer,
        theirs.qd32_iops,
        "IOPS",
        true,
        TARGET,
    );
    report.add(
        GROUP,
        &format!("{b}: fio 4 KiB randrw QD1 read latency"),
        ours.qd1_read_us,
        peer,
        theirs.qd1_read_us,
        "µs",
        false,
        TARGET,
    );
    report.add(
        GROUP,
        &format!("{b}: fio 4 KiB randrw QD1 write latency"),
        ours.qd1_write_us,
        peer,
        theirs.qd1_write_us,
        "µs",
        false,
        TARGET,
    );
    report.add(
        GROUP,
        &format!("{b}: fio 4 KiB randrw QD1 read latency, server and fio on one CPU"),
        ours.pinned_read_us,
        peer,
        theirs.pinned_read_us,
        "µs",
        false,
        TARGET,
    );
    report.add(
        GROUP,
        &format!("{b}: fio 4 KiB randrw QD1 write latency, server and fio on one CPU"),
        ours.pinned_write_us,
        peer,
        theirs.pinned_write_us,
        "µs",
        false,
        TARGET,
    );
}

/// Runs the nbd benchmarks, failing on the first error.
fn run_group(opts: &Opts, report: &mut Report) -> Result<(), String> {
    for tool in ["nbdcopy", "fio", "qemu-nbd", "nbdkit"] {
        if !have(tool) {
            return Err(format!(
                "{tool} is not installed (cargo xtask setup installs it)"
            ));
        }
    }
    let size: u64 = if opts.quick { 256 << 20 } else { 1 << 30 };
    let runtime: u64 = if opts.quick { 3 } else { 15 };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let shm = tempfile::tempdir_in("/dev/shm").map_err(|e| e.to_string())?;
    // Source of the write benchmark: random data on tmpfs.
    let src = shm.path().join("src.raw");
    {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut buf = vec![0u8; 1 << 20];
        let mut f = std::fs::File::create(&src).map_err(|e| e.to_string())?;
        for _ in 0..size >> 20 {
            rng.fill_bytes(&mut buf);
            std::io::Write::write_all(&mut f, &buf).map_err(|e| e.to_string())?;
        }
    }
    let rounds = if opts.quick { 1 } else { ROUNDS };
    for backing in [Backing::Memory, Backing::File] {
        println!("nbd: {} backing, {} MiB", backing.label(), size >> 20);
        let (mut ours, mut qemu, mut kit) = (None, None, None);
        for round in 1..=rounds {
            let o = silo(backing, dir.path(), &src, size, runtime)?;
            let q = qemu_nbd(backing, dir.path(), shm.path(), &src, size, runtime)?;
            let k = nbdkit(backing, dir.path(), &src, size, runtime)?;
            println!("  round {round}\n  silo {o:?}\n  qemu-nbd {q:?}\n  nbdkit {k:?}");
            ours = Some(Figures::best(ours, o));
            qemu = Some(Figures::best(qemu, q));
            kit = Some(Figures::best(kit, k));
        }
        let (ours, qemu, kit) = (
            ours.expect("one round at least"),
            qemu.expect("one round at least"),
            kit.expect("one round at least"),
        );
        rows(report, backing, &ours, "qemu-nbd", &qemu);
        rows(report, backing, &ours, "nbdkit", &kit);
    }
    report.note(
        GROUP,
        &format!(
            "Each server in turn, in a process of its own, serves a {} MiB export on 127.0.0.1, in {rounds} rounds \
(ours, qemu-nbd, nbdkit, then again; every figure is the server's best round); nbdcopy (libnbd defaults, `--no-extents`) \
writes random data from tmpfs (a first pass fills the export, then the best of {SEQ_RUNS} overwrites counts) then reads it to `null:` (best of {SEQ_RUNS}); fio's nbd engine runs 4 KiB randrw for {runtime} s at QD32 \
(sum of read and write IOPS) and QD1 (mean completion latency). Memory backing: silo MemoryStorage, `nbdkit memory`, \
qemu-nbd on a tmpfs file. File backing: a fresh sparse file on disk per server, buffered I/O (silo FileStorage, \
engine Auto). Peers: qemu-nbd `-t --shared=16`, nbdkit defaults (16 threads). The \
\"on one CPU\" rows repeat QD1 with the server process (every thread) and fio pinned to CPU 0 by `taskset`: \
on this VM waking a thread on the other, halted vCPU costs tens of µs, so the unpinned QD1 rows mostly \
measure how often the scheduler happens to place a server's threads beside the client (nbdkit's threads \
migrate tens of thousands of times a second, ours stay put); pinned, they measure the servers' own work. \
silo runs with its defaults, which include busy polling an idle connection for up to 100 µs while its client \
sends one request per round trip (`ServerConfig::busy_poll`): that keeps our vCPU from halting between a QD1 \
client's requests. The sequential write is measured on passes over the export after a first pass filled it: \
on this VM the first touch of a guest page is several times slower than later ones (the host backs it then, \
and freed pages are handed back to the host), which made a fresh export's write measure the host's page \
faults, up to 3× apart in either direction between runs, rather than the servers.",
            size >> 20
        ),
    );
    Ok(())
}

/// Runs the nbd benchmarks (entry point used by `main`).
pub fn run(opts: &Opts, report: &mut Report, _rt: &tokio::runtime::Runtime) {
    if let Err(e) = run_group(opts, report) {
        println!("nbd: benchmark failed: {e}");
        report.note(GROUP, &format!("The nbd benchmarks did not complete: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::{json_number, Figures};

    #[test]
    fn best_figures_take_higher_throughput_and_lower_latency() {
        let a = Figures {
            write_mbs: 10.0,
            read_mbs: 30.0,
            qd32_iops: 5.0,
            qd1_read_us: 20.0,
            qd1_write_us: 8.0,
            pinned_read_us: 3.0,
            pinned_write_us: 9.0,
        };
        let b = Figures {
            write_mbs: 20.0,
            read_mbs: 25.0,
            qd32_iops: 6.0,
            qd1_read_us: 15.0,
            qd1_write_us: 9.0,
            pinned_read_us: 4.0,
            pinned_write_us: 7.0,
        };
        let m = Figures::best(Some(a), b);
        assert_eq!((m.write_mbs, m.read_mbs, m.qd32_iops), (20.0, 30.0, 6.0));
        assert_eq!(
            (
                m.qd1_read_us,
                m.qd1_write_us,
                m.pinned_read_us,
                m.pinned_write_us
            ),
            (15.0, 8.0, 3.0, 7.0)
        );
        assert_eq!(Figures::best(None, a).write_mbs, 10.0);
    }

    #[test]
    fn parses_fio_json() {
        let s = r#"{"jobs" : [ { "read" : { "io_bytes" : 1, "iops" : 123.5, "clat_ns" : { "mean" : 9.0 }, "lat_ns" : { "min" : 1, "mean" : 2500.0 } }, "write" : { "iops" : 7, "lat_ns" : { "mean" : 1e3 } } } ] }"#;
        assert_eq!(json_number(s, &["\"read\" : {", "\"iops\" :"]), Some(123.5));
        assert_eq!(
            json_number(s, &["\"read\" : {", "\"lat_ns\" : {", "\"mean\" :"]),
            Some(2500.0)
        );
        assert_eq!(
            json_number(s, &["\"write\" : {", "\"lat_ns\" : {", "\"mean\" :"]),
            Some(1000.0)
        );
        assert_eq!(json_number(s, &["\"trim\" : {"]), None);
    }
}
