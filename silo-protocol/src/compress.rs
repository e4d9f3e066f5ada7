//! Payload encodings of write-at frames, and the policy that picks one.
//!
//! * `Plain` — the bytes as they are.
//! * `Zeroes` — the block is all zero; no payload at all.
//! * `Sparse` — zero-run elision: records `{zeros u32, literal_len u32,
//!   literal}`; trailing zeroes are implicit. Cheap, and wins on blocks that
//!   are mostly zero.
//! * `Lz4` — an LZ4 block (`lz4_flex`), the general fast compressor.
//!
//! Decoders never produce more than the declared block length: the output
//! buffer is allocated once at exactly that length (which the frame decoder
//! has already bounded by the frame limit) and every record is checked
//! against it.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;

/// Wire encoding of a write-at payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum Encoding {
    /// Uncompressed.
    Plain = 0,
    /// All zero, no payload.
    Zeroes = 1,
    /// Zero-run elision.
    Sparse = 2,
    /// LZ4 block.
    Lz4 = 3,
}

impl Encoding {
    /// From the wire byte.
    pub fn from_u8(b: u8) -> Option<Encoding> {
        Some(match b {
            0 => Encoding::Plain,
            1 => Encoding::Zeroes,
            2 => Encoding::Sparse,
            3 => Encoding::Lz4,
            _ => return None,
        })
    }

    /// Name for errors and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Plain => "plain",
            Encoding::Zeroes => "zeroes",
            Encoding::Sparse => "sparse",
            Encoding::Lz4 => "lz4",
        }
    }

    /// The handshake feature bit a sender needs before using this encoding
    /// (`Plain` needs none).
    pub fn feature(self) -> crate::handshake::Features {
        use crate::handshake::Features;
        match self {
            Encoding::Plain => Features::empty(),
            Encoding::Zeroes => Features::ZEROES,
            Encoding::Sparse => Features::SPARSE,
            Encoding::Lz4 => Features::LZ4,
        }
    }
}

/// Sender policy: how write-at payloads are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Compression {
    /// Always plain.
    None,
    /// All-zero blocks as `Zeroes`, mostly-zero blocks as `Sparse`, the rest
    /// plain. Very cheap (GB/s per core), so it never slows a fast link: the
    /// default.
    #[default]
    ZeroElision,
    /// All-zero blocks as `Zeroes`, the rest LZ4 unless that does not save
    /// at least 1/16 (then plain). LZ4 encodes text-like data at a few
    /// hundred MB/s per core: use it on links slower than that.
    Lz4,
}

/// Smallest zero run worth eliding in `Sparse` (a record costs 8 bytes).
const MIN_ZERO_RUN: usize = 32;

/// True if every byte is zero (word at a time).
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(8);
    chunks.by_ref().all(|c| c == [0u8; 8]) && chunks.remainder().iter().all(|&b| b == 0)
}

/// Encodes `data` for the wire under `policy`, restricted to the encodings in
/// `allowed` (negotiated features). Returns the encoding and payload; a plain
/// result shares `data` without copying.
pub fn encode(
    data: &Bytes,
    policy: Compression,
    allowed: crate::handshake::Features,
) -> (Encoding, Bytes) {
    use crate::handshake::Features;
    if policy == Compression::None || data.is_empty() {
        return (Encoding::Plain, data.clone());
    }
    if allowed.contains(Features::ZEROES) && is_zero(data) {
        return (Encoding::Zeroes, Bytes::new());
    }
    let budget = data.len() - data.len() / 16;
    match policy {
        Compression::ZeroElision if allowed.contains(Features::SPARSE) => {
            if let Some(p) = sparse_encode(data, budget) {
                return (Encoding::Sparse, p);
            }
        }
        Compression::Lz4 if allowed.contains(Features::LZ4) => {
            let p = lz4_encode(data);
            if p.len() <= budget {
                return (Encoding::Lz4, p);
            }
        }
        _ => {}
    }
    (Encoding::Plain, data.clone())
}

/// Decodes a payload to exactly `len` bytes. `Plain` shares the payload.
pub fn decode(encoding: Encoding, payload: &Bytes, len: u32) -> Result<Bytes, DecodeError> {
    let len = len as usize;
    match encoding {
        Encoding::Plain => {
            if payload.len() != len {
                return Err(DecodeError::Decompress {
                    encoding: "plain",
                    reason: format!("payload of {} bytes for a block of {len}", payload.len()),
                });
            }
            Ok(payload.clone())
        }
        Encoding::Zeroes => {
            check_empty(payload)?;
            Ok(Bytes::from(vec![0u8; len]))
        }
        Encoding::Sparse => sparse_decode(payload, len),
        Encoding::Lz4 => lz4_decode(payload, len),
    }
}

fn check_empty(payload: &Bytes) -> Result<(), DecodeError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Decompress {
            encoding: "zeroes",
            reason: format!("{} unexpected payload bytes", payload.len()),
        })
    }
}

/// Structural check of a payload without decompressing (used by the message
/// decoder so that every accepted frame re-encodes identically).
pub(crate) fn check_structure(
    encoding: Encoding,
    payload: &Bytes,
    len: u32,
) -> Result<(), DecodeError> {
    match encoding {
        Encoding::Plain => {
            if payload.len() != len as usize {
                return Err(DecodeError::invalid(
                    "write-at payload",
                    format!(
                        "plain payload of {} bytes for a block of {len}",
                        payload.len()
                    ),
                ));
            }
            Ok(())
        }
        Encoding::Zeroes => check_empty(payload),
        Encoding::Sparse => sparse_walk(payload, len as usize, |_, _| {}),
        Encoding::Lz4 => {
            if payload.is_empty() {
                return Err(DecodeError::Decompress {
                    encoding: "lz4",
                    reason: "empty payload".into(),
                });
            }
            Ok(())
        }
    }
}

/// Zero-run elision. Returns `None` if the result would exceed `budget`.
pub fn sparse_encode(data: &[u8], budget: usize) -> Option<Bytes> {
    let mut out = BytesMut::new();
    let n = data.len();
    let mut last_end = 0usize; // end of the last literal written
    let mut lit_start: Option<usize> = None;
    let mut i = 0usize;
    while i < n {
        if data[i] != 0 {
            lit_start.get_or_insert(i);
            i += 1;
            continue;
        }
        let mut j = i;
        while j + 8 <= n && data[j..j + 8] == [0u8; 8] {
            j += 8;
        }
        while j < n && data[j] == 0 {
            j += 1;
        }
        if j - i >= MIN_ZERO_RUN || j == n {
            if let Some(s) = lit_start.take() {
                put_record(&mut out, s - last_end, &data[s..i]);
                if out.len() > budget {
                    return None;
                }
                last_end = i;
            }
        } else {
            lit_start.get_or_insert(i);
        }
        i = j;
    }
    if let Some(s) = lit_start {
        put_record(&mut out, s - last_end, &data[s..n]);
    }
    if out.len() > budget {
        return None;
    }
    Some(out.freeze())
}

fn put_record(out: &mut BytesMut, zeros: usize, lit: &[u8]) {
    out.put_u32_le(zeros as u32);
    out.put_u32_le(lit.len() as u32);
    out.extend_from_slice(lit);
}

/// Walks the records of a sparse payload, checking every bound against `len`
/// and the payload, calling `f(offset, literal)` for each.
fn sparse_walk(
    payload: &[u8],
    len: usize,
    mut f: impl FnMut(usize, &[u8]),
) -> Result<(), DecodeError> {
    let bad = |reason: String| DecodeError::Decompress {
        encoding: "sparse",
        reason,
    };
    let mut p = 0usize;
    let mut at = 0usize;
    while p < payload.len() {
        if payload.len() - p < 8 {
            return Err(bad(format!("truncated record header at payload byte {p}")));
        }
        let zeros = u32::from_le_bytes(payload[p..p + 4].try_into().unwrap_or_default()) as usize;
        let lit = u32::from_le_bytes(payload[p + 4..p + 8].try_into().unwrap_or_default()) as usize;
        p += 8;
        if lit == 0 {
            return Err(bad("empty literal".into()));
        }
        if payload.len() - p < lit {
            return Err(bad(format!(
                "literal of {lit} bytes but {} left",
                payload.len() - p
            )));
        }
        let start = at
            .checked_add(zeros)
            .filter(|s| s.checked_add(lit).is_some_and(|e| e <= len))
            .ok_or_else(|| {
                bad(format!(
                    "record at {at}+{zeros} of {lit} bytes exceeds the block of {len}"
                ))
            })?;
        f(start, &payload[p..p + lit]);
        p += lit;
        at = start + lit;
    }
    Ok(())
}

/// Decodes a sparse payload into exactly `len` bytes.
pub fn sparse_decode(payload: &[u8], len: usize) -> Result<Bytes, DecodeError> {
    // Validate before allocating the output.
    sparse_walk(payload, len, |_, _| {})?;
    let mut out = vec![0u8; len];
    sparse_walk(payload, len, |at, lit| {
        out[at..at + lit.len()].copy_from_slice(lit)
    })?;
    Ok(Bytes::from(out))
}

/// LZ4 block compression (no size prefix: the block length travels in the
/// write-at header).
pub fn lz4_encode(data: &[u8]) -> Bytes {
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(data.len())];
    match lz4_flex::block::compress_into(data, &mut out) {
        Ok(n) => {
            out.truncate(n);
            Bytes::from(out)
        }
        // Cannot happen with a maximum-size buffer; fall back to the simple API.
        Err(_) => Bytes::from(lz4_flex::block::compress(data)),
    }
}

/// Decompresses an LZ4 block into exactly `len` bytes (never more: the output
/// buffer is the bound).
pub fn lz4_decode(payload: &[u8], len: usize) -> Result<Bytes, DecodeError> {
    let mut out = vec![0u8; len];
    match lz4_flex::block::decompress_into(payload, &mut out) {
        Ok(n) if n == len => Ok(Bytes::from(out)),
        Ok(n) => Err(DecodeError::Decompress {
            encoding: "lz4",
            reason: format!("decompressed to {n} bytes, declared {len}"),
        }),
        Err(e) => Err(DecodeError::Decompress {
            encoding: "lz4",
            reason: e.to_string(),
        }),
    }
}
