//! Block orders: the sequence in which the migrator visits blocks.
//!
//! A [`BlockOrder`] holds the set of *pending* blocks (added and not yet
//! handed out or removed) and hands each one out once through
//! [`BlockOrder::next`]. Every call takes `&self` — orders use interior
//! locking or atomics — because the migrator's dispatcher and the handler of
//! destination requests (`NeedAt` → [`BlockOrder::prioritise`], `DontNeedAt`
//! → [`BlockOrder::remove`]) run on different tasks.
//!
//! * [`AnyOrder`]: lowest pending block first (a lock-free bitfield).
//! * [`PriorityOrder`]: chained in front of another order; blocks requested
//!   through [`BlockOrder::prioritise`] come out first, earliest request
//!   first, as [`BlockKind::Priority`]. `add`/`remove`/`add_all` propagate to
//!   the order behind it, which stays the single source of truth for which
//!   blocks are pending — so a block is never handed out twice.
//! * [`crate::volatility::VolatilityMonitor`]: least recently/often written
//!   block first.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::bitfield::Bitfield;

/// Why a block is being migrated; selects the migrator's concurrency pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlockKind {
    /// The initial pass over the device.
    Standard,
    /// A re-send of a block written after it was sent.
    Dirty,
    /// A block the destination is waiting for.
    Priority,
}

/// One block handed out by an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockInfo {
    /// Block index.
    pub block: u64,
    /// Why it is being sent.
    pub kind: BlockKind,
}

/// A set of pending blocks handed out one at a time.
///
/// Invariant: between two `add`s of the same block, `next` returns it at
/// most once; a block removed with `remove` is not returned until added
/// again.
pub trait BlockOrder: Send + Sync {
    /// Number of blocks of the device this order covers.
    fn num_blocks(&self) -> u64;
    /// Makes `block` pending (no effect past the end).
    fn add(&self, block: u64);
    /// Makes every block pending.
    fn add_all(&self);
    /// Drops `block` from the pending set; returns whether it was pending.
    fn remove(&self, block: u64) -> bool;
    /// Whether `block` is pending.
    fn contains(&self, block: u64) -> bool;
    /// Number of pending blocks.
    fn pending(&self) -> u64;
    /// Hands out the next pending block, or `None` when none is pending.
    fn next(&self) -> Option<BlockInfo>;
    /// Asks for `block` to be handed out before the others. Returns `true`
    /// if the request was accepted (the block is pending and this order
    /// supports priorities). The default ignores the request.
    fn prioritise(&self, block: u64) -> bool {
        let _ = block;
        false
    }
    /// Hands out the next *prioritised* block only (`None` if there is none),
    /// so a dispatcher can serve priority requests from their own pool.
    fn next_priority(&self) -> Option<BlockInfo> {
        None
    }
}

/// Lowest pending block first.
#[derive(Debug)]
pub struct AnyOrder {
    pending: Bitfield,
}

impl AnyOrder {
    /// An order over `num_blocks` blocks, none pending.
    pub fn new(num_blocks: u64) -> Self {
        AnyOrder {
            pending: Bitfield::new(num_blocks),
        }
    }
}

impl BlockOrder for AnyOrder {
    fn num_blocks(&self) -> u64 {
        self.pending.len()
    }
    fn add(&self, block: u64) {
        self.pending.set(block);
    }
    fn add_all(&self) {
        self.pending.set_all();
    }
    fn remove(&self, block: u64) -> bool {
        self.pending.clear_if_set(block)
    }
    fn contains(&self, block: u64) -> bool {
        self.pending.test(block)
    }
    fn pending(&self) -> u64 {
        self.pending.count()
    }
    fn next(&self) -> Option<BlockInfo> {
        self.pending
            .collect_first_and_clear()
            .map(|block| BlockInfo {
                block,
                kind: BlockKind::Standard,
            })
    }
}

/// Prioritised blocks first (earliest request first), then the order
/// behind it.
pub struct PriorityOrder {
    next: Arc<dyn BlockOrder>,
    /// Blocks with an outstanding request, and the requests in arrival
    /// order. Bits change only under the queue's lock, and a block's bit is
    /// set exactly while the queue holds one entry for it: a block removed
    /// (or handed out by the order behind) and requested again queues at
    /// the back, never at the place of its first request.
    requested: Bitfield,
    queue: Mutex<VecDeque<u64>>,
}

impl std::fmt::Debug for PriorityOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PriorityOrder")
            .field("requested", &self.requested.count())
            .finish()
    }
}

impl PriorityOrder {
    /// A priority order in front of `next`.
    pub fn new(next: Arc<dyn BlockOrder>) -> Self {
        let n = next.num_blocks();
        PriorityOrder {
            next,
            requested: Bitfield::new(n),
            queue: Mutex::new(VecDeque::new()),
        }
    }

    /// Number of outstanding priority requests.
    pub fn requested(&self) -> u64 {
        self.requested.count()
    }

    /// Drops the outstanding request for `block`, if any. The unlocked test
    /// first keeps the common case (no request) off the lock; a request
    /// that races it is ordered after it, and is dropped when popped if the
    /// order behind no longer holds the block.
    fn withdraw(&self, block: u64) {
        if !self.requested.test(block) {
            return;
        }
        let mut queue = self.queue.lock();
        if self.requested.clear_if_set(block) {
            if let Some(i) = queue.iter().position(|&b| b == block) {
                queue.remove(i);
            }
        }
    }
}

impl BlockOrder for PriorityOrder {
    fn num_blocks(&self) -> u64 {
        self.next.num_blocks()
    }
    fn add(&self, block: u64) {
        self.next.add(block);
    }
    fn add_all(&self) {
        self.next.add_all();
    }
    fn remove(&self, block: u64) -> bool {
        self.withdraw(block);
        self.next.remove(block)
    }
    fn contains(&self, block: u64) -> bool {
        self.next.contains(block)
    }
    fn pending(&self) -> u64 {
        self.next.pending()
    }
    fn prioritise(&self, block: u64) -> bool {
        if !self.next.contains(block) {
            return false;
        }
        let mut queue = self.queue.lock();
        if self.requested.set_if_clear(block) {
            queue.push_back(block);
        }
        true
    }
    fn next_priority(&self) -> Option<BlockInfo> {
        loop {
            let block = {
                let mut queue = self.queue.lock();
                let block = queue.pop_front()?;
                self.requested.clear(block);
                block
            };
            // The order behind us decides whether the block is still
            // pending (another path may have handed it out meanwhile).
            if self.next.remove(block) {
                return Some(BlockInfo {
                    block,
                    kind: BlockKind::Priority,
                });
            }
        }
    }
    fn next(&self) -> Option<BlockInfo> {
        if let Some(info) = self.next_priority() {
            return Some(info);
        }
        let info = self.next.next()?;
        self.withdraw(info.block);
        Some(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_first_then_ascending() {
        let any = Arc::new(AnyOrder::new(128));
        let p = PriorityOrder::new(any.clone());
        p.add_all();
        assert!(p.prioritise(57));
        assert!(p.prioritise(3));
        assert!(p.prioritise(57)); // repeated: still accepted, queued once
        assert!(p.remove(10));
        let first: Vec<_> = (0..3).map(|_| p.next().unwrap()).collect();
        assert_eq!(first[0].block, 57);
        assert_eq!(first[0].kind, BlockKind::Priority);
        assert_eq!(first[1].block, 3);
        assert_eq!(first[2].block, 0);
        assert_eq!(first[2].kind, BlockKind::Standard);
        let rest: Vec<_> = std::iter::from_fn(|| p.next()).map(|i| i.block).collect();
        assert_eq!(rest.len(), 128 - 4);
        assert!(!rest.contains(&10) && !rest.contains(&57) && !rest.contains(&3));
        assert!(!p.prioritise(5), "already handed out");
    }

    /// Found by `engine_props::priority_any_order_invariants`: a block
    /// removed while requested, re-added and requested again used to come
    /// out at the place of its first request, ahead of earlier requests.
    #[test]
    fn a_request_after_removal_queues_at_the_back() {
        let any = Arc::new(AnyOrder::new(128));
        let p = PriorityOrder::new(any);
        p.add_all();
        for b in [0, 1, 2, 68] {
            assert!(p.prioritise(b));
        }
        assert_eq!(p.next().unwrap().block, 0);
        assert!(p.prioritise(3));
        assert_eq!(p.next().unwrap().block, 1);
        assert!(p.remove(68));
        p.add_all();
        assert_eq!(p.next().unwrap().block, 2);
        assert!(p.prioritise(68));
        assert_eq!(p.next().unwrap().block, 3, "earliest request first");
        let b = p.next().unwrap();
        assert_eq!((b.block, b.kind), (68, BlockKind::Priority));
        assert_eq!(p.requested(), 0);
        assert_eq!(p.next().unwrap().kind, BlockKind::Standard);
    }
}
