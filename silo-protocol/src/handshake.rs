//! The connection handshake (sans-IO): each side sends a 32-byte hello as
//! the first bytes on the stream, reads the peer's, and both compute the same
//! [`Negotiated`] parameters.
//!
//! ```text
//! offset width field
//!      0     8 magic        "SILOWIRE"
//!      8     2 major        u16 LE; must be equal on both sides
//!     10     2 minor        u16 LE; the lower one is used
//!     12     8 features     u64 LE bit set; the intersection is used
//!     20     4 max_frame    u32 LE; largest frame body this side accepts
//!     24     4 queue_depth  u32 LE; requests this side queues per (device, kind)
//!     28     4 reserved     0
//! ```

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::HandshakeError;

/// The 8 magic bytes every silo connection starts with.
pub const MAGIC: [u8; 8] = *b"SILOWIRE";
/// Major version: peers with different majors cannot talk.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version: additive changes; the lower of the two is used.
pub const VERSION_MINOR: u16 = 0;
/// Hello length in bytes.
pub const HELLO_LEN: usize = 32;
/// Smallest acceptable `max_frame` (room for any control message).
pub const MIN_MAX_FRAME: u32 = 64 << 10;

/// Optional protocol features, announced in the hello. A sender only uses a
/// feature both sides announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(u64);

impl Features {
    /// Write-at encoding `Zeroes`.
    pub const ZEROES: Features = Features(1 << 0);
    /// Write-at encoding `Sparse`.
    pub const SPARSE: Features = Features(1 << 1);
    /// Write-at encoding `Lz4`.
    pub const LZ4: Features = Features(1 << 2);
    /// Write-at-hash and alternate sources (S3 assist).
    pub const HASH_WRITES: Features = Features(1 << 3);
    /// You-already-have (shared base images).
    pub const YOU_ALREADY_HAVE: Features = Features(1 << 4);
    /// Everything this implementation supports.
    pub const ALL: Features = Features(0b1_1111);

    /// No features.
    pub const fn empty() -> Features {
        Features(0)
    }
    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// From raw bits (unknown bits are kept; they drop out in negotiation).
    pub const fn from_bits(bits: u64) -> Features {
        Features(bits)
    }
    /// All of `other` is in `self`.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
    /// Intersection.
    pub const fn intersect(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }
    /// Union.
    pub const fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }
    /// Without `other`.
    pub const fn without(self, other: Features) -> Features {
        Features(self.0 & !other.0)
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHello {
    magic: [u8; 8],
    major: U16,
    minor: U16,
    features: U64,
    max_frame: U32,
    queue_depth: U32,
    reserved: U32,
}

/// One side's hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// Features this side supports.
    pub features: Features,
    /// Largest frame body this side accepts.
    pub max_frame: u32,
    /// Requests this side queues per (device, kind) before replying "busy";
    /// the peer keeps at most this many of them outstanding.
    pub queue_depth: u32,
}

impl Hello {
    /// Our hello with this version.
    pub fn new(features: Features, max_frame: u32, queue_depth: u32) -> Hello {
        Hello {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            features,
            max_frame,
            queue_depth,
        }
    }

    /// Wire bytes.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let raw = RawHello {
            magic: MAGIC,
            major: U16::new(self.major),
            minor: U16::new(self.minor),
            features: U64::new(self.features.bits()),
            max_frame: U32::new(self.max_frame),
            queue_depth: U32::new(self.queue_depth),
            reserved: U32::new(0),
        };
        let mut out = [0u8; HELLO_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Parses a peer's hello. The magic is checked first, so a non-silo peer
    /// gets a clear error. Version compatibility is checked by [`negotiate`].
    pub fn decode(buf: &[u8]) -> Result<Hello, HandshakeError> {
        let (raw, _) =
            RawHello::read_from_prefix(buf).map_err(|_| HandshakeError::Truncated(buf.len()))?;
        if raw.magic != MAGIC {
            return Err(HandshakeError::BadMagic(raw.magic));
        }
        let hello = Hello {
            major: raw.major.get(),
            minor: raw.minor.get(),
            features: Features::from_bits(raw.features.get()),
            max_frame: raw.max_frame.get(),
            queue_depth: raw.queue_depth.get(),
        };
        // Only fields we understand are validated when the versions match;
        // a different major may use them differently.
        if hello.major == VERSION_MAJOR {
            if raw.reserved.get() != 0 {
                return Err(HandshakeError::Invalid("reserved field is not zero".into()));
            }
            if hello.max_frame < MIN_MAX_FRAME {
                return Err(HandshakeError::Invalid(format!(
                    "max_frame {} is below the minimum {MIN_MAX_FRAME}",
                    hello.max_frame
                )));
            }
            if hello.queue_depth == 0 {
                return Err(HandshakeError::Invalid("queue_depth is zero".into()));
            }
        }
        Ok(hello)
    }
}

/// What both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Major version (equal on both sides).
    pub major: u16,
    /// Minor version in use (the lower one).
    pub minor: u16,
    /// Features both support.
    pub features: Features,
    /// Largest frame body we may send (the peer's limit).
    pub peer_max_frame: u32,
    /// Requests we may keep outstanding per (device, kind).
    pub peer_queue_depth: u32,
}

/// Checks compatibility and computes the parameters of the connection.
pub fn negotiate(ours: &Hello, theirs: &Hello) -> Result<Negotiated, HandshakeError> {
    if ours.major != theirs.major {
        return Err(HandshakeError::IncompatibleVersion {
            ours: format!("{}.{}", ours.major, ours.minor),
            theirs: format!("{}.{}", theirs.major, theirs.minor),
        });
    }
    Ok(Negotiated {
        major: ours.major,
        minor: ours.minor.min(theirs.minor),
        features: ours
            .features
            .intersect(theirs.features)
            .intersect(Features::ALL),
        peer_max_frame: theirs.max_frame,
        peer_queue_depth: theirs.queue_depth,
    })
}
