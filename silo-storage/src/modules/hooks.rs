//! [`Hooks`]: replaceable callbacks before and after reads, writes, flushes
//! and close. Every hook defaults to pass-through; hooks can be set, replaced
//! or removed at any time (also while I/O is running).
//!
//! * A **pre** hook returns `None` to continue with the inner provider, or
//!   `Some(result)` to short-circuit: the inner provider is not called and
//!   `result` is returned (a pre-read hook that returns `Some(Ok(()))` must
//!   have filled the buffer it was given). This is how tests inject faults.
//! * A **post** hook sees the inner provider's result and returns the result
//!   the caller gets (usually unchanged).
//!
//! Trim, write-zeroes and cancel-writes are forwarded without hooks.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;

use crate::error::Result;
use crate::provider::{DynProvider, Provider};

/// Before a read: `(offset, buffer)`.
pub type PreRead = Arc<dyn Fn(u64, &mut BytesMut) -> Option<Result<()>> + Send + Sync>;
/// After a read: `(offset, result)` → result.
pub type PostRead = Arc<dyn Fn(u64, Result<BytesMut>) -> Result<BytesMut> + Send + Sync>;
/// Before a write: `(offset, data)`.
pub type PreWrite = Arc<dyn Fn(u64, &Bytes) -> Option<Result<()>> + Send + Sync>;
/// After a write: `(offset, data, result)` → result.
pub type PostWrite = Arc<dyn Fn(u64, &Bytes, Result<()>) -> Result<()> + Send + Sync>;
/// Before a flush or close.
pub type PreCall = Arc<dyn Fn() -> Option<Result<()>> + Send + Sync>;
/// After a flush or close: result → result.
pub type PostCall = Arc<dyn Fn(Result<()>) -> Result<()> + Send + Sync>;

#[derive(Default, Clone)]
struct Set {
    pre_read: Option<PreRead>,
    post_read: Option<PostRead>,
    pre_write: Option<PreWrite>,
    post_write: Option<PostWrite>,
    pre_flush: Option<PreCall>,
    post_flush: Option<PostCall>,
    pre_close: Option<PreCall>,
    post_close: Option<PostCall>,
}

/// A provider with replaceable pre/post callbacks.
pub struct Hooks<P = DynProvider> {
    inner: P,
    set: RwLock<Set>,
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident, $field:ident, $ty:ty) => {
        $(#[$doc])*
        pub fn $name(&self, hook: Option<$ty>) {
            self.set.write().$field = hook;
        }
    };
}

impl<P: Provider> Hooks<P> {
    /// Wraps `inner` with no hooks set.
    pub fn new(inner: P) -> Self {
        Hooks {
            inner,
            set: RwLock::default(),
        }
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    setter!(
        /// Sets (or with `None` removes) the pre-read hook.
        set_pre_read, pre_read, PreRead);
    setter!(
        /// Sets (or removes) the post-read hook.
        set_post_read, post_read, PostRead);
    setter!(
        /// Sets (or removes) the pre-write hook.
        set_pre_write, pre_write, PreWrite);
    setter!(
        /// Sets (or removes) the post-write hook.
        set_post_write, post_write, PostWrite);
    setter!(
        /// Sets (or removes) the pre-flush hook.
        set_pre_flush, pre_flush, PreCall);
    setter!(
        /// Sets (or removes) the post-flush hook.
        set_post_flush, post_flush, PostCall);
    setter!(
        /// Sets (or removes) the pre-close hook.
        set_pre_close, pre_close, PreCall);
    setter!(
        /// Sets (or removes) the post-close hook.
        set_post_close, post_close, PostCall);

    /// Removes every hook.
    pub fn clear(&self) {
        *self.set.write() = Set::default();
    }
}

#[async_trait]
impl<P: Provider> Provider for Hooks<P> {
    forward!(inner; size, capabilities, trim, write_zeroes, cancel_writes);

    async fn read_at(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
        let (pre, post) = {
            let s = self.set.read();
            (s.pre_read.clone(), s.post_read.clone())
        };
        if let Some(pre) = pre {
            if let Some(r) = pre(offset, &mut buf) {
                return r.map(|_| buf);
            }
        }
        let r = self.inner.read_at(offset, buf).await;
        match post {
            Some(post) => post(offset, r),
            None => r,
        }
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let (pre, post) = {
            let s = self.set.read();
            (s.pre_write.clone(), s.post_write.clone())
        };
        if let Some(pre) = pre {
            if let Some(r) = pre(offset, &data) {
                return r;
            }
        }
        match post {
            Some(post) => {
                let r = self.inner.write_at(offset, data.clone()).await;
                post(offset, &data, r)
            }
            None => self.inner.write_at(offset, data).await,
        }
    }
    async fn flush(&self) -> Result<()> {
        let (pre, post) = {
            let s = self.set.read();
            (s.pre_flush.clone(), s.post_flush.clone())
        };
        if let Some(r) = pre.and_then(|f| f()) {
            return r;
        }
        let r = self.inner.flush().await;
        match post {
            Some(post) => post(r),
            None => r,
        }
    }
    async fn close(&self) -> Result<()> {
        let (pre, post) = {
            let s = self.set.read();
            (s.pre_close.clone(), s.post_close.clone())
        };
        if let Some(r) = pre.and_then(|f| f()) {
            return r;
        }
        let r = self.inner.close().await;
        match post {
            Some(post) => post(r),
            None => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;
    use crate::{Error, ErrorKind, Op};

    #[tokio::test]
    async fn pre_hooks_short_circuit() {
        let h = Hooks::new(MemoryStorage::new(4096));
        h.set_pre_write(Some(Arc::new(|off, _d: &Bytes| {
            (off >= 1024).then(|| {
                Err(Error::io(
                    Op::Write,
                    off,
                    1,
                    std::io::Error::other("injected"),
                ))
            })
        })));
        h.write_slice(0, &[1; 10]).await.unwrap();
        let e = h.write_slice(2048, &[1; 10]).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(&h.inner().read_bytes(2048, 10).await.unwrap()[..], &[0; 10]);
        // A pre-read hook serves its own data.
        h.set_pre_read(Some(Arc::new(|_, b: &mut BytesMut| {
            b.fill(7);
            Some(Ok(()))
        })));
        assert_eq!(&h.read_bytes(0, 4).await.unwrap()[..], &[7; 4]);
        h.set_pre_read(None);
        assert_eq!(&h.read_bytes(0, 4).await.unwrap()[..], &[1; 4]);
        // Post hooks see results.
        let seen = Arc::new(AtomicUsize::new(0));
        let s2 = seen.clone();
        h.set_post_write(Some(Arc::new(move |_, d: &Bytes, r| {
            s2.fetch_add(d.len(), Ordering::SeqCst);
            r
        })));
        h.write_slice(0, &[2; 5]).await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 5);
        h.set_pre_flush(Some(Arc::new(|| {
            Some(Err(Error::Closed { op: Op::Flush }))
        })));
        assert!(h.flush().await.is_err());
        h.clear();
        h.flush().await.unwrap();
    }
}
