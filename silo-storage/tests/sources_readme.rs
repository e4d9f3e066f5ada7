//! The example of README.md, kept compiling and passing here (keep the two
//! in sync).

use bytes::{Bytes, BytesMut};
use silo_storage::sources::{Engine, FileStorage, SparseFile};
use silo_storage::{hash, MemoryStorage, Provider, ProviderExt};

#[tokio::test]
async fn readme_example() -> Result<(), silo_storage::Error> {
    let dir = tempfile::tempdir().unwrap();

    // A 10 MB device in memory (size need not be a multiple of anything).
    let mem = MemoryStorage::new(10_000_000);
    mem.write_at(4096, Bytes::from_static(b"hello")).await?;

    // The same size as a file; Auto uses io_uring when the kernel allows.
    let file = FileStorage::create(dir.path().join("disk.img"), 10_000_000, Engine::Auto)?;
    tracing::info!(engine = ?file.engine(), "file storage open");
    file.write_slice(4096, b"hello").await?;
    file.flush().await?;

    // Reads take an owned buffer and give it back filled.
    let buf = file.read_at(4096, BytesMut::zeroed(5)).await?;
    assert_eq!(&buf[..], b"hello");

    // Out-of-range I/O is an error, never a truncation.
    assert!(file.read_at(9_999_999, BytesMut::zeroed(2)).await.is_err());

    // Whole-device comparison and hashes.
    assert!(hash::equal(&mem, &file).await?);
    let digest = hash::sha256(&file).await?;
    tracing::info!(sha256 = %hash::to_hex(&digest));

    // A sparse file stores only written 64 KiB blocks.
    let sparse = SparseFile::create(dir.path().join("disk.sparse"), 10_000_000, 65536)?;
    sparse.write_slice(4096, b"hello").await?;
    assert_eq!(sparse.stored_blocks(), 1);

    file.close().await?;
    sparse.close().await?;
    Ok(())
}
