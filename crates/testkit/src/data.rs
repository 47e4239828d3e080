//! Test data.

/// `size` pseudo-random bytes (xorshift64 from `seed`): test weights that do not compress and
/// differ per seed.
pub fn pseudo_random(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut data = Vec::with_capacity(size + 8);
    while data.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(size);
    data
}
