//! Buffers for fetched chunks: aligned for direct writes, and reused. A chunk's buffer goes back
//! to a small process-wide pool when the last [`Bytes`] of it is dropped (written, and served
//! or pushed out of memory), so a cold read of any size allocates a handful of buffers, not one
//! per chunk: the allocator's slack and fresh pages cost memory and time.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// Alignment of the buffers, offsets and lengths of direct writes (the largest logical block
/// size a disk has).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// Bytes of every chunk buffer in use.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The process's pool: at most 8 MiB of free buffers.
static POOL: Pool = Pool::new(8 << 20);

/// Free buffers (empty, with their capacity), up to a number of bytes.
pub(crate) struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    limit: usize,
}

impl Pool {
    /// A pool that keeps at most `limit` bytes of free buffers.
    const fn new(limit: usize) -> Pool {
        Pool {
            free: Mutex::new(Vec::new()),
            limit,
        }
    }

    /// A free buffer of at least `need` bytes, if the pool has one.
    fn take(&self, need: usize) -> Option<Vec<u8>> {
        let mut free = self.free.lock().ok()?;
        let at = free.iter().position(|v| v.capacity() >= need)?;
        Some(free.swap_remove(at))
    }

    /// Keeps `vec` for reuse when there is room.
    fn give_back(&self, vec: Vec<u8>) {
        if let Ok(mut free) = self.free.lock() {
            let held: usize = free.iter().map(Vec::capacity).sum();
            if held + vec.capacity() <= self.limit {
                free.push(vec);
            }
        }
    }
}

/// Bytes of every chunk buffer in use: what fetches are filling, what waits to be written, and
/// what is kept in memory for reads.
pub(crate) fn live_bytes() -> usize {
    LIVE.load(Ordering::SeqCst)
}

/// A chunk being filled: its bytes start at an address aligned to [`DIRECT_ALIGN`].
pub(crate) struct ChunkBuf {
    vec: Vec<u8>,
    /// Bytes skipped at the start of `vec` for alignment.
    skip: usize,
    /// The most bytes it takes.
    limit: usize,
    /// Where its buffer goes when it is dropped.
    pool: &'static Pool,
}

impl ChunkBuf {
    /// An empty buffer for up to `size` bytes, from the process's pool when it has one.
    pub(crate) fn new(size: usize) -> ChunkBuf {
        ChunkBuf::from_pool(size, &POOL)
    }

    fn from_pool(size: usize, pool: &'static Pool) -> ChunkBuf {
        let need = size + DIRECT_ALIGN;
        let mut vec = pool.take(need).unwrap_or_else(|| Vec::with_capacity(need));
        LIVE.fetch_add(vec.capacity(), Ordering::SeqCst);
        vec.clear();
        let skip = vec.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        vec.resize(skip, 0);
        ChunkBuf {
            vec,
            skip,
            limit: size,
            pool,
        }
    }

    /// Bytes in it.
    pub(crate) fn len(&self) -> usize {
        self.vec.len() - self.skip
    }

    /// Appends `bytes` (at most up to its size).
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        let room = self.limit - self.len();
        self.vec.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// The bytes, as shared [`Bytes`] that give the buffer back to the pool when dropped.
    pub(crate) fn freeze(self) -> Bytes {
        Bytes::from_owner(Filled(self))
    }
}

/// A filled [`ChunkBuf`] behind [`Bytes`].
struct Filled(ChunkBuf);

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        &self.0.vec[self.0.skip..]
    }
}

impl Drop for ChunkBuf {
    fn drop(&mut self) {
        let vec = std::mem::take(&mut self.vec);
        LIVE.fetch_sub(vec.capacity(), Ordering::SeqCst);
        self.pool.give_back(vec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_aligned_holds_what_was_added_and_its_buffer_is_reused() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(1 << 20)));
        let mut buf = ChunkBuf::from_pool(10_000, pool);
        buf.extend(&[7u8; 6000]);
        buf.extend(&[9u8; 6000]);
        assert_eq!(buf.len(), 10_000, "never more than its size");
        let bytes = buf.freeze();
        assert_eq!(bytes.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(bytes.len(), 10_000);
        assert!(bytes[..6000].iter().all(|&b| b == 7));
        assert!(bytes[6000..].iter().all(|&b| b == 9));
        let slice = bytes.slice(100..200);
        drop(bytes);
        assert!(pool.take(0).is_none(), "a slice keeps the buffer in use");
        let address = slice.as_ptr() as usize - 100;
        drop(slice);
        let again = ChunkBuf::from_pool(10_000, pool);
        assert_eq!(again.len(), 0);
        assert_eq!(
            again.vec.as_ptr() as usize + again.skip,
            address,
            "the same buffer"
        );
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_limit() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(3 * 8192)));
        let bufs: Vec<ChunkBuf> = (0..5).map(|_| ChunkBuf::from_pool(4096, pool)).collect();
        drop(bufs);
        let kept = pool.free.lock().map(|f| f.len()).unwrap_or(0);
        assert_eq!(kept, 3, "three buffers of 8 KiB fit in 24 KiB");
    }
}
