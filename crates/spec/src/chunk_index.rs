//! The chunk-digest index: the sha256 of each fixed-size chunk of each layer blob (raw, tar and
//! tar+zstd layers, keyed by the blob's digest), so a lazy reader can verify every chunk it
//! serves without fetching the whole layer. Our builds write
//! it and pin it in the manifest (`dev.modelpack.chunk-index.digest` and `.size`);
//! `modelpack index` makes one for other artifacts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::media_type::MEDIA_TYPE_CHUNK_INDEX;

/// Per-layer chunk digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ChunkIndex {
    /// Always [`MEDIA_TYPE_CHUNK_INDEX`].
    pub media_type: String,
    /// Bytes per chunk (the last chunk of a layer may be shorter).
    pub chunk_size: u64,
    /// Layer digest -> digests of its chunks, in order.
    pub layers: BTreeMap<Digest, Vec<Digest>>,
}

impl ChunkIndex {
    /// An empty index for `chunk_size`.
    pub fn new(chunk_size: u64) -> ChunkIndex {
        ChunkIndex {
            media_type: MEDIA_TYPE_CHUNK_INDEX.to_owned(),
            chunk_size,
            layers: BTreeMap::new(),
        }
    }

    /// Parses and checks an index blob.
    pub fn from_slice(bytes: &[u8]) -> Result<ChunkIndex> {
        let index: ChunkIndex = serde_json::from_slice(bytes).map_err(|source| Error::Json {
            what: "chunk index",
            source,
        })?;
        if index.media_type != MEDIA_TYPE_CHUNK_INDEX || index.chunk_size < 4096 {
            return Err(Error::Invalid {
                what: "chunk index",
                reason: "wrong media type or a chunk size under 4 KiB".into(),
            });
        }
        Ok(index)
    }

    /// Checks that `chunks` has the right count for a layer of `size` bytes.
    pub fn covers(&self, chunks: &[Digest], size: u64) -> bool {
        chunks.len() as u64 == size.div_ceil(self.chunk_size)
    }

    /// The blob bytes (compact JSON, keys sorted).
    pub fn to_vec(&self) -> Vec<u8> {
        crate::to_canonical_json(self)
    }
}

/// Hashes a blob chunk by chunk as its bytes arrive in pieces of any size: the chunk digests of
/// a [`ChunkIndex`] entry.
#[derive(Debug, Clone)]
pub struct ChunkHasher {
    chunk_size: u64,
    current: sha2::Sha256,
    fill: u64,
    chunks: Vec<Digest>,
}

impl ChunkHasher {
    /// A hasher for chunks of `chunk_size` bytes (at least 1).
    pub fn new(chunk_size: u64) -> ChunkHasher {
        ChunkHasher {
            chunk_size: chunk_size.max(1),
            current: sha2::Sha256::default(),
            fill: 0,
            chunks: Vec::new(),
        }
    }

    /// Hashes the next bytes of the blob.
    pub fn update(&mut self, mut bytes: &[u8]) {
        use sha2::Digest as _;
        while !bytes.is_empty() {
            let take = ((self.chunk_size - self.fill) as usize).min(bytes.len());
            self.current.update(&bytes[..take]);
            self.fill += take as u64;
            bytes = &bytes[take..];
            if self.fill == self.chunk_size {
                let full = std::mem::take(&mut self.current);
                self.chunks
                    .push(Digest::from_sha256(full.finalize().into()));
                self.fill = 0;
            }
        }
    }

    /// The digest of every chunk, the last (short) one included.
    pub fn finish(mut self) -> Vec<Digest> {
        use sha2::Digest as _;
        if self.fill > 0 {
            self.chunks
                .push(Digest::from_sha256(self.current.finalize().into()));
        }
        self.chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut index = ChunkIndex::new(4 << 20);
        index
            .layers
            .insert(Digest::sha256_of(b"layer"), vec![Digest::sha256_of(b"c0")]);
        let back = ChunkIndex::from_slice(&index.to_vec()).expect("parses");
        assert_eq!(back, index);
        assert!(back.covers(&index.layers[&Digest::sha256_of(b"layer")], 5));
        assert!(ChunkIndex::from_slice(b"{}").is_err());
    }

    #[test]
    fn chunk_digests_do_not_depend_on_how_the_bytes_arrive() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let want: Vec<Digest> = data.chunks(4096).map(Digest::sha256_of).collect();
        for piece in [1, 7, 4096, 5000, 10_000] {
            let mut hasher = ChunkHasher::new(4096);
            data.chunks(piece).for_each(|p| hasher.update(p));
            assert_eq!(hasher.finish(), want, "pieces of {piece}");
        }
        assert!(ChunkHasher::new(4096).finish().is_empty());
    }
}
