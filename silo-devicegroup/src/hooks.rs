//! Callbacks of a migration: progress, dirty-loop hooks, custom data.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use silo_protocol::bridge::ToProtocol;
use silo_storage::migrator::Progress;

use crate::error::Result;

/// Progress of one device of a group.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeviceProgress {
    /// Index of the device in the group.
    pub index: usize,
    /// Device name.
    pub name: String,
    /// Block size of the migration.
    pub block_size: u64,
    /// The migrator's counters (all zero before `migrate_all`).
    pub progress: Progress,
}

/// Called with every device's progress (rate limited per device, plus a
/// final call when `migrate_all` finishes). Runs on the I/O path: keep it
/// short; to send custom data from it, `tokio::spawn` a task that calls
/// [`DeviceGroup::send_custom_data`](crate::DeviceGroup::send_custom_data)
/// on a clone of the `Arc<DeviceGroup>`.
pub type ProgressHandler = Arc<dyn Fn(&[DeviceProgress]) + Send + Sync>;

/// Called with each custom-data payload the sender sent; the sender's
/// [`send_custom_data`](crate::DeviceGroup::send_custom_data) returns once
/// this has returned.
pub type CustomDataHandler = Arc<dyn Fn(Bytes) + Send + Sync>;

/// Consecutive dirty rounds without a new minimum after which
/// [`default_continue`] gives up (the writers dirty blocks as fast as they
/// are sent).
pub const DEFAULT_STALL_ROUNDS: usize = 8;

/// Upper bound on the rounds of one `migrate_dirty` call under the default
/// policy.
pub const DEFAULT_MAX_ROUNDS: usize = 1000;

/// The default convergence policy of the dirty loop, given the dirty counts
/// of the rounds so far (`dirty_history`, newest last): continue unless
/// [`DEFAULT_MAX_ROUNDS`] rounds ran or the last [`DEFAULT_STALL_ROUNDS`]
/// rounds did not go below the best count before them. (A round that finds
/// no dirty block always ends the loop; that needs no policy.)
pub fn default_continue(dirty_history: &[usize]) -> bool {
    let n = dirty_history.len();
    if n >= DEFAULT_MAX_ROUNDS {
        return false;
    }
    if n <= DEFAULT_STALL_ROUNDS {
        return true;
    }
    let (before, recent) = dirty_history.split_at(n - DEFAULT_STALL_ROUNDS);
    let best_before = before.iter().copied().min().unwrap_or(usize::MAX);
    let best_recent = recent.iter().copied().min().unwrap_or(usize::MAX);
    best_recent < best_before
}

/// Hooks of [`DeviceGroup::migrate_dirty`](crate::DeviceGroup::migrate_dirty).
/// Every method has a default; the defaults give the documented default
/// policy. Each receives the device index, the device's [`ToProtocol`] (to
/// send events or dirty lists of its own; the connection is
/// `to.connection()`) and `dirty_history`: the dirty-block counts of this
/// device's previous rounds in this call, oldest first.
///
/// Per device and round, the calls are, in this order:
/// 1. `pre_get_dirty` — e.g. pause writers, sleep to pace rounds. An error
///    aborts `migrate_dirty`.
/// 2. the dirty set is taken from the tracker; `post_get_dirty` sees it.
///    Returning `false` ends the loop **without losing the blocks**: they
///    are marked dirty again and go out in a later call.
/// 3. if the set is empty the loop ends (the device has no more dirty data);
///    otherwise the dirty list is sent (the destination marks the blocks
///    absent), the blocks are re-sent and awaited, and the count is
///    appended to `dirty_history`.
/// 4. `post_migrate_dirty` — `false` ends the loop (not an error).
///
/// After the loop: `completed(index, to, dirty_history)`.
#[async_trait]
pub trait MigrateDirtyHooks: Send + Sync {
    /// Before the dirty set is taken.
    async fn pre_get_dirty(
        &self,
        _index: usize,
        _to: &ToProtocol,
        _dirty_history: &[usize],
    ) -> Result<()> {
        Ok(())
    }

    /// After the dirty set was taken; `false` stops (blocks are kept dirty).
    async fn post_get_dirty(
        &self,
        _index: usize,
        _to: &ToProtocol,
        _dirty_history: &[usize],
        _blocks: &[u64],
    ) -> Result<bool> {
        Ok(true)
    }

    /// After the round's blocks arrived; `false` stops. Default:
    /// [`default_continue`].
    async fn post_migrate_dirty(
        &self,
        _index: usize,
        _to: &ToProtocol,
        dirty_history: &[usize],
    ) -> Result<bool> {
        Ok(default_continue(dirty_history))
    }

    /// The device's loop ended.
    async fn completed(&self, _index: usize, _to: &ToProtocol, _dirty_history: &[usize]) {}
}

/// The default hooks (see [`MigrateDirtyHooks`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct DefaultHooks;

impl MigrateDirtyHooks for DefaultHooks {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_stops_on_stall_and_continues_on_progress() {
        assert!(default_continue(&[]));
        assert!(default_continue(&[10, 9, 8]));
        let decreasing: Vec<usize> = (1..=50).rev().collect();
        assert!(default_continue(&decreasing));
        let stalled = [5, 4, 3, 9, 9, 9, 9, 9, 9, 9, 9];
        assert!(!default_continue(&stalled));
        let mut stalled_then_better = stalled.to_vec();
        stalled_then_better.push(1);
        assert!(default_continue(&stalled_then_better));
        assert!(!default_continue(&vec![1; DEFAULT_MAX_ROUNDS]));
    }
}
