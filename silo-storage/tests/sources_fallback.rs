//! The fallback when io_uring is unavailable. `SILO_URING=off` makes the
//! once-per-process probe fail, as an old kernel or a seccomp profile would;
//! this file is its own test process and holds a single test, so the
//! variable is set before anything probes.

use bytes::Bytes;
use silo_storage::sources::{Engine, FileStorage};
use silo_storage::{ErrorKind, Provider, ProviderExt};

#[tokio::test]
async fn auto_falls_back_to_blocking_when_uring_is_unavailable() {
    std::env::set_var("SILO_URING", "off");
    let reason = Engine::uring_available().unwrap_err();
    assert!(reason.contains("SILO_URING"), "{reason}");
    let dir = tempfile::tempdir().unwrap();
    let f = FileStorage::create(dir.path().join("f"), 10_000, Engine::Auto).unwrap();
    assert_eq!(f.engine(), Engine::Blocking);
    f.write_at(9_000, Bytes::from_static(b"still works"))
        .await
        .unwrap();
    assert_eq!(&f.read_bytes(9_000, 11).await.unwrap()[..], b"still works");
    // Forcing io_uring now fails with the reason, at open time.
    let e = FileStorage::create(dir.path().join("g"), 10_000, Engine::Uring).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("SILO_URING"), "{e}");
}
