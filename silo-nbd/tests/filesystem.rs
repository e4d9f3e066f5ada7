//! A real ext4 filesystem on a silo export, through the kernel's block
//! layer: export → nbdfuse → losetup → mkfs.ext4 → mount → write files →
//! umount → fsck -n → mount again and verify. Needs root (as in CI) and
//! /dev/fuse + loop devices; it fails, never skips, when they are missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use silo_nbd::Export;
use silo_storage::{DynProvider, MemoryStorage};

/// Undoes whatever was set up, in reverse order, even if the test panics.
#[derive(Default)]
struct Cleanup {
    mounted: Option<PathBuf>,
    loop_dev: Option<String>,
    fuse_dir: Option<PathBuf>,
    nbdfuse: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
        if let Some(l) = self.loop_dev.take() {
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
        if let Some(d) = self.fuse_dir.take() {
            let _ = Command::new("fusermount3").arg("-u").arg(&d).status();
        }
        if let Some(mut c) = self.nbdfuse.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).trim() == "0"
}

fn mount(dev: &str, dir: &Path, c: &mut Cleanup) {
    run(Command::new("mount").arg(dev).arg(dir));
    c.mounted = Some(dir.to_path_buf());
}

fn umount(c: &mut Cleanup) {
    let m = c.mounted.take().expect("mounted");
    run(Command::new("umount").arg(&m));
}

#[test]
fn ext4_on_a_silo_export_survives_umount_fsck_and_remount() {
    assert!(
        is_root(),
        "this test needs root (loop devices, mount); run the suite as root as CI does"
    );
    for t in [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "fusermount3",
    ] {
        need(t);
    }
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    let mem: DynProvider = Arc::new(MemoryStorage::new(256 << 20));
    let t = TestServer::start(vec![Export::new("disk", mem)]);
    let dir = tempfile::tempdir().unwrap();
    let fuse_dir = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let pidfile = dir.path().join("nbdfuse.pid");
    let mut c = Cleanup::default();

    c.nbdfuse = Some(
        Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&fuse_dir)
            .arg(t.uri("disk"))
            .spawn()
            .expect("spawn nbdfuse"),
    );
    c.fuse_dir = Some(fuse_dir.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "nbdfuse did not become ready");
        if let Some(s) = c.nbdfuse.as_mut().unwrap().try_wait().unwrap() {
            panic!("nbdfuse exited early: {s}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let image = fuse_dir.join("nbd");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 256 << 20);

    let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&image))
        .trim()
        .to_string();
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    c.loop_dev = Some(dev.clone());

    run(Command::new("mkfs.ext4").args(["-q", "-F", &dev]));
    mount(&dev, &mnt, &mut c);
    let mut files = Vec::new();
    for i in 0..20u64 {
        let data = pattern(((i + 1) * 37_000) as usize, i);
        let p = mnt.join(format!("file-{i}.bin"));
        std::fs::write(&p, &data).unwrap();
        files.push((format!("file-{i}.bin"), sha256(&data)));
    }
    std::fs::create_dir(mnt.join("sub")).unwrap();
    std::fs::write(mnt.join("sub/hello.txt"), b"hello from silo\n").unwrap();
    run(&mut Command::new("sync"));
    umount(&mut c);

    // Clean filesystem after unmount: fsck -n exits 0.
    let out = output(Command::new("fsck.ext4").args(["-n", "-f", &dev]));
    assert!(
        out.status.success(),
        "fsck -n found problems: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    mount(&dev, &mnt, &mut c);
    for (name, sum) in &files {
        assert_eq!(&sha256_file(&mnt.join(name)), sum, "{name} changed");
    }
    assert_eq!(
        std::fs::read(mnt.join("sub/hello.txt")).unwrap(),
        b"hello from silo\n"
    );
    umount(&mut c);
    drop(c);
    let s = t.server.export("disk").unwrap().metrics().snapshot();
    assert!(s.writes > 0 && s.reads > 0 && s.errors == 0, "{s:?}");
}
