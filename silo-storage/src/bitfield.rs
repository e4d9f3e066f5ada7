//! A fixed-size, lock-free bitset.
//!
//! Every single-bit operation is one atomic instruction on a `u64` word, so
//! any number of threads may set, clear and test bits concurrently without a
//! lock. Range operations are atomic per word (a range spanning several
//! words is not one atomic step as a whole).
//!
//! Indices at or beyond [`Bitfield::len`] are ignored by the mutating calls
//! and read as clear; ranges are clipped to the field. (The engine computes
//! block numbers from checked byte ranges, so an out-of-range index is a bug
//! upstream, but it must not panic here.)
//!
//! The compact text form lists set bits and runs, e.g. `"7 100-102 905"`;
//! [`Bitfield::parse`] reads it back and rejects bad text with an error.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Memory ordering used for every bit operation. Sequentially consistent so
/// that a store to one bitfield followed by a load from another (the dirty
/// tracker's "set tracking, then read" / "write, then test tracking") is
/// ordered across threads.
const ORD: Ordering = Ordering::SeqCst;

/// A fixed-size bitset of atomically updated `u64` words.
pub struct Bitfield {
    words: Box<[AtomicU64]>,
    len: u64,
    /// No word below this index has a bit set, as far as `set` calls that
    /// completed before the last pop are concerned. Advisory: the pop falls
    /// back to a full scan before reporting "empty".
    first_hint: AtomicUsize,
}

/// Text that is not a valid bitfield short form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// A token is not a number or a `start-end` run.
    #[error("bad token {token:?} in bitfield text")]
    BadToken {
        /// The offending token.
        token: String,
    },
    /// A run whose end is before its start.
    #[error("run {start}-{end} ends before it starts")]
    ReversedRun {
        /// Run start.
        start: u64,
        /// Run end.
        end: u64,
    },
    /// An index at or past the size of the bitfield.
    #[error("bit {index} is outside a bitfield of {len} bits")]
    OutOfRange {
        /// The index.
        index: u64,
        /// Bitfield size.
        len: u64,
    },
}

fn word_of(i: u64) -> usize {
    (i / 64) as usize
}

fn mask_of(i: u64) -> u64 {
    1u64 << (i % 64)
}

/// Mask of bits `[lo, hi)` within one word (`0 <= lo < hi <= 64`).
fn span_mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl Bitfield {
    /// A bitfield of `len` clear bits.
    pub fn new(len: u64) -> Self {
        let n = len.div_ceil(64) as usize;
        let words = (0..n).map(|_| AtomicU64::new(0)).collect();
        Bitfield {
            words,
            len,
            first_hint: AtomicUsize::new(0),
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the field has no bits at all (`len() == 0`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets bit `i`.
    pub fn set(&self, i: u64) {
        if i < self.len {
            let w = word_of(i);
            self.words[w].fetch_or(mask_of(i), ORD);
            self.lower_hint(w);
        }
    }

    /// Lowers the pop hint to `w` if needed. Reads first, so that sets on a
    /// hot path do not all write one shared cache line. (A pop racing this
    /// may leave the hint above `w`; pops fall back to a full scan before
    /// answering `None`, so no bit is ever lost.)
    fn lower_hint(&self, w: usize) {
        if self.first_hint.load(Ordering::Relaxed) > w {
            self.first_hint.fetch_min(w, ORD);
        }
    }

    /// Clears bit `i`.
    pub fn clear(&self, i: u64) {
        if i < self.len {
            self.words[word_of(i)].fetch_and(!mask_of(i), ORD);
        }
    }

    /// Whether bit `i` is set.
    pub fn test(&self, i: u64) -> bool {
        i < self.len && self.words[word_of(i)].load(ORD) & mask_of(i) != 0
    }

    /// Sets bit `i`; returns `true` if this call changed it (it was clear).
    pub fn set_if_clear(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = word_of(i);
        let was = self.words[w].fetch_or(mask_of(i), ORD) & mask_of(i) == 0;
        self.lower_hint(w);
        was
    }

    /// Clears bit `i`; returns `true` if this call changed it (it was set).
    pub fn clear_if_set(&self, i: u64) -> bool {
        i < self.len && self.words[word_of(i)].fetch_and(!mask_of(i), ORD) & mask_of(i) != 0
    }

    /// Calls `f(word index, mask)` for every word the clipped range touches.
    fn for_words(&self, r: Range<u64>, mut f: impl FnMut(usize, u64)) {
        let start = r.start.min(self.len);
        let end = r.end.min(self.len);
        if start >= end {
            return;
        }
        let (fw, lw) = (word_of(start), word_of(end - 1));
        for w in fw..=lw {
            let lo = if w == fw { start % 64 } else { 0 };
            let hi = if w == lw { (end - 1) % 64 + 1 } else { 64 };
            f(w, span_mask(lo, hi));
        }
    }

    /// Sets every bit in `r` (clipped to the field).
    pub fn set_range(&self, r: Range<u64>) {
        let mut first = None;
        self.for_words(r, |w, m| {
            self.words[w].fetch_or(m, ORD);
            first.get_or_insert(w);
        });
        if let Some(w) = first {
            self.lower_hint(w);
        }
    }

    /// Clears every bit in `r` (clipped to the field).
    pub fn clear_range(&self, r: Range<u64>) {
        self.for_words(r, |w, m| {
            self.words[w].fetch_and(!m, ORD);
        });
    }

    /// True if every bit in `r` is set (vacuously true for an empty range).
    /// Bits past the end count as clear.
    pub fn all_set(&self, r: Range<u64>) -> bool {
        if r.end > self.len && r.start < r.end {
            return false;
        }
        let mut all = true;
        self.for_words(r, |w, m| all &= self.words[w].load(ORD) & m == m);
        all
    }

    /// True if any bit in `r` is set.
    pub fn any_set(&self, r: Range<u64>) -> bool {
        let mut any = false;
        self.for_words(r, |w, m| any |= self.words[w].load(ORD) & m != 0);
        any
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(ORD).count_ones()))
            .sum()
    }

    /// Number of set bits in `r`.
    pub fn count_range(&self, r: Range<u64>) -> u64 {
        let mut n = 0;
        self.for_words(r, |w, m| {
            n += u64::from((self.words[w].load(ORD) & m).count_ones())
        });
        n
    }

    /// Indices of the set bits, ascending.
    pub fn collect(&self) -> Vec<u64> {
        self.iter_set().collect()
    }

    /// Indices of the clear bits, ascending.
    pub fn collect_zeroes(&self) -> Vec<u64> {
        (0..self.len).filter(|&i| !self.test(i)).collect()
    }

    /// Iterates over the set bits, ascending (each word is loaded once).
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(move |(wi, w)| {
            let mut bits = w.load(ORD);
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }

    /// Finds the lowest set bit at or after word `from` and clears it.
    fn pop_from(&self, from: usize) -> Option<u64> {
        for (wi, w) in self.words.iter().enumerate().skip(from) {
            let mut cur = w.load(ORD);
            while cur != 0 {
                let bit = cur & cur.wrapping_neg();
                match w.compare_exchange_weak(cur, cur & !bit, ORD, ORD) {
                    Ok(_) => {
                        // Only ever raise the hint from the value we started
                        // with, so a concurrent `set` that lowered it wins.
                        let _ = self.first_hint.compare_exchange(from, wi, ORD, ORD);
                        return Some(wi as u64 * 64 + u64::from(bit.trailing_zeros()));
                    }
                    Err(now) => cur = now,
                }
            }
        }
        None
    }

    /// Clears and returns the lowest set bit (`None` if none is set).
    ///
    /// Amortised O(1) over a full drain: a hint remembers the first word that
    /// may hold a set bit. Under concurrent `set`s the returned bit may not be
    /// the lowest, but no set bit is ever skipped: before answering `None`
    /// the whole field is scanned.
    pub fn collect_first_and_clear(&self) -> Option<u64> {
        let hint = self.first_hint.load(ORD);
        if let Some(b) = self.pop_from(hint) {
            return Some(b);
        }
        if hint == 0 {
            return None;
        }
        self.pop_from(0)
    }

    /// The lowest set bit at or after `from`, without changing anything.
    pub fn first_set_from(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let fw = word_of(from);
        let first = self.words[fw].load(ORD) & !((1u64 << (from % 64)) - 1);
        if first != 0 {
            return Some(fw as u64 * 64 + u64::from(first.trailing_zeros()));
        }
        self.words
            .iter()
            .enumerate()
            .skip(fw + 1)
            .find_map(|(wi, w)| {
                let v = w.load(ORD);
                (v != 0).then(|| wi as u64 * 64 + u64::from(v.trailing_zeros()))
            })
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, ORD);
        }
    }

    /// Sets every bit.
    pub fn set_all(&self) {
        self.set_range(0..self.len);
    }

    /// Atomically (per word) moves every set bit into a new bitfield and
    /// clears it here. A bit set concurrently lands either in the result or
    /// stays set here — never lost.
    pub fn take(&self) -> Bitfield {
        let out = Bitfield::new(self.len);
        for (src, dst) in self.words.iter().zip(out.words.iter()) {
            if src.load(ORD) != 0 {
                dst.store(src.swap(0, ORD), ORD);
            }
        }
        out
    }

    /// Sets in `self` every bit set in `other` (sizes may differ; extra
    /// bits are ignored).
    pub fn union_with(&self, other: &Bitfield) {
        for (i, w) in other.words.iter().enumerate().take(self.words.len()) {
            let v = w.load(ORD);
            if v != 0 {
                self.words[i].fetch_or(v, ORD);
                self.lower_hint(i);
            }
        }
        // Bits past our length could have come from a longer `other`.
        if self.len % 64 != 0 {
            if let Some(last) = self.words.last() {
                last.fetch_and(span_mask(0, self.len % 64), ORD);
            }
        }
    }

    /// The compact text form: set bits ascending, runs of three or more as
    /// `start-end` (inclusive), separated by single spaces; `""` when empty.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut run: Option<(u64, u64)> = None;
        let flush = |out: &mut String, (s, e): (u64, u64)| {
            if !out.is_empty() {
                out.push(' ');
            }
            match e - s {
                0 => out.push_str(&s.to_string()),
                1 => out.push_str(&format!("{s} {e}")),
                _ => out.push_str(&format!("{s}-{e}")),
            }
        };
        for i in self.iter_set() {
            run = match run {
                Some((s, e)) if e + 1 == i => Some((s, i)),
                Some(r) => {
                    flush(&mut out, r);
                    Some((i, i))
                }
                None => Some((i, i)),
            };
        }
        if let Some(r) = run {
            flush(&mut out, r);
        }
        out
    }

    /// Parses the text form produced by [`Bitfield::to_text`] into a field
    /// of `len` bits. Whitespace of any amount separates tokens.
    pub fn parse(text: &str, len: u64) -> Result<Bitfield, ParseError> {
        let bf = Bitfield::new(len);
        let num = |s: &str, tok: &str| -> Result<u64, ParseError> {
            s.parse::<u64>().map_err(|_| ParseError::BadToken {
                token: tok.to_string(),
            })
        };
        for tok in text.split_whitespace() {
            let (start, end) = match tok.split_once('-') {
                Some((a, b)) => (num(a, tok)?, num(b, tok)?),
                None => {
                    let v = num(tok, tok)?;
                    (v, v)
                }
            };
            if end < start {
                return Err(ParseError::ReversedRun { start, end });
            }
            if end >= len {
                return Err(ParseError::OutOfRange { index: end, len });
            }
            bf.set_range(start..end + 1);
        }
        Ok(bf)
    }
}

impl Clone for Bitfield {
    fn clone(&self) -> Self {
        Bitfield {
            words: self
                .words
                .iter()
                .map(|w| AtomicU64::new(w.load(ORD)))
                .collect(),
            len: self.len,
            first_hint: AtomicUsize::new(self.first_hint.load(ORD)),
        }
    }
}

impl PartialEq for Bitfield {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .words
                .iter()
                .zip(other.words.iter())
                .all(|(a, b)| a.load(ORD) == b.load(ORD))
    }
}

impl fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bitfield({} bits: {:?})", self.len, self.to_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_across_words() {
        let b = Bitfield::new(1000);
        b.set_range(100..181);
        assert_eq!(b.count(), 81);
        assert!(b.all_set(100..181));
        assert!(!b.all_set(99..181));
        assert!(!b.all_set(100..182));
        b.clear_range(120..130);
        assert_eq!(b.count(), 71);
        assert!(b.any_set(0..101));
        assert!(!b.any_set(120..130));
        assert_eq!(b.count_range(0..125), 20);
        assert_eq!(b.first_set_from(120), Some(130));
    }

    #[test]
    fn text_round_trip() {
        let b = Bitfield::parse("7 100-102 905 907", 1000).unwrap();
        assert_eq!(b.collect(), vec![7, 100, 101, 102, 905, 907]);
        assert_eq!(b.to_text(), "7 100-102 905 907");
        assert_eq!(Bitfield::parse("", 10).unwrap().count(), 0);
        assert!(matches!(
            Bitfield::parse("5-3", 10),
            Err(ParseError::ReversedRun { .. })
        ));
        assert!(matches!(
            Bitfield::parse("10", 10),
            Err(ParseError::OutOfRange { .. })
        ));
        assert!(matches!(
            Bitfield::parse("1-x", 10),
            Err(ParseError::BadToken { .. })
        ));
        assert!(Bitfield::parse("-1", 10).is_err());
        assert!(Bitfield::parse("1--2", 10).is_err());
    }

    #[test]
    fn pop_finds_bits_below_hint() {
        let b = Bitfield::new(300);
        b.set(250);
        assert_eq!(b.collect_first_and_clear(), Some(250));
        b.set(3);
        b.set(299);
        assert_eq!(b.collect_first_and_clear(), Some(3));
        assert_eq!(b.collect_first_and_clear(), Some(299));
        assert_eq!(b.collect_first_and_clear(), None);
    }

    #[test]
    fn concurrent_pops_take_each_bit_once() {
        let b = std::sync::Arc::new(Bitfield::new(100_000));
        b.set_all();
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Some(i) = b.collect_first_and_clear() {
                        got.push(i);
                    }
                    got
                })
            })
            .collect();
        let mut all: Vec<u64> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..100_000).collect::<Vec<_>>());
    }
}
