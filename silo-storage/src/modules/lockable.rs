//! [`Lockable`]: pauses reads and writes between [`lock`](Lockable::lock) and
//! [`unlock`](Lockable::unlock). Used for cut-over: the migrator locks the
//! source, runs the final dirty round and hands authority to the destination.
//!
//! * Operations that arrive while locked **wait** (they do not fail) and
//!   proceed in any order after `unlock()`.
//! * `lock()` returns only after every read/write/trim/write-zeroes that was
//!   already in progress has finished, so once it returns nothing is being
//!   written below this layer.
//! * `flush` is not gated (it writes nothing new), `cancel_writes` is
//!   forwarded.
//! * `close()` releases waiting operations with [`Error::Closed`](crate::Error::Closed),
//!   waits for in-flight ones and closes the inner provider, so a device left
//!   locked can always be shut down.

use super::gate::{Gated, ReadsAndWrites};
use crate::provider::DynProvider;

/// A provider whose reads and writes can be paused (see the module docs).
/// Construct with `Lockable::new(inner)`; `lock()`, `unlock()`,
/// `is_locked()` and [`LockControl`](super::LockControl) are on [`Gated`].
pub type Lockable<P = DynProvider> = Gated<P, ReadsAndWrites>;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::provider::{Provider, ProviderExt};
    use crate::sources::MemoryStorage;
    use crate::ErrorKind;

    #[tokio::test]
    async fn lock_pauses_reads_and_writes() {
        let l = Arc::new(Lockable::new(MemoryStorage::new(4096)));
        l.lock().await;
        assert!(l.is_locked());
        let w = tokio::spawn({
            let l = l.clone();
            async move { l.write_slice(0, &[1; 10]).await }
        });
        let r = tokio::spawn({
            let l = l.clone();
            async move { l.read_bytes(0, 10).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!w.is_finished() && !r.is_finished());
        // The write has not reached the inner provider.
        assert_eq!(&l.inner().read_bytes(0, 10).await.unwrap()[..], &[0; 10]);
        l.unlock();
        w.await.unwrap().unwrap();
        r.await.unwrap().unwrap();
        assert_eq!(&l.read_bytes(0, 10).await.unwrap()[..], &[1; 10]);
    }

    #[tokio::test]
    async fn close_releases_waiters() {
        let l = Arc::new(Lockable::new(MemoryStorage::new(4096)));
        l.lock().await;
        let w = tokio::spawn({
            let l = l.clone();
            async move { l.write_slice(0, &[1; 10]).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        l.close().await.unwrap();
        assert_eq!(w.await.unwrap().unwrap_err().kind(), ErrorKind::Closed);
    }
}
