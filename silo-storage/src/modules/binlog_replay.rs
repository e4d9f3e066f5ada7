//! [`BinlogReplay`]: reads a binlog written by [`Binlog`](super::Binlog)
//! (format documented there) and replays it against a provider, at the
//! recorded speed, at a scaled speed, or as fast as possible.
//!
//! Every length is checked against the device size in the header (and a
//! record's data against [`MAX_RECORD_DATA`]) before anything is allocated;
//! a damaged or truncated log fails with [`Error::Corrupt`] naming the byte
//! position, never a panic. Errors from the log (I/O, corruption) and from
//! the target provider are both returned as [`Error`]; a log problem is
//! `Corrupt` or an `Io` error whose message starts with `binlog`.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, BufReader};

use super::binlog::{
    HEADER_LEN, KIND_FLUSH, KIND_READ, KIND_TRIM, KIND_WRITE, KIND_ZEROES, MAGIC, RECORD_HEADER_LEN,
};
use crate::error::{check_range, Error, Op, Result};
use crate::provider::Provider;

/// Largest write payload accepted from a log (256 MiB).
pub const MAX_RECORD_DATA: u64 = 256 << 20;

/// How fast to replay.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ReplaySpeed {
    /// Each operation at its recorded time after the start of the replay.
    Recorded,
    /// Recorded times multiplied by this factor (`0.5` = twice as fast,
    /// `2.0` = half speed).
    Scaled(f64),
    /// No waiting.
    #[default]
    AsFastAsPossible,
}

/// The kind of a recorded operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A read (no data recorded).
    Read,
    /// A write (data recorded).
    Write,
    /// A flush.
    Flush,
    /// A trim.
    Trim,
    /// A write of zeroes.
    WriteZeroes,
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinlogRecord {
    /// What was done.
    pub kind: RecordKind,
    /// When, relative to the creation of the log.
    pub time: Duration,
    /// Offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The data, for writes.
    pub data: Option<Bytes>,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayStats {
    /// Records executed.
    pub records: u64,
    /// Reads executed.
    pub reads: u64,
    /// Writes executed.
    pub writes: u64,
    /// Bytes written (including trims and write-zeroes).
    pub bytes_written: u64,
}

/// A binlog reader and replayer.
pub struct BinlogReplay {
    reader: BufReader<tokio::fs::File>,
    size: u64,
    pos: u64,
    started: Option<Instant>,
}

fn log_io(e: std::io::Error) -> Error {
    Error::io(
        Op::Read,
        0,
        0,
        std::io::Error::new(e.kind(), format!("binlog: {e}")),
    )
}

impl BinlogReplay {
    /// Opens a binlog and checks its header.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = tokio::fs::File::open(path.as_ref()).await.map_err(log_io)?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut h = [0u8; HEADER_LEN];
        reader.read_exact(&mut h).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Corrupt("binlog: file shorter than its header".into())
            } else {
                log_io(e)
            }
        })?;
        if &h[..8] != MAGIC {
            return Err(Error::Corrupt("binlog: bad magic".into()));
        }
        Ok(BinlogReplay {
            reader,
            size: u64::from_le_bytes(h[8..].try_into().expect("8 bytes")),
            pos: HEADER_LEN as u64,
            started: None,
        })
    }

    /// Size of the recorded device.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads the next record; `None` at the end of the log.
    pub async fn next_record(&mut self) -> Result<Option<BinlogRecord>> {
        let at = self.pos;
        let mut h = [0u8; RECORD_HEADER_LEN];
        let mut got = 0;
        while got < h.len() {
            let n = self.reader.read(&mut h[got..]).await.map_err(log_io)?;
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(Error::Corrupt(format!(
                    "binlog: truncated record at byte {at}"
                )));
            }
            got += n;
        }
        let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let (time, offset, len) = (word(1), word(9), word(17));
        let kind = match h[0] {
            KIND_READ => RecordKind::Read,
            KIND_WRITE => RecordKind::Write,
            KIND_FLUSH => RecordKind::Flush,
            KIND_TRIM => RecordKind::Trim,
            KIND_ZEROES => RecordKind::WriteZeroes,
            k => {
                return Err(Error::Corrupt(format!(
                    "binlog: unknown record kind {k} at byte {at}"
                )))
            }
        };
        if check_range(Op::Read, offset, len, self.size).is_err() {
            return Err(Error::Corrupt(format!(
                "binlog: record at byte {at} ({offset}+{len}) lies outside the {}-byte device",
                self.size
            )));
        }
        let mut data = None;
        if kind == RecordKind::Write {
            if len > MAX_RECORD_DATA {
                return Err(Error::Corrupt(format!(
                    "binlog: record at byte {at} carries {len} bytes, more than {MAX_RECORD_DATA}"
                )));
            }
            let mut buf = BytesMut::zeroed(len as usize);
            self.reader.read_exact(&mut buf).await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::Corrupt(format!("binlog: truncated data of record at byte {at}"))
                } else {
                    log_io(e)
                }
            })?;
            data = Some(buf.freeze());
            self.pos += len;
        }
        self.pos += RECORD_HEADER_LEN as u64;
        Ok(Some(BinlogRecord {
            kind,
            time: Duration::from_nanos(time),
            offset,
            len,
            data,
        }))
    }

    /// Reads the next record, waits for its time (per `speed`, measured from
    /// the first executed record) and executes it against `target`.
    /// Returns the record, or `None` at the end of the log.
    pub async fn execute_next<P: Provider + ?Sized>(
        &mut self,
        target: &P,
        speed: ReplaySpeed,
    ) -> Result<Option<BinlogRecord>> {
        let Some(rec) = self.next_record().await? else {
            return Ok(None);
        };
        let started = *self.started.get_or_insert_with(Instant::now);
        let due = match speed {
            ReplaySpeed::Recorded => Some(rec.time),
            ReplaySpeed::Scaled(f) if f.is_finite() && f > 0.0 => {
                Some(Duration::from_secs_f64(rec.time.as_secs_f64() * f))
            }
            _ => None,
        };
        if let Some(due) = due {
            let at = started + due;
            if at > Instant::now() {
                tokio::time::sleep_until(at.into()).await;
            }
        }
        match rec.kind {
            RecordKind::Read => {
                target
                    .read_at(rec.offset, BytesMut::zeroed(rec.len as usize))
                    .await?;
            }
            RecordKind::Write => {
                let data = rec.data.clone().unwrap_or_default();
                target.write_at(rec.offset, data).await?;
            }
            RecordKind::Flush => target.flush().await?,
            RecordKind::Trim => target.trim(rec.offset, rec.len).await?,
            RecordKind::WriteZeroes => target.write_zeroes(rec.offset, rec.len).await?,
        }
        Ok(Some(rec))
    }

    /// Replays every remaining record.
    pub async fn replay_all<P: Provider + ?Sized>(
        &mut self,
        target: &P,
        speed: ReplaySpeed,
    ) -> Result<ReplayStats> {
        if target.size() < self.size {
            return Err(Error::Invalid(format!(
                "replay target has {} bytes, the log was recorded on {}",
                target.size(),
                self.size
            )));
        }
        let mut st = ReplayStats::default();
        while let Some(rec) = self.execute_next(target, speed).await? {
            st.records += 1;
            match rec.kind {
                RecordKind::Read => st.reads += 1,
                RecordKind::Write | RecordKind::Trim | RecordKind::WriteZeroes => {
                    st.writes += 1;
                    st.bytes_written += rec.len;
                }
                RecordKind::Flush => {}
            }
        }
        Ok(st)
    }
}
