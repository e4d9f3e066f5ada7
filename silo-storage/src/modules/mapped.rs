//! [`MappedStorage`]: stores blocks under arbitrary u64 ids (for example
//! guest memory page addresses) in the slots of an underlying provider. Not a
//! provider itself.
//!
//! * Ids are addresses: the block after id `x` is id `x + block_size`, which
//!   is what [`MappedStorage::get_regions`] coalesces.
//! * Slot `s` lives at byte `s * block_size` of the provider; the number of
//!   slots is `provider.size() / block_size`. A new id takes the lowest free
//!   slot; when none is left the write fails with
//!   `Error::OutOfSpace` and nothing changes.
//! * Removing an id frees its slot. Callers must not remove an id while a
//!   write to it is still in progress.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::provider::{DynProvider, Provider};

#[derive(Debug, Default)]
struct Map {
    slots: BTreeMap<u64, u64>,
    free: BTreeSet<u64>,
    next: u64,
}

/// Blocks stored by id in the slots of a provider.
pub struct MappedStorage<P = DynProvider> {
    inner: P,
    block_size: u64,
    capacity: u64,
    map: Mutex<Map>,
}

impl<P: Provider> MappedStorage<P> {
    /// Uses `inner` as `inner.size() / block_size` slots.
    pub fn new(inner: P, block_size: u64) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::Invalid("block size must not be 0".into()));
        }
        Ok(MappedStorage {
            capacity: inner.size() / block_size,
            inner,
            block_size,
            map: Mutex::default(),
        })
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of slots.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Number of ids stored.
    pub fn len(&self) -> u64 {
        self.map.lock().slots.len() as u64
    }

    /// Whether no id is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes in use (`len() * block_size`).
    pub fn size(&self) -> u64 {
        self.len() * self.block_size
    }

    /// The underlying provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    fn slot_for_write(&self, id: u64) -> Result<u64> {
        let mut m = self.map.lock();
        if let Some(&s) = m.slots.get(&id) {
            return Ok(s);
        }
        let slot = if let Some(s) = m.free.pop_first() {
            s
        } else if m.next < self.capacity {
            m.next += 1;
            m.next - 1
        } else {
            return Err(Error::OutOfSpace(format!(
                "mapped storage full: all {} slots of {} bytes used",
                self.capacity, self.block_size
            )));
        };
        m.slots.insert(id, slot);
        Ok(slot)
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len as u64 != self.block_size {
            return Err(Error::Invalid(format!(
                "mapped block of {len} bytes, block size is {}",
                self.block_size
            )));
        }
        Ok(())
    }

    /// Stores one block (exactly `block_size` bytes) under `id`.
    pub async fn write_block(&self, id: u64, data: Bytes) -> Result<()> {
        self.check_len(data.len())?;
        let slot = self.slot_for_write(id)?;
        self.inner.write_at(slot * self.block_size, data).await
    }

    /// Stores consecutive blocks starting at id `id` (`data.len()` must be a
    /// multiple of the block size). Blocks are written concurrently. If
    /// space runs out, the blocks before that point are stored and the error
    /// is returned.
    pub async fn write_blocks(&self, id: u64, data: Bytes) -> Result<()> {
        if data.len() as u64 % self.block_size != 0 {
            return Err(Error::Invalid(format!(
                "{} bytes is not a multiple of the block size {}",
                data.len(),
                self.block_size
            )));
        }
        let bs = self.block_size as usize;
        let mut futs = Vec::new();
        let mut err = None;
        for i in 0..data.len() / bs {
            match self.slot_for_write(id + (i * bs) as u64) {
                Ok(slot) => futs.push(
                    self.inner
                        .write_at(slot * self.block_size, data.slice(i * bs..(i + 1) * bs)),
                ),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        futures::future::try_join_all(futs).await?;
        err.map_or(Ok(()), Err)
    }

    /// Reads the block stored under `id`.
    pub async fn read_block(&self, id: u64) -> Result<Bytes> {
        let slot = self
            .map
            .lock()
            .slots
            .get(&id)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("mapped id {id:#x} is not stored")))?;
        let buf = BytesMut::zeroed(self.block_size as usize);
        Ok(self
            .inner
            .read_at(slot * self.block_size, buf)
            .await?
            .freeze())
    }

    /// Reads `count` consecutive blocks starting at id `id` (ids `id`,
    /// `id + block_size`, …) into one buffer; every id must be stored.
    pub async fn read_blocks(&self, id: u64, count: usize) -> Result<Bytes> {
        let bs = self.block_size as usize;
        let slots: Vec<u64> = {
            let m = self.map.lock();
            (0..count)
                .map(|i| {
                    let want = id + (i * bs) as u64;
                    m.slots
                        .get(&want)
                        .copied()
                        .ok_or_else(|| Error::Invalid(format!("mapped id {want:#x} is not stored")))
                })
                .collect::<Result<_>>()?
        };
        let buf = BytesMut::zeroed(count * bs);
        let parts = super::util::split_buf(buf, std::iter::repeat(bs).take(count));
        let done = futures::future::try_join_all(
            slots
                .iter()
                .zip(parts)
                .map(|(&s, b)| self.inner.read_at(s * self.block_size, b)),
        )
        .await?;
        Ok(super::util::join_bufs(done).freeze())
    }

    /// Whether `id` is stored.
    pub fn contains(&self, id: u64) -> bool {
        self.map.lock().slots.contains_key(&id)
    }

    /// Forgets `id` and frees its slot; returns whether it was stored.
    pub fn remove_block(&self, id: u64) -> bool {
        let mut m = self.map.lock();
        match m.slots.remove(&id) {
            Some(s) => {
                m.free.insert(s);
                true
            }
            None => false,
        }
    }

    /// Forgets several ids; returns how many were stored.
    pub fn remove_blocks(&self, ids: &[u64]) -> usize {
        ids.iter().filter(|&&id| self.remove_block(id)).count()
    }

    /// Forgets every id not in `keep`; returns how many were removed.
    pub fn keep_only(&self, keep: &HashSet<u64>) -> usize {
        let mut m = self.map.lock();
        let gone: Vec<(u64, u64)> = m
            .slots
            .iter()
            .filter(|(id, _)| !keep.contains(id))
            .map(|(&id, &s)| (id, s))
            .collect();
        for (id, s) in &gone {
            m.slots.remove(id);
            m.free.insert(*s);
        }
        gone.len()
    }

    /// Stored ids coalesced into `(first id, length in bytes)` regions of
    /// consecutive ids, ascending; a region is cut at `max_len` bytes when
    /// `max_len > 0`.
    pub fn get_regions(&self, max_len: u64) -> Vec<(u64, u64)> {
        let m = self.map.lock();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &id in m.slots.keys() {
            match out.last_mut() {
                Some((start, len))
                    if *start + *len == id
                        && (max_len == 0 || *len + self.block_size <= max_len) =>
                {
                    *len += self.block_size
                }
                _ => out.push((id, self.block_size)),
            }
        }
        out
    }

    /// A copy of the id → slot map.
    pub fn get_map(&self) -> HashMap<u64, u64> {
        self.map
            .lock()
            .slots
            .iter()
            .map(|(&k, &v)| (k, v))
            .collect()
    }

    /// Replaces the map (for example after the data was copied slot for
    /// slot elsewhere). Every slot must be in range and used once.
    pub fn set_map(&self, map: HashMap<u64, u64>) -> Result<()> {
        let mut used = BTreeSet::new();
        for &s in map.values() {
            if s >= self.capacity || !used.insert(s) {
                return Err(Error::Invalid(format!(
                    "slot {s} is out of range (capacity {}) or used twice",
                    self.capacity
                )));
            }
        }
        let next = used.last().map_or(0, |&s| s + 1);
        let free = (0..next).filter(|s| !used.contains(s)).collect();
        *self.map.lock() = Map {
            slots: map.into_iter().collect(),
            free,
            next,
        };
        Ok(())
    }

    /// Sets the slot of `id` (adding to the map; the slot must be free or
    /// already belong to `id`).
    pub fn set_slot(&self, id: u64, slot: u64) -> Result<()> {
        let mut m = self.map.lock();
        if slot >= self.capacity {
            return Err(Error::Invalid(format!("slot {slot} out of range")));
        }
        if m.slots.get(&id) == Some(&slot) {
            return Ok(());
        }
        let taken = slot < m.next && !m.free.contains(&slot);
        if taken {
            return Err(Error::Invalid(format!("slot {slot} is in use")));
        }
        m.free.remove(&slot);
        while m.next < slot {
            let n = m.next;
            m.free.insert(n);
            m.next += 1;
        }
        if m.next == slot {
            m.next += 1;
        }
        if let Some(old) = m.slots.insert(id, slot) {
            m.free.insert(old);
        }
        Ok(())
    }

    /// The slot of `id`, if stored.
    pub fn get_slot(&self, id: u64) -> Option<u64> {
        self.map.lock().slots.get(&id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::MemoryStorage;
    use crate::ErrorKind;

    #[tokio::test]
    async fn ids_slots_regions() {
        let m = MappedStorage::new(MemoryStorage::new(4 * 512), 512).unwrap();
        let blk = |v: u8| Bytes::from(vec![v; 512]);
        m.write_block(0x1000, blk(1)).await.unwrap();
        m.write_block(0x1200, blk(2)).await.unwrap();
        m.write_block(0x9000, blk(3)).await.unwrap();
        m.write_block(0x1000, blk(4)).await.unwrap(); // overwrite keeps slot
        assert_eq!(m.len(), 3);
        assert_eq!(m.size(), 3 * 512);
        assert_eq!(&m.read_block(0x1000).await.unwrap()[..], &[4; 512][..]);
        assert_eq!(m.get_regions(0), vec![(0x1000, 1024), (0x9000, 512)]);
        assert_eq!(
            m.get_regions(512),
            vec![(0x1000, 512), (0x1200, 512), (0x9000, 512)]
        );
        m.write_block(0x5000, blk(5)).await.unwrap();
        let e = m.write_block(0x6000, blk(6)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfSpace);
        assert!(m
            .write_block(0x6000, Bytes::from_static(b"short"))
            .await
            .is_err());
        assert!(m.remove_block(0x5000));
        m.write_block(0x6000, blk(6)).await.unwrap();
        assert_eq!(m.get_slot(0x6000), Some(3));
        let keep: HashSet<u64> = [0x1000, 0x6000].into_iter().collect();
        assert_eq!(m.keep_only(&keep), 2);
        assert!(m.read_block(0x9000).await.is_err());
        assert_eq!(&m.read_block(0x6000).await.unwrap()[..], &[6; 512][..]);
        let map = m.get_map();
        let m2 = MappedStorage::new(MemoryStorage::new(4 * 512), 512).unwrap();
        m2.set_map(map.clone()).unwrap();
        assert_eq!(m2.get_map(), map);
        m2.write_blocks(0x20000, Bytes::from(vec![7; 1024]))
            .await
            .unwrap();
        assert_eq!(m2.len(), 4);
        assert!(m2.set_slot(0x1, 0).is_err());
        let mut bad = HashMap::new();
        bad.insert(1, 9);
        assert!(m2.set_map(bad).is_err());
    }
}
