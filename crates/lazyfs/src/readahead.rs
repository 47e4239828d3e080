//! Readahead that grows with evidence of sequential reading, as the kernel's own does: a reader
//! starts with no chunks fetched ahead; each sequential read that reaches a new chunk doubles the
//! window (1, 2, 4, ... up to [`MAX_WINDOW`] chunks). A header read (a few KiB at offset 0) or a
//! random read fetches only its own chunks; a streaming reader has the full window after a few
//! chunks. A reader at the full window is then served by one long ranged GET instead, paced
//! to stay [`STREAM_AHEAD`] chunks ahead of it (see `LazyBlob::stream_ahead`).

/// Most chunks kept fetched ahead of a sequential reader.
pub(crate) const MAX_WINDOW: u64 = 32;
/// Chunks per readahead request (one ranged GET each, in parallel).
pub(crate) const RUN: u64 = 16;
/// Most chunks a reader's stream runs ahead of it: what waits for the reader stays within
/// what the mount keeps in memory for reads (48 MiB of 2 MiB chunks), not read back from disk.
pub(crate) const STREAM_AHEAD: u64 = 16;

/// One inode's sequential reader: where it stands and how far ahead it has earned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stream {
    /// The file offset a sequential read starts at (the end of the last read).
    end: u64,
    /// The blob chunk holding the last byte read.
    last: u64,
    /// Chunks to keep fetched after `last`: 0 until a sequential read reaches a new chunk.
    window: u64,
}

/// What to keep fetched ahead of a reader: `window` chunks from chunk `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ahead {
    /// The first chunk after the one the reader is in.
    pub(crate) from: u64,
    /// How many chunks from `from`.
    pub(crate) window: u64,
}

impl Stream {
    /// The stream after a read of `len` bytes at file `offset` whose last byte is in blob chunk
    /// `last`, given the stream before it (`None`: the inode's first read). A read starting
    /// where the previous one ended continues the stream, and doubles the window when it reached
    /// a new chunk; any other read (including the first, even at offset 0) starts a new stream
    /// with nothing ahead.
    pub(crate) fn after(prev: Option<Stream>, offset: u64, len: u64, last: u64) -> Stream {
        let end = offset.saturating_add(len);
        match prev {
            Some(s) if s.end == offset && len > 0 => Stream {
                end,
                last,
                window: if last > s.last {
                    (s.window * 2).clamp(1, MAX_WINDOW)
                } else {
                    s.window
                },
            },
            _ => Stream {
                end,
                last,
                window: 0,
            },
        }
    }

    /// The chunks to keep fetched ahead of this reader, `None` until it has earned any.
    pub(crate) fn ahead(&self) -> Option<Ahead> {
        (self.window > 0).then_some(Ahead {
            from: self.last + 1,
            window: self.window,
        })
    }
}

impl Ahead {
    /// The requests that keep the window filled, as `(first chunk, count)` runs of at most
    /// [`RUN`] chunks (each one ranged GET), for a blob of `chunk_count` chunks.
    /// `first_uncovered(from, to)` names the first chunk of `from..to` neither here nor being
    /// fetched. Nothing is asked while at least half the window is covered; otherwise from the
    /// first uncovered chunk to the end of the window, so a streaming reader costs a few large
    /// requests rather than one per chunk.
    pub(crate) fn runs(
        &self,
        chunk_count: u64,
        first_uncovered: impl FnOnce(u64, u64) -> Option<u64>,
    ) -> Vec<(u64, u64)> {
        let end = (self.from + self.window).min(chunk_count);
        let Some(gap) = first_uncovered(self.from, end) else {
            return Vec::new();
        };
        if gap >= self.from + self.window.div_ceil(2) {
            return Vec::new();
        }
        let run = self.window.min(RUN);
        (gap..end)
            .step_by(run as usize)
            .map(|first| (first, run.min(chunk_count - first)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const CHUNK: u64 = 2 << 20;

    /// A reader over one blob: replays reads through [`Stream`] and [`Ahead::runs`] with the
    /// requested chunks counted as covered (fetched at once), as the mount does.
    struct Reader {
        stream: Option<Stream>,
        covered: BTreeSet<u64>,
        chunk_count: u64,
    }

    impl Reader {
        fn new(chunk_count: u64) -> Reader {
            Reader {
                stream: None,
                covered: BTreeSet::new(),
                chunk_count,
            }
        }

        /// Reads `len` bytes at `offset`; returns the readahead runs it started.
        fn read(&mut self, offset: u64, len: u64) -> Vec<(u64, u64)> {
            let (first, last) = (offset / CHUNK, (offset + len - 1) / CHUNK);
            self.covered.extend(first..=last);
            let stream = Stream::after(self.stream, offset, len, last);
            self.stream = Some(stream);
            let Some(ahead) = stream.ahead() else {
                return Vec::new();
            };
            let covered = &self.covered;
            let runs = ahead.runs(self.chunk_count, |from, to| {
                (from..to).find(|i| !covered.contains(i))
            });
            for &(first, count) in &runs {
                self.covered.extend(first..first + count);
            }
            runs
        }

        /// Reads sequentially from `offset` in `piece`-byte reads up to `end`; returns every
        /// readahead run started.
        fn stream(&mut self, offset: u64, end: u64, piece: u64) -> Vec<(u64, u64)> {
            (offset..end)
                .step_by(piece as usize)
                .flat_map(|o| self.read(o, piece.min(end - o)))
                .collect()
        }

        fn fetched_chunks(&self) -> usize {
            self.covered.len()
        }
    }

    #[test]
    fn a_header_read_at_offset_zero_fetches_nothing_ahead() {
        let mut r = Reader::new(512);
        // What the kernel turns "8 bytes, then a 60 KiB JSON header" into.
        assert!(r.read(0, 16 << 10).is_empty());
        assert!(r.read(16 << 10, 64 << 10).is_empty());
        assert_eq!(r.fetched_chunks(), 1);
    }

    #[test]
    fn a_lone_random_read_fetches_nothing_ahead() {
        let mut r = Reader::new(512);
        assert!(r.read(100 * CHUNK + 4096, 1 << 20).is_empty());
        assert!(r.read(7 * CHUNK, 1 << 20).is_empty());
        assert_eq!(r.fetched_chunks(), 2);
    }

    #[test]
    fn the_window_doubles_per_new_chunk_read_in_sequence_up_to_the_maximum() {
        let mut r = Reader::new(512);
        let mut windows = Vec::new();
        for o in (0..12 * CHUNK).step_by(1 << 20) {
            r.read(o, 1 << 20);
            windows.push(r.stream.map_or(0, |s| s.window));
        }
        // Two 1 MiB reads per chunk: the window grows on the first read of each new chunk.
        assert_eq!(
            windows,
            [
                0, 0, 1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32, 32,
                32
            ]
        );
    }

    #[test]
    fn a_streaming_reader_is_served_in_growing_runs_then_full_runs_of_sixteen() {
        let mut r = Reader::new(512);
        let runs = r.stream(0, 16 * CHUNK, 1 << 20);
        assert_eq!(
            runs,
            [
                (2, 1),   // first read in chunk 1: window 1
                (3, 2),   // chunk 2: window 2
                (5, 4),   // chunk 3: window 4 (chunk 4: window 8, half of it covered)
                (9, 16),  // chunk 5: window 16
                (25, 16), // chunk 9: window 32, less than half of it covered
                (41, 16),
            ]
        );
        // Later refills: whenever fewer than half of the 32 chunks ahead are covered, in runs
        // of 16 chunks.
        let later = r.stream(16 * CHUNK, 200 * CHUNK, 1 << 20);
        assert!(later.iter().all(|&(_, count)| count == RUN), "{later:?}");
        let reader_at = 199;
        let ahead: Vec<u64> = r.covered.range(reader_at + 1..).copied().collect();
        assert!(ahead.len() as u64 >= MAX_WINDOW / 2, "{ahead:?}");
        assert!(ahead.iter().all(|&c| c <= reader_at + MAX_WINDOW + RUN));
    }

    #[test]
    fn a_seek_starts_over_and_the_blob_end_caps_the_runs() {
        let mut r = Reader::new(40);
        r.stream(0, 10 * CHUNK, 1 << 20);
        assert!(r.stream.is_some_and(|s| s.window == MAX_WINDOW));
        // A jump back: nothing ahead until the reader shows it reads in sequence again.
        assert!(r.read(2 * CHUNK + 4096, 4096).is_empty());
        assert_eq!(r.stream.map(|s| s.window), Some(0));
        // Near the end: runs stop at the last chunk.
        let runs = r.stream(30 * CHUNK, 40 * CHUNK, 1 << 20);
        assert!(
            runs.iter().all(|&(first, count)| first + count <= 40),
            "{runs:?}"
        );
        assert_eq!(r.fetched_chunks(), 40);
    }

    #[test]
    fn an_empty_read_does_not_count_as_evidence() {
        let s = Stream::after(None, 0, 4096, 0);
        let s = Stream::after(Some(s), 4096, 0, 1);
        assert_eq!(s.window, 0);
    }
}
