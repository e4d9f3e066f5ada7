//! The one place where failures become NBD error values.
//!
//! NBD replies carry an errno-like 32-bit value with a fixed, Linux-derived
//! numbering (the spec lists the allowed ones). Every reply the server sends
//! with an error goes through [`Errno::from_storage`] or one of the request
//! validation errors below, so the mapping is defined exactly once:
//!
//! | cause | errno |
//! |---|---|
//! | provider I/O failure, corruption, remote failure, timeout | `EIO` |
//! | out-of-range read/cache/trim/block-status, misaligned request, bad flags, unknown command | `EINVAL` |
//! | write or write-zeroes past the end, provider out of space | `ENOSPC` |
//! | write, trim or write-zeroes on a read-only export | `EPERM` |
//! | operation not supported (e.g. `FAST_ZERO` that would not be fast) | `ENOTSUP` |
//! | server shutting down, provider closed or request cancelled | `ESHUTDOWN` |

use silo_storage::{Error as StorageError, ErrorKind};

/// An NBD error value (the numbers are fixed by the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Errno {
    /// Operation not permitted (read-only export).
    Perm,
    /// Input/output error.
    Io,
    /// Cannot allocate memory.
    NoMem,
    /// Invalid argument.
    Inval,
    /// No space left on device (write past the end).
    NoSpc,
    /// Value too large (reply would not fit; structured replies only).
    Overflow,
    /// Operation not supported.
    NotSup,
    /// Server is shutting down.
    Shutdown,
}

impl Errno {
    /// The value sent on the wire.
    pub const fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// Parses a wire value (for tests and clients); unknown values are `None`.
    pub fn from_code(code: u32) -> Option<Errno> {
        Some(match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => return None,
        })
    }

    /// Maps a provider error. `write` says whether the command writes
    /// (an out-of-range write is `ENOSPC`, an out-of-range read `EINVAL`).
    pub fn from_storage(e: &StorageError, write: bool) -> Errno {
        match e.kind() {
            ErrorKind::OutOfRange if write => Errno::NoSpc,
            ErrorKind::OutOfRange | ErrorKind::Invalid => Errno::Inval,
            ErrorKind::ReadOnly => Errno::Perm,
            ErrorKind::Unsupported => Errno::NotSup,
            ErrorKind::OutOfSpace => Errno::NoSpc,
            ErrorKind::Closed | ErrorKind::Cancelled => Errno::Shutdown,
            // Io, Timeout, Corrupt, Remote and anything added later.
            _ => Errno::Io,
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use silo_storage::{check_range, Op};

    #[test]
    fn codes_round_trip() {
        for e in [
            Errno::Perm,
            Errno::Io,
            Errno::NoMem,
            Errno::Inval,
            Errno::NoSpc,
            Errno::Overflow,
            Errno::NotSup,
            Errno::Shutdown,
        ] {
            assert_eq!(Errno::from_code(e.code()), Some(e));
        }
        assert_eq!(Errno::from_code(2), None);
    }

    #[test]
    fn storage_errors_map_per_spec() {
        let oor = check_range(Op::Read, 10, 10, 15).unwrap_err();
        assert_eq!(Errno::from_storage(&oor, false), Errno::Inval);
        assert_eq!(Errno::from_storage(&oor, true), Errno::NoSpc);
        let io = StorageError::io(Op::Read, 0, 1, std::io::Error::other("disk on fire"));
        assert_eq!(Errno::from_storage(&io, false), Errno::Io);
        let ro = StorageError::ReadOnly { op: Op::Write };
        assert_eq!(Errno::from_storage(&ro, true), Errno::Perm);
        let closed = StorageError::Closed { op: Op::Read };
        assert_eq!(Errno::from_storage(&closed, false), Errno::Shutdown);
        assert_eq!(Errno::Shutdown.code(), 108);
        assert_eq!(Errno::Io.to_string(), "EIO");
    }
}
