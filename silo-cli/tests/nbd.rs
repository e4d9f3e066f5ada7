//! `silo nbd`: a schema's devices served as NBD exports, checked with
//! `nbdinfo`, `qemu-io` and `qemu-img` over TCP and a Unix socket.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn schema(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::write(dir.join("disk.img"), pattern(4 << 20, 7)).unwrap();
    write_config(
        dir,
        &format!(
            r#"
device "disk" {{
  system    = "file"
  size      = "4m"
  blocksize = "64k"
  location  = "{}"
}}
device "ram" {{
  system = "memory"
  size   = "2m"
}}
"#,
            dir.join("disk.img").display()
        ),
    )
}

#[test]
fn nbd_serves_the_schema_devices_over_tcp() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = schema(tmp.path());
    let addr = free_addr();
    let mut p = Proc::start(
        tmp.path(),
        "nbd",
        &[
            "nbd",
            "--config",
            conf.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
        ],
    );
    p.wait_for("serving 2 export(s)", T);
    let (ok, list) = tool("nbdinfo", &["--list", &format!("nbd://{addr}")]);
    assert!(ok, "{list}");
    assert!(list.contains("export=\"disk\""), "{list}");
    assert!(list.contains("export=\"ram\""), "{list}");
    assert!(list.contains("export-size: 4194304"), "{list}");
    assert!(list.contains("export-size: 2097152"), "{list}");
    // The file's data, read back whole with qemu-img.
    let copy = tmp.path().join("copy.img");
    let (ok, o) = tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("nbd://{addr}/disk"),
            copy.to_str().unwrap(),
        ],
    );
    assert!(ok, "{o}");
    assert_eq!(std::fs::read(&copy).unwrap(), pattern(4 << 20, 7));
    // Writes and reads through both exports.
    for export in ["disk", "ram"] {
        let url = format!("nbd://{addr}/{export}");
        let (ok, o) = tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x3c 12345 70000",
                "-c",
                "read -P 0x3c 12345 70000",
                &url,
            ],
        );
        assert!(ok && !o.contains("verification failed"), "{export}: {o}");
    }
    // Out of range is an error, not a crash.
    let (ok, o) = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read 4M 4k",
            &format!("nbd://{addr}/disk"),
        ],
    );
    assert!(
        !ok || o.contains("error") || o.contains("Input/output") || o.contains("Invalid"),
        "{o}"
    );
    // SIGTERM: clean exit, the write is in the file.
    p.term();
    assert_eq!(p.wait(T), 0, "{}\n{}", p.stdout(), p.stderr());
    let data = std::fs::read(tmp.path().join("disk.img")).unwrap();
    assert!(data[12345..12345 + 70000].iter().all(|&b| b == 0x3c));
    assert_eq!(data[..12345], pattern(4 << 20, 7)[..12345]);
}

#[test]
fn nbd_serves_over_a_unix_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = schema(tmp.path());
    let sock = tmp.path().join("nbd.sock");
    let mut p = Proc::start(
        tmp.path(),
        "nbd",
        &[
            "nbd",
            "--config",
            conf.to_str().unwrap(),
            "--unix",
            sock.to_str().unwrap(),
        ],
    );
    p.wait_for("serving 2 export(s)", T);
    let (ok, list) = tool(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={}", sock.display())],
    );
    assert!(ok, "{list}");
    assert!(
        list.contains("export=\"disk\"") && list.contains("export=\"ram\""),
        "{list}"
    );
    let (ok, o) = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 64k",
            "-c",
            "read -P 0x77 0 64k",
            &format!("nbd+unix:///ram?socket={}", sock.display()),
        ],
    );
    assert!(ok && !o.contains("verification failed"), "{o}");
    p.term();
    assert_eq!(p.wait(T), 0, "{}\n{}", p.stdout(), p.stderr());
    assert!(!sock.exists(), "the socket file is removed on exit");
}
