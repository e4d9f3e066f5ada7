//! [`ReadOnlyGate`]: like [`Lockable`](super::Lockable) but only writes
//! (write, trim, write-zeroes) wait while it is locked; reads always pass.
//! `lock()` returns once no write is in progress below this layer.

use super::gate::{Gated, WritesOnly};
use crate::provider::DynProvider;

/// A provider whose writes can be paused while reads continue. Construct
/// with `ReadOnlyGate::new(inner)`; the control methods are on [`Gated`].
pub type ReadOnlyGate<P = DynProvider> = Gated<P, WritesOnly>;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;

    #[tokio::test]
    async fn reads_pass_writes_wait() {
        let g = Arc::new(ReadOnlyGate::new(MemoryStorage::new(4096)));
        g.lock().await;
        let w = tokio::spawn({
            let g = g.clone();
            async move { g.write_slice(0, &[9; 4]).await }
        });
        // Reads are not paused.
        assert_eq!(&g.read_bytes(0, 4).await.unwrap()[..], &[0; 4]);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!w.is_finished());
        g.unlock();
        w.await.unwrap().unwrap();
        assert_eq!(&g.read_bytes(0, 4).await.unwrap()[..], &[9; 4]);
    }
}
