//! splitmix64: the one generator of pseudo-random content in perfplus and its guest.
//!
//! The built-in guest fills pages with splitmix64 streams and regenerates them to check what it reads
//! (`guest/src/content.rs`); tests, examples and the fuzzer build the same content, or just need a
//! fast seeded generator. A stream keyed `k` is `mix64(k + GOLDEN)`, `mix64(k + 2 GOLDEN)`, ...

/// The stream's increment: 2^64 divided by the golden ratio, odd.
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The splitmix64 finalizer: a fast, well-mixing bijection of 64-bit words.
#[inline(always)]
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The next word of the stream whose state is `state` (the state advances by [`GOLDEN`]).
#[inline(always)]
pub fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    mix64(*state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_values() {
        // splitmix64 seeded with 0, as published with the algorithm (Vigna's splitmix64.c).
        let mut s = 0;
        assert_eq!(next(&mut s), 0xe220_a839_7b1d_cdaf);
        assert_eq!(next(&mut s), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(next(&mut s), 0x06c4_5d18_8009_454f);
    }
}
