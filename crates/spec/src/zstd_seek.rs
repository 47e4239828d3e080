//! The zstd seekable format's seek table: a skippable frame at the end of a zstd stream that
//! lists each independent frame's compressed and decompressed size, so a reader can start
//! decompressing at any frame. Ordinary zstd decoders skip it.
//!
//! Layout (little-endian): skippable magic `0x184D2A5E`, frame size, then one entry per frame
//! (compressed size u32, decompressed size u32, checksum u32 when flagged), then the footer:
//! number of frames u32, descriptor u8 (bit 7: checksums present), seekable magic `0x8F92EAB1`.

use crate::error::{Error, Result};

/// Magic number of the skippable frame that holds the table.
pub const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// Magic number that ends the table.
pub const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
/// Size of the footer at the very end of the stream.
pub const FOOTER_SIZE: usize = 9;
/// The most frames a table may list (bounds what a hostile footer can make us allocate).
pub const MAX_FRAMES: u32 = 1 << 24;

/// One independent zstd frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeekEntry {
    /// Bytes of the frame in the compressed stream.
    pub compressed_size: u32,
    /// Bytes it decompresses to.
    pub decompressed_size: u32,
}

/// Where a frame sits in both streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLocation {
    /// Index of the frame.
    pub index: usize,
    /// Offset of the frame in the compressed stream.
    pub compressed_offset: u64,
    /// Offset of its first byte in the decompressed stream.
    pub decompressed_offset: u64,
    /// The frame's sizes.
    pub entry: SeekEntry,
}

/// The table of every frame in a seekable zstd stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeekTable {
    /// Frames in stream order.
    pub frames: Vec<SeekEntry>,
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32> {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(Error::SeekTable("truncated"))
}

impl SeekTable {
    /// The whole skippable frame, ready to append to the stream.
    pub fn encode(&self) -> Vec<u8> {
        let body_len = self.frames.len() * 8 + FOOTER_SIZE;
        let mut out = Vec::with_capacity(8 + body_len);
        out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
        out.extend_from_slice(&(body_len as u32).to_le_bytes());
        for f in &self.frames {
            out.extend_from_slice(&f.compressed_size.to_le_bytes());
            out.extend_from_slice(&f.decompressed_size.to_le_bytes());
        }
        out.extend_from_slice(&(self.frames.len() as u32).to_le_bytes());
        out.push(0);
        out.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
        out
    }

    /// Reads the footer (the last [`FOOTER_SIZE`] bytes of a stream) and returns how many bytes
    /// the whole table frame takes at the end of the stream.
    pub fn table_size_from_footer(footer: &[u8]) -> Result<u64> {
        if footer.len() != FOOTER_SIZE {
            return Err(Error::SeekTable("footer must be 9 bytes"));
        }
        if u32_at(footer, 5)? != SEEKABLE_MAGIC {
            return Err(Error::SeekTable("no seekable magic at the end"));
        }
        let n_frames = u32_at(footer, 0)?;
        if n_frames > MAX_FRAMES {
            return Err(Error::SeekTable("too many frames"));
        }
        let descriptor = footer[4];
        if descriptor & 0x7c != 0 {
            return Err(Error::SeekTable("reserved descriptor bits set"));
        }
        let entry_size: u64 = if descriptor & 0x80 != 0 { 12 } else { 8 };
        Ok(8 + u64::from(n_frames) * entry_size + FOOTER_SIZE as u64)
    }

    /// Parses a whole table frame (as sized by [`Self::table_size_from_footer`]).
    pub fn decode(frame: &[u8]) -> Result<SeekTable> {
        if frame.len() < 8 + FOOTER_SIZE {
            return Err(Error::SeekTable("truncated"));
        }
        if u32_at(frame, 0)? != SKIPPABLE_MAGIC {
            return Err(Error::SeekTable("not a skippable frame"));
        }
        let expected = Self::table_size_from_footer(&frame[frame.len() - FOOTER_SIZE..])?;
        if expected != frame.len() as u64 || u64::from(u32_at(frame, 4)?) + 8 != expected {
            return Err(Error::SeekTable("sizes disagree"));
        }
        let n_frames = u32_at(frame, frame.len() - FOOTER_SIZE)? as usize;
        let entry_size = if frame[frame.len() - 5] & 0x80 != 0 {
            12
        } else {
            8
        };
        let mut frames = Vec::with_capacity(n_frames);
        for i in 0..n_frames {
            let at = 8 + i * entry_size;
            frames.push(SeekEntry {
                compressed_size: u32_at(frame, at)?,
                decompressed_size: u32_at(frame, at + 4)?,
            });
        }
        Ok(SeekTable { frames })
    }

    /// Total decompressed size.
    pub fn decompressed_size(&self) -> u64 {
        self.frames
            .iter()
            .map(|f| u64::from(f.decompressed_size))
            .sum()
    }

    /// Total compressed size of the frames (the table excluded).
    pub fn compressed_size(&self) -> u64 {
        self.frames
            .iter()
            .map(|f| u64::from(f.compressed_size))
            .sum()
    }

    /// The frame holding decompressed byte `offset`, or `None` past the end.
    pub fn locate(&self, offset: u64) -> Option<FrameLocation> {
        let (mut c, mut d) = (0u64, 0u64);
        for (index, entry) in self.frames.iter().enumerate() {
            let next = d + u64::from(entry.decompressed_size);
            if offset < next {
                return Some(FrameLocation {
                    index,
                    compressed_offset: c,
                    decompressed_offset: d,
                    entry: *entry,
                });
            }
            c += u64::from(entry.compressed_size);
            d = next;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_locate() {
        let table = SeekTable {
            frames: vec![
                SeekEntry {
                    compressed_size: 10,
                    decompressed_size: 100,
                },
                SeekEntry {
                    compressed_size: 20,
                    decompressed_size: 100,
                },
                SeekEntry {
                    compressed_size: 5,
                    decompressed_size: 7,
                },
            ],
        };
        let bytes = table.encode();
        let size =
            SeekTable::table_size_from_footer(&bytes[bytes.len() - FOOTER_SIZE..]).expect("footer");
        assert_eq!(size, bytes.len() as u64);
        assert_eq!(SeekTable::decode(&bytes).expect("decodes"), table);
        let loc = table.locate(150).expect("inside");
        assert_eq!(
            (loc.index, loc.compressed_offset, loc.decompressed_offset),
            (1, 10, 100)
        );
        assert!(table.locate(207).is_none());
        assert_eq!(table.decompressed_size(), 207);
    }

    #[test]
    fn refuses_garbage() {
        assert!(SeekTable::table_size_from_footer(&[0; 9]).is_err());
        let mut footer = [0xffu8; 9];
        footer[5..].copy_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
        assert!(SeekTable::table_size_from_footer(&footer).is_err());
        assert!(SeekTable::decode(&[1, 2, 3]).is_err());
    }
}
