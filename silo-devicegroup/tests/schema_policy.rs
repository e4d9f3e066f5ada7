//! The receiver's trust policy for sender-supplied schemas.

use std::path::{Path, PathBuf};

use silo_devicegroup::policy::{
    rewrite_paths_into, sanitize, PolicyError, ReceivePolicy, ReceiverS3,
};
use silo_devicegroup::schema::{decode_device_hcl, DeviceSchema, System};

fn base() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn file_device(location: &str) -> DeviceSchema {
    let mut d = DeviceSchema::new("disk", System::File, 1 << 30);
    d.location = Some(PathBuf::from(location));
    d
}

/// A hostile sender's schema as it would arrive over the wire.
fn from_wire(body: &str) -> DeviceSchema {
    decode_device_hcl(&format!("device \"disk\" {{\n{body}}}\n"), "<peer>").unwrap()
}

fn receiver_s3() -> ReceiverS3 {
    ReceiverS3 {
        endpoint: "127.0.0.1:9000".into(),
        bucket: "mine".into(),
        access_key: "receiver-ak".into(),
        secret_key: "receiver-sk".into(),
        secure: true,
        prefix: "hop2-".into(),
        grab_prefix: None,
        auto_start: false,
    }
}

#[test]
fn relative_paths_are_joined_to_the_base() {
    let dir = base();
    let policy = ReceivePolicy::new(dir.path());
    let out = sanitize(&policy, file_device("sub/disk0.img")).unwrap();
    assert_eq!(out.location.unwrap(), dir.path().join("sub/disk0.img"));
    let out = sanitize(&policy, file_device("a/../b/./disk")).unwrap();
    assert_eq!(out.location.unwrap(), dir.path().join("b/disk"));
}

#[test]
fn absolute_path_inside_base_is_accepted() {
    let dir = base();
    let inside = dir.path().join("images/disk0.img");
    let out = sanitize(
        &ReceivePolicy::new(dir.path()),
        file_device(inside.to_str().unwrap()),
    )
    .unwrap();
    assert_eq!(out.location.unwrap(), inside);
}

#[test]
fn escapes_are_refused() {
    let dir = base();
    let policy = ReceivePolicy::new(dir.path());
    for hostile in [
        "../outside.img",
        "a/../../outside.img",
        "/etc/passwd",
        "/",
        ".",
        "..",
        &format!("{}/../x", dir.path().display()),
        &format!("{}", dir.path().display()),
    ] {
        let e = sanitize(&policy, file_device(hostile)).unwrap_err();
        assert!(
            matches!(e, PolicyError::PathOutsideBase { ref field, .. } if field == "location"),
            "{hostile}: {e}"
        );
        assert!(
            e.to_string()
                .contains("outside the receiver's base directory"),
            "{e}"
        );
    }
}

#[test]
fn every_path_field_is_confined_including_nested_sources() {
    let dir = base();
    let policy = ReceivePolicy::new(dir.path());
    let fields = [
        ("binlog = \"/tmp/evil.binlog\"\n", "binlog"),
        ("loadbinlog = \"../evil\"\n", "loadbinlog"),
        ("sourcehashes = \"/etc/shadow\"\n", "sourcehashes"),
        (
            "source \"/etc/cron.d/evil\" {\n system = \"memory\"\n size = \"1g\"\n}\n",
            "source (copy-on-write state file)",
        ),
        (
            "source \"ok.state\" {\n system = \"file\"\n size = \"1g\"\n location = \"/dev/sda\"\n}\n",
            "source.location",
        ),
    ];
    for (extra, field) in fields {
        let d = from_wire(&format!(
            "system = \"file\"\nsize = \"1g\"\nlocation = \"disk.img\"\n{extra}"
        ));
        let e = sanitize(&policy, d).unwrap_err();
        assert!(
            matches!(e, PolicyError::PathOutsideBase { field: ref f, .. } if f == field),
            "{field}: {e}"
        );
    }
    // The same fields inside the base are rewritten to absolute paths in it.
    let d = from_wire(
        "system = \"file\"\nsize = \"1g\"\nlocation = \"disk.img\"\nbinlog = \"log\"\nloadbinlog = \"load\"\nsourcehashes = \"h\"\nsource \"s.state\" {\n system = \"file\"\n size = \"1g\"\n location = \"base.img\"\n}\n",
    );
    let out = sanitize(&policy, d).unwrap();
    assert_eq!(
        out.binlog.as_deref(),
        Some(dir.path().join("log").as_path())
    );
    assert_eq!(
        out.load_binlog.as_deref(),
        Some(dir.path().join("load").as_path())
    );
    assert_eq!(
        out.source_hashes.as_deref(),
        Some(dir.path().join("h").as_path())
    );
    assert_eq!(out.cow_state_file().unwrap(), dir.path().join("s.state"));
    assert_eq!(
        out.source.unwrap().location.unwrap(),
        dir.path().join("base.img")
    );
}

#[test]
fn symlink_escapes_are_refused() {
    let dir = base();
    let outside = base();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("pw")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", dir.path().join("dangling")).unwrap();
    let policy = ReceivePolicy::new(dir.path());
    for hostile in ["link/disk.img", "link", "pw"] {
        let e = sanitize(&policy, file_device(hostile)).unwrap_err();
        assert!(
            matches!(e, PolicyError::PathOutsideBase { .. }),
            "{hostile}: {e}"
        );
    }
    let e = sanitize(&policy, file_device("dangling")).unwrap_err();
    assert!(
        matches!(
            e,
            PolicyError::PathUnresolvable { .. } | PolicyError::PathOutsideBase { .. }
        ),
        "{e}"
    );
    // A symlink that stays inside is fine.
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("inner")).unwrap();
    sanitize(&policy, file_device("inner/disk.img")).unwrap();
}

#[test]
fn base_dir_given_through_a_symlink_still_works() {
    let dir = base();
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("alias")).unwrap();
    let policy = ReceivePolicy::new(dir.path().join("alias"));
    let out = sanitize(&policy, file_device("disk.img")).unwrap();
    assert_eq!(out.location.unwrap(), dir.path().join("alias/disk.img"));
}

#[test]
fn expose_is_refused_by_default_and_allowed_by_the_receiver() {
    let dir = base();
    let d = from_wire("system = \"memory\"\nsize = \"1g\"\nexpose = true\n");
    let out = sanitize(&ReceivePolicy::new(dir.path()), d.clone()).unwrap();
    assert!(!out.expose, "sender's expose must be ignored by default");
    let mut policy = ReceivePolicy::new(dir.path());
    policy.allow_expose = true;
    assert!(sanitize(&policy, d).unwrap().expose);
}

#[test]
fn s3_credentials_from_the_sender_are_dropped() {
    let dir = base();
    let d = from_wire(
        "system = \"memory\"\nsize = \"1g\"\nblocksize = \"1m\"\nsync {\n secure = false\n accesskey = \"SENDER-AK\"\n secretkey = \"SENDER-SK\"\n endpoint = \"evil.example:80\"\n bucket = \"evilbucket\"\n prefix = \"hop1-\"\n autostart = true\n grabconcurrency = 8\n config {\n  onlydirty = true\n  blockshift = 2\n  maxage = \"1s\"\n  minchanged = 2\n  checkperiod = \"1s\"\n  limit = 10\n  concurrency = 4\n }\n}\n",
    );
    // Without receiver S3 settings the sync block goes away entirely.
    let out = sanitize(&ReceivePolicy::new(dir.path()), d.clone()).unwrap();
    assert!(out.sync.is_none());

    let mut policy = ReceivePolicy::new(dir.path());
    policy.s3 = Some(receiver_s3());
    let out = sanitize(&policy, d).unwrap();
    let s = out.sync.unwrap();
    assert_eq!(s.access_key, "receiver-ak");
    assert_eq!(s.secret_key, "receiver-sk");
    assert_eq!(s.endpoint, "127.0.0.1:9000");
    assert_eq!(s.bucket, "mine");
    assert!(s.secure);
    assert!(!s.auto_start);
    assert_eq!(s.prefix, "hop2-");
    assert_eq!(s.grab_prefix, "hop1-", "grab where the sender uploaded");
    // Tuning survives.
    assert_eq!(s.config.concurrency, 4);
    assert!(s.config.only_dirty);
    let text = silo_devicegroup::encode_device_hcl(&out_again(&policy));
    assert!(!text.contains("SENDER"), "{text}");
}

fn out_again(policy: &ReceivePolicy) -> DeviceSchema {
    let mut d = DeviceSchema::new("x", System::Memory, 1 << 20);
    d.block_size = Some(1 << 20);
    d.sync = Some(silo_devicegroup::SyncSchema {
        secure: false,
        access_key: "SENDER-AK".into(),
        secret_key: "SENDER-SK".into(),
        endpoint: "SENDER".into(),
        bucket: "SENDERB".into(),
        prefix: String::new(),
        grab_prefix: String::new(),
        auto_start: true,
        grab_concurrency: 1,
        config: silo_devicegroup::SyncConfigSchema {
            only_dirty: false,
            block_shift: 0,
            max_age: std::time::Duration::from_secs(1),
            min_changed: 1,
            check_period: std::time::Duration::from_secs(1),
            limit: 1,
            concurrency: 1,
        },
    });
    sanitize(policy, d).unwrap()
}

#[test]
fn absurd_sizes_are_refused() {
    let dir = base();
    let policy = ReceivePolicy::new(dir.path());
    // Valid for the schema (1 PiB) but far above the receiver's limit.
    let d = from_wire("system = \"sparsefile\"\nsize = \"1024t\"\nlocation = \"s.img\"\n");
    let e = sanitize(&policy, d).unwrap_err();
    assert!(
        matches!(e, PolicyError::SizeTooLarge { bytes, .. } if bytes == 1 << 50),
        "{e}"
    );
    // Memory devices have a lower limit: they are RAM.
    let d = from_wire("system = \"memory\"\nsize = \"64g\"\n");
    let e = sanitize(&policy, d).unwrap_err();
    assert!(
        matches!(e, PolicyError::SizeTooLarge { ref field, .. } if field == "size"),
        "{e}"
    );
    // Also inside a copy-on-write base.
    let d = from_wire(
        "system = \"file\"\nsize = \"64g\"\nlocation = \"o\"\nsource \"s\" {\n system = \"memory\"\n size = \"64g\"\n}\n",
    );
    let e = sanitize(&policy, d).unwrap_err();
    assert!(
        matches!(e, PolicyError::SizeTooLarge { ref field, .. } if field == "source.size"),
        "{e}"
    );
    // An absurd size on the wire does not even parse.
    assert!(decode_device_hcl(
        "device \"d\" {\n system = \"memory\"\n size = \"99999t\"\n}\n",
        "<peer>"
    )
    .is_err());
}

#[test]
fn systems_outside_the_policy_are_refused() {
    let dir = base();
    let d = from_wire("system = \"s3\"\nsize = \"1g\"\nlocation = \"s3://theirs/x\"\n");
    let e = sanitize(&ReceivePolicy::new(dir.path()), d.clone()).unwrap_err();
    assert!(
        matches!(
            e,
            PolicyError::SystemNotAllowed {
                system: System::S3,
                ..
            }
        ),
        "{e}"
    );
    // Allowed, but the sender's bucket is never used: without S3 settings
    // of its own the receiver has nowhere to put the device.
    let mut policy = ReceivePolicy::new(dir.path());
    policy.allowed_systems.push(System::S3);
    let e = sanitize(&policy, d.clone()).unwrap_err();
    assert!(e.to_string().contains("location"), "{e}");
    policy.s3 = Some(receiver_s3());
    let got = sanitize(&policy, d).unwrap();
    let want = format!(
        "s3://mine/{}",
        silo_devicegroup::device_prefix(&receiver_s3().prefix, "disk")
    );
    assert_eq!(got.location, Some(PathBuf::from(want)));
}

#[test]
fn pid_is_dropped_and_invalid_schemas_are_refused() {
    let dir = base();
    let policy = ReceivePolicy::new(dir.path());
    let d = from_wire("system = \"memory\"\nsize = \"1g\"\npid = 42\n");
    assert_eq!(sanitize(&policy, d).unwrap().pid, None);
    let mut bad = DeviceSchema::new("x", System::Memory, 0);
    bad.block_size = Some(3);
    assert!(matches!(
        sanitize(&policy, bad),
        Err(PolicyError::Schema(_))
    ));
}

#[test]
fn rewrite_paths_into_a_directory() {
    let d = from_wire(
        "system = \"file\"\nsize = \"1g\"\nlocation = \"/data/vm1/disk.img\"\nbinlog = \"/var/log/disk.binlog\"\nsource \"/data/vm1/disk.state\" {\n system = \"file\"\n size = \"1g\"\n location = \"/images/disk.img\"\n}\n",
    );
    let out = rewrite_paths_into(d, Path::new("/srv/recv"));
    assert_eq!(
        out.location.as_deref(),
        Some(Path::new("/srv/recv/disk.img"))
    );
    assert_eq!(
        out.binlog.as_deref(),
        Some(Path::new("/srv/recv/disk.binlog"))
    );
    assert_eq!(
        out.cow_state_file(),
        Some(Path::new("/srv/recv/disk.state"))
    );
    // The base's file name collides with the overlay's: it gets a suffix.
    let src = out.source.as_deref().unwrap();
    assert_eq!(
        src.location.as_deref(),
        Some(Path::new("/srv/recv/disk.img.1"))
    );
    out.validate().unwrap();

    // Rewritten paths pass the policy of that directory.
    let dir = base();
    let d = rewrite_paths_into(file_device("/elsewhere/x.img"), dir.path());
    let clean = sanitize(&ReceivePolicy::new(dir.path()), d).unwrap();
    assert_eq!(clean.location.unwrap(), dir.path().join("x.img"));
}
