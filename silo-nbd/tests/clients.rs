//! Interoperability with real NBD clients (qemu-img, qemu-io, nbdinfo,
//! nbdcopy, nbdsh) talking to the server over real sockets.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use silo_nbd::{AllocationTracker, Export, ServerConfig};
use silo_storage::{Capabilities, DynProvider, MemoryStorage, ProviderExt};

const MIB: u64 = 1 << 20;

fn memory(size: u64) -> DynProvider {
    Arc::new(MemoryStorage::new(size))
}

#[test]
fn qemu_img_info_and_convert_both_ways() {
    need("qemu-img");
    let t = TestServer::start(vec![Export::new("disk", memory(16 * MIB))]);
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &t.uri("disk")]));
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");

    // file -> nbd (qemu-img convert -n writes into the existing export)
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = pattern((16 * MIB) as usize, 1);
    std::fs::write(&src, &data).unwrap();
    run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &t.uri("disk"),
    ]));
    assert_eq!(sha256(&contents(&t.rt, &t.provider("disk"))), sha256(&data));

    // nbd -> file
    let dst = dir.path().join("dst.raw");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &t.uri("disk"),
        dst.to_str().unwrap(),
    ]));
    assert_eq!(sha256_file(&dst), sha256(&data));
}

#[test]
fn qemu_io_patterns_at_aligned_and_unaligned_offsets() {
    need("qemu-io");
    let t = TestServer::start(vec![Export::new("disk", memory(8 * MIB))]);
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -P 0xcd 65537 12345",
        "-c",
        "write -P 0x11 1048575 3",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0 65536 1",
        "-c",
        "read -P 0xcd 65537 12345",
        "-c",
        "read -P 0x11 1048575 3",
        "-c",
        "read -P 0 1048578 4096",
        &t.uri("disk"),
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 5, "{out}");
    // The provider holds exactly what was written.
    let c = contents(&t.rt, &t.provider("disk"));
    assert!(c[..65536].iter().all(|&b| b == 0xab));
    assert_eq!(c[65536], 0);
    assert!(c[65537..65537 + 12345].iter().all(|&b| b == 0xcd));
    assert_eq!(&c[1048575..1048578], &[0x11; 3]);
    // A pattern mismatch is detected (the test can fail).
    let out = output(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0xab 65536 512",
        &t.uri("disk"),
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Pattern verification failed"), "{stdout}");
}

/// A client at queue depth 1 (qemu-io runs one command at a time) is
/// served by busy polling when its requests come within the budget, over
/// TCP and Unix sockets, with the same data; with polling off, never.
#[test]
fn busy_polling_serves_a_queue_depth_1_client() {
    need("qemu-io");
    let script = |uri: &str| {
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        for i in 0..40u64 {
            let p = 1 + i % 200;
            args.extend(["-c".into(), format!("write -P {p} {} 4k", i * 4096)]);
            args.extend(["-c".into(), format!("read -P {p} {} 4k", i * 4096)]);
        }
        args.push(uri.into());
        let out = run(Command::new("qemu-io").args(&args));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert_eq!(out.matches("read ").count(), 40, "{out}");
    };
    // A budget no client turnaround exceeds, so every quick request counts.
    let config = ServerConfig::default().with_busy_poll(std::time::Duration::from_millis(200));
    let t = TestServer::start_with(config, vec![Export::new("disk", memory(MIB))]);
    script(&t.uri("disk"));
    let tcp = t.server.export("disk").unwrap().metrics().snapshot();
    assert!(tcp.busy_poll_hits >= 40, "{tcp:?}");
    script(&t.unix_uri("disk"));
    let unix = t.server.export("disk").unwrap().metrics().snapshot();
    assert!(unix.busy_poll_hits >= tcp.busy_poll_hits + 40, "{unix:?}");
    let c = contents(&t.rt, &t.provider("disk"));
    for i in 0..40usize {
        assert!(c[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b as usize == 1 + i % 200));
    }

    let off = ServerConfig::default().with_busy_poll(std::time::Duration::ZERO);
    let t = TestServer::start_with(off, vec![Export::new("disk", memory(MIB))]);
    script(&t.uri("disk"));
    let s = t.server.export("disk").unwrap().metrics().snapshot();
    assert_eq!((s.busy_poll_hits, s.busy_poll_misses), (0, 0), "{s:?}");
    assert_eq!(s.writes, 40);
}

#[test]
fn nbdinfo_list_size_and_map() {
    need("nbdinfo");
    let mem = memory(32 * MIB);
    let tracked = Arc::new(AllocationTracker::new(mem, 64 * 1024));
    let t = TestServer::start(vec![
        Export::new("disk", tracked.clone())
            .with_description("silo test disk")
            .with_allocation(tracked.clone()),
        Export::new("ro", memory(MIB)).read_only(true),
    ]);
    let list = run(Command::new("nbdinfo").args(["--list", &t.uri("")]));
    assert!(list.contains("export=\"disk\""), "{list}");
    assert!(list.contains("description: silo test disk"), "{list}");
    assert!(list.contains("export=\"ro\""), "{list}");
    assert!(list.contains("is_read_only: true"), "{list}");
    assert!(list.contains("block_size_maximum: 33554432"), "{list}");
    // qemu's client lists the same (LIST + INFO + LIST_META_CONTEXT).
    need("qemu-nbd");
    let port = t.port.to_string();
    let qlist = run(Command::new("qemu-nbd").args(["-L", "-b", "127.0.0.1", "-p", &port]));
    assert!(qlist.contains("exports available: 2"), "{qlist}");
    assert!(
        qlist.contains("flush fua trim zeroes multi cache fast-zero"),
        "{qlist}"
    );
    assert!(qlist.contains("readonly"), "{qlist}");
    assert!(qlist.contains("base:allocation"), "{qlist}");
    let size = run(Command::new("nbdinfo").args(["--size", &t.uri("disk")]));
    assert_eq!(size.trim(), (32 * MIB).to_string());

    t.rt.block_on(async {
        tracked.write_slice(MIB, &[1u8; 4096]).await.unwrap();
        tracked
            .write_slice(4 * MIB, &vec![2u8; 2 * MIB as usize])
            .await
            .unwrap();
    });
    let map = run(Command::new("nbdinfo").args(["--map", &t.uri("disk")]));
    let rows: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    let expect = [
        (0, MIB, "3"),
        (MIB, 64 * 1024, "0"),
        (MIB + 64 * 1024, 3 * MIB - 64 * 1024, "3"),
        (4 * MIB, 2 * MIB, "0"),
        (6 * MIB, 26 * MIB, "3"),
    ];
    assert_eq!(rows.len(), expect.len(), "{map}");
    for (row, (off, len, state)) in rows.iter().zip(expect) {
        assert_eq!(row[0], off.to_string(), "{map}");
        assert_eq!(row[1], len.to_string(), "{map}");
        assert_eq!(row[2], state, "{map}");
    }
    // Without an Allocation everything is data.
    let map = run(Command::new("nbdinfo").args(["--map", &t.uri("ro")]));
    assert_eq!(map.lines().count(), 1, "{map}");
    assert!(map.contains("data"), "{map}");
}

#[test]
fn nbdcopy_round_trip_tcp_and_unix() {
    need("nbdcopy");
    let t = TestServer::start(vec![Export::new("disk", memory(48 * MIB))]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = pattern((48 * MIB) as usize, 7);
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy").args([src.to_str().unwrap(), &t.uri("disk")]));
    assert_eq!(sha256(&contents(&t.rt, &t.provider("disk"))), sha256(&data));
    let back = dir.path().join("back.raw");
    run(Command::new("nbdcopy").args([&t.unix_uri("disk"), back.to_str().unwrap()]));
    assert_eq!(sha256_file(&back), sha256(&data));
    let stats = t.server.export("disk").unwrap().metrics().snapshot();
    assert_eq!(stats.bytes_read, 48 * MIB);
    assert!(
        stats.bytes_written == 48 * MIB && stats.writes > 0,
        "{stats:?}"
    );
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!(stats.in_flight, 0, "{stats:?}");
}

#[test]
fn nbdsh_fua_flush_trim_zero_and_block_status() {
    let counting = Counting::new(4 * MIB, Capabilities::ALL);
    let tracked = Arc::new(AllocationTracker::new(counting.clone(), 4096));
    let t = TestServer::start(vec![
        Export::new("disk", tracked.clone()).with_allocation(tracked.clone())
    ]);
    let script = r#"
import nbd
caps = (h.can_fua(), h.can_flush(), h.can_trim(), h.can_zero(), h.can_fast_zero())
assert caps == (True,) * 5, caps
assert h.can_meta_context("base:allocation")
h.pwrite(b"\x5a" * 65536, 0, nbd.CMD_FLAG_FUA)
h.flush()
h.pwrite(b"\x33" * 8192, 1048576)
assert h.pread(65536, 0) == b"\x5a" * 65536
h.trim(4096, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 4096) == bytes(4096), "trimmed"
h.zero(8192, 16384, nbd.CMD_FLAG_NO_HOLE)
h.zero(4096, 32768, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(8192, 16384) == bytes(8192), "zeroed"
assert h.pread(4096, 28672) == b"\x5a" * 4096, "untouched"
seen = []
def cb(meta, off, entries, err):
    assert meta == "base:allocation"
    seen.append((off, list(entries)))
h.block_status(65536, 0, cb)
entries = seen[0][1]
assert seen[0][0] == 0, seen
# 0-4K data, 4K-8K trimmed hole, then data (NO_HOLE zero stays allocated),
# 32K-36K fast-zeroed hole, data up to 64K
assert entries[:6] == [4096, 0, 4096, 3, 24576, 0], entries
assert entries[6:8] == [4096, 3], entries
assert sum(entries[0::2]) == 65536, entries
seen.clear()
h.block_status(65536, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert seen[0][1] == [4096, 0], seen
print("OK")
"#;
    let out = nbdsh(&t.uri("disk"), script);
    assert!(out.contains("OK"), "{out}");
    // FUA write, FLUSH and FUA trim each reached the provider.
    assert!(counting.flushes() >= 3, "flushes: {}", counting.flushes());
    let s = t.server.export("disk").unwrap().metrics().snapshot();
    assert_eq!(
        (s.flushes, s.trims, s.zeroes, s.block_status),
        (1, 1, 2, 2),
        "{s:?}"
    );
}

#[test]
fn nbdsh_errors_out_of_range_read_only_and_unsupported() {
    let no_trim = Counting::new(MIB, Capabilities::NONE);
    let t = TestServer::start(vec![
        Export::new("disk", memory(MIB)),
        Export::new("ro", memory(MIB)).read_only(true),
        Export::new("plain", no_trim.clone()),
    ]);
    let script = r#"
import nbd, errno
h.set_strict_mode(0)  # let the server, not libnbd, judge the requests
def fails(f, code):
    try:
        f()
    except nbd.Error as e:
        assert e.errnum == code, (e.errnum, code, e)
        return
    raise AssertionError("no error")
fails(lambda: h.pread(4096, 1048576 - 100), errno.EINVAL)
fails(lambda: h.pwrite(b"x" * 4096, 1048576 - 100), errno.ENOSPC)
fails(lambda: h.zero(8192, 1048576 - 4096), errno.ENOSPC)
fails(lambda: h.pread(1, 1 << 62), errno.EINVAL)
# still in sync after the errors
h.pwrite(b"ok", 0)
assert h.pread(2, 0) == b"ok"
print("OK")
"#;
    assert!(nbdsh(&t.uri("disk"), script).contains("OK"));

    let script = r#"
import nbd, errno
assert h.is_read_only()
h.set_strict_mode(0)
for f in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.zero(512, 0), lambda: h.trim(512, 0)):
    try:
        f()
        raise AssertionError("write to read-only export succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
assert h.pread(512, 0) == bytes(512)
print("OK")
"#;
    assert!(nbdsh(&t.uri("ro"), script).contains("OK"));

    // A provider without flush/trim/fua/efficient zeroes: nothing advertised.
    let script = r#"
import nbd, errno
assert not h.can_flush() and not h.can_trim() and not h.can_fua() and not h.can_multi_conn()
assert h.can_zero()
h.set_strict_mode(0)
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    raise AssertionError("fast zero on a slow-zero provider succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
h.zero(4096, 0)
print("OK")
"#;
    assert!(nbdsh(&t.uri("plain"), script).contains("OK"));
    assert_eq!(no_trim.flushes(), 0);
}

#[test]
fn nbdsh_several_connections_at_once() {
    let t = TestServer::start(vec![Export::new("disk", memory(8 * MIB))]);
    let uri = t.uri("disk");
    let script = format!(
        r#"
import nbd
assert h.can_multi_conn()
hs = [h]
for i in range(3):
    x = nbd.NBD()
    x.connect_uri("{uri}")
    hs.append(x)
# many requests in flight on every connection at once
cookies = []
for round in range(8):
    for i, x in enumerate(hs):
        buf = nbd.Buffer.from_bytearray(bytearray([i * 16 + round]) * 65536)
        cookies.append((x, x.aio_pwrite(buf, (i * 8 + round) * 65536)))
for x, c in cookies:
    while not x.aio_command_completed(c):
        x.poll(-1)
hs[3].flush()
for i in range(4):
    for round in range(8):
        # each connection reads what the others wrote
        y = hs[(i + 1) % 4]
        assert y.pread(65536, (i * 8 + round) * 65536) == bytes([i * 16 + round]) * 65536
print("OK")
"#
    );
    assert!(nbdsh(&uri, &script).contains("OK"));
    let s = t.server.export("disk").unwrap().metrics().snapshot();
    assert_eq!(s.writes, 32);
    assert!(s.connections_total >= 4, "{s:?}");
}

/// Large reads of a cached file export go out with `sendfile`, over TCP
/// and Unix sockets, with structured and simple replies, at unaligned
/// offsets, and return the file's bytes; with `sendfile_reads` off the
/// same reads are served from memory.
#[test]
fn file_export_reads_go_out_with_sendfile() {
    use silo_storage::sources::{Engine, FileStorage};
    need("nbdcopy");
    need("qemu-io");
    let size = 40 * MIB;
    for on in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let disk: DynProvider =
            Arc::new(FileStorage::create(dir.path().join("disk.raw"), size, Engine::Auto).unwrap());
        let config = ServerConfig::default().with_sendfile_reads(on);
        let t = TestServer::start_with(config, vec![Export::new("disk", disk)]);
        let src = dir.path().join("src.raw");
        let mut data = pattern(size as usize, 11);
        std::fs::write(&src, &data).unwrap();
        run(Command::new("nbdcopy").args([src.to_str().unwrap(), &t.uri("disk")]));
        for (i, uri) in [t.uri("disk"), t.unix_uri("disk")].iter().enumerate() {
            let back = dir.path().join(format!("back{i}.raw"));
            run(Command::new("nbdcopy").args([uri, back.to_str().unwrap()]));
            assert_eq!(sha256_file(&back), sha256(&data), "{uri}, sendfile {on}");
        }
        // Unaligned, and read right after it was written.
        let out = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 9 1000003 200k",
            "-c",
            "read -P 9 1000003 200k",
            &t.uri("disk"),
        ]));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        data[1000003..1000003 + 200 * 1024].fill(9);
        // Simple replies (what the kernel client speaks).
        let got = dir.path().join("simple.raw");
        let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
        let script = format!(
            "h.set_request_structured_replies(False)\n\
             h.connect_uri({uri:?})\n\
             assert not h.get_structured_replies_negotiated()\n\
             open({got:?}, 'wb').write(h.pread(262144, 999999))\n\
             h.shutdown()",
            uri = t.uri("disk"),
            got = got.to_str().unwrap(),
        );
        run(Command::new("nbdsh")
            .env("PATH", path)
            .args(["-c", &script]));
        assert!(
            std::fs::read(&got).unwrap() == data[999999..999999 + 262144],
            "simple-reply read differs, sendfile {on}"
        );
        let s = t.server.export("disk").unwrap().metrics().snapshot();
        assert_eq!(s.errors, 0, "{s:?}");
        if on {
            // Most of 80 MiB of nbdcopy reads, in 256 KiB requests.
            assert!(s.sendfile_reads >= 100, "{s:?}");
        } else {
            assert_eq!(s.sendfile_reads, 0, "{s:?}");
        }
    }
}
