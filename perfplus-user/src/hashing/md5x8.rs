//! MD5 on eight 4 KiB pages at once, one page per 32-bit lane of AVX2's 256-bit registers.
//!
//! MD5 is one long dependency chain per message: each of its 64 steps per block needs the previous
//! step's result, so a core hashing one page waits on that chain and leaves most of its vector units
//! idle. Eight independent pages share the same chain of instructions, each in its own lane: the same
//! number of instructions (about ten 256-bit operations a step) hashes eight pages instead of one.
//!
//! Only what [`PageHasher`](super::PageHasher) needs is here: HMAC-MD5 of a 4096-byte message from the
//! two chaining values left by the key's inner and outer blocks (computed once by the hasher with the
//! md-5 crate). Every lane has the same length, so there is no ragged tail: 64 message blocks, then one
//! padding block that is the same for every lane (the inner message is 64 + 4096 bytes, a multiple of
//! the block size), then the outer hash's single block (the inner digest, padding, length 64 + 16).
//! The steps are RFC 1321's, written as the md-5 crate's `compress` writes them; `super::tests` checks
//! every lane bit for bit against the scalar hasher.
use std::arch::x86_64::{
    __m256i, _mm256_add_epi32, _mm256_and_si256, _mm256_loadu_si256, _mm256_or_si256, _mm256_permute2x128_si256,
    _mm256_set1_epi32, _mm256_setr_epi8, _mm256_shuffle_epi8, _mm256_slli_epi32, _mm256_srli_epi32,
    _mm256_unpackhi_epi32, _mm256_unpackhi_epi64, _mm256_unpacklo_epi32, _mm256_unpacklo_epi64, _mm256_xor_si256,
};

use perfplus_common::PAGE_SIZE;

use super::PageDigest;

/// Pages hashed by one call.
pub(super) const LANES: usize = 8;

/// MD5's per-step constants (RFC 1321, `floor(abs(sin(i + 1)) * 2^32)`).
const K: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501, 0x698098d8,
    0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821, 0xf61e2562, 0xc040b340,
    0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8, 0x21e1cde6, 0xc33707d6, 0xf4d50d87,
    0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a, 0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c,
    0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70, 0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039,
    0xe6db99e5, 0x1fa27cf8, 0xc4ac5665, 0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92,
    0xffeff47d, 0x85845dd1, 0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb,
    0xeb86d391,
];

/// Bit length of the inner message: the key's block and the page.
const INNER_BITS: u32 = ((64 + PAGE_SIZE) * 8) as u32;
/// Bit length of the outer message: the key's block and the inner digest.
const OUTER_BITS: u32 = ((64 + 16) * 8) as u32;

/// Proof that this CPU has AVX2: the only way to get one is [`Md5x8::detect`], so its methods may run
/// AVX2 code.
#[derive(Clone, Copy, Debug)]
pub(super) struct Md5x8(());

impl Md5x8 {
    /// `Some` if this CPU has AVX2 (the answer is cached by `std`, so this is cheap to call often).
    #[inline]
    pub(super) fn detect() -> Option<Self> {
        is_x86_feature_detected!("avx2").then_some(Md5x8(()))
    }

    /// HMAC-MD5 of each of `pages`, given MD5's chaining values after the key's inner block (`inner`)
    /// and after its outer block (`outer`).
    #[inline]
    pub(super) fn hmac_pages(
        self,
        inner: &[u32; 4],
        outer: &[u32; 4],
        pages: &[&[u8; PAGE_SIZE]; LANES],
    ) -> [PageDigest; LANES] {
        // SAFETY: `self` exists only if AVX2 was detected on this CPU, which is all `hmac_pages_avx2`
        // requires; its memory accesses are within the page references it is given.
        unsafe { hmac_pages_avx2(inner, outer, pages) }
    }
}

/// Adds lane by lane (wrapping).
macro_rules! add {
    ($x:expr, $y:expr) => {
        _mm256_add_epi32($x, $y)
    };
}

/// Rotates every lane left by `$s` bits (16: one byte shuffle; otherwise two shifts and an OR).
macro_rules! rotl {
    ($x:expr, 16, $rot16:expr) => {
        _mm256_shuffle_epi8($x, $rot16)
    };
    ($x:expr, $s:literal, $rot16:expr) => {{
        let x = $x;
        _mm256_or_si256(_mm256_slli_epi32::<$s>(x), _mm256_srli_epi32::<{ 32 - $s }>(x))
    }};
}

// MD5's four round functions, with the fewest operations AVX2 (no ternary logic) allows.
/// `F(x, y, z) = (x & y) | (!x & z)`, as `z ^ (x & (y ^ z))`.
macro_rules! f {
    ($x:expr, $y:expr, $z:expr, $ones:expr) => {
        _mm256_xor_si256($z, _mm256_and_si256($x, _mm256_xor_si256($y, $z)))
    };
}
/// `G(x, y, z) = (x & z) | (y & !z)`, as `y ^ (z & (x ^ y))`.
macro_rules! g {
    ($x:expr, $y:expr, $z:expr, $ones:expr) => {
        _mm256_xor_si256($y, _mm256_and_si256($z, _mm256_xor_si256($x, $y)))
    };
}
/// `H(x, y, z) = x ^ y ^ z`.
macro_rules! h {
    ($x:expr, $y:expr, $z:expr, $ones:expr) => {
        _mm256_xor_si256(_mm256_xor_si256($x, $y), $z)
    };
}
/// `I(x, y, z) = y ^ (x | !z)`.
macro_rules! i {
    ($x:expr, $y:expr, $z:expr, $ones:expr) => {
        _mm256_xor_si256($y, _mm256_or_si256($x, _mm256_xor_si256($z, $ones)))
    };
}

/// One MD5 step: `a = b + rotl(a + fun(b, c, d) + m[k] + K[i], s)`.
macro_rules! step {
    ($fun:ident, $a:ident, $b:ident, $c:ident, $d:ident, $m:ident, $k:literal, $i:literal, $s:tt, $ones:ident, $rot16:ident) => {
        $a = add!(
            $b,
            rotl!(
                add!(
                    add!($a, $m[$k]),
                    add!($fun!($b, $c, $d, $ones), _mm256_set1_epi32(K[$i] as i32))
                ),
                $s,
                $rot16
            )
        );
    };
}

/// MD5's compression function on eight lanes: lane `l` of `state` absorbs the block whose 32-bit word
/// `k` (little-endian, as MD5 reads it) is lane `l` of `m[k]`.
#[target_feature(enable = "avx2")]
#[inline]
fn compress(state: &mut [__m256i; 4], m: &[__m256i; 16]) {
    let ones = _mm256_set1_epi32(-1);
    let rot16 = _mm256_setr_epi8(
        2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13,
    );
    let [mut a, mut b, mut c, mut d] = *state;

    step!(f, a, b, c, d, m, 0, 0, 7, ones, rot16);
    step!(f, d, a, b, c, m, 1, 1, 12, ones, rot16);
    step!(f, c, d, a, b, m, 2, 2, 17, ones, rot16);
    step!(f, b, c, d, a, m, 3, 3, 22, ones, rot16);
    step!(f, a, b, c, d, m, 4, 4, 7, ones, rot16);
    step!(f, d, a, b, c, m, 5, 5, 12, ones, rot16);
    step!(f, c, d, a, b, m, 6, 6, 17, ones, rot16);
    step!(f, b, c, d, a, m, 7, 7, 22, ones, rot16);
    step!(f, a, b, c, d, m, 8, 8, 7, ones, rot16);
    step!(f, d, a, b, c, m, 9, 9, 12, ones, rot16);
    step!(f, c, d, a, b, m, 10, 10, 17, ones, rot16);
    step!(f, b, c, d, a, m, 11, 11, 22, ones, rot16);
    step!(f, a, b, c, d, m, 12, 12, 7, ones, rot16);
    step!(f, d, a, b, c, m, 13, 13, 12, ones, rot16);
    step!(f, c, d, a, b, m, 14, 14, 17, ones, rot16);
    step!(f, b, c, d, a, m, 15, 15, 22, ones, rot16);

    step!(g, a, b, c, d, m, 1, 16, 5, ones, rot16);
    step!(g, d, a, b, c, m, 6, 17, 9, ones, rot16);
    step!(g, c, d, a, b, m, 11, 18, 14, ones, rot16);
    step!(g, b, c, d, a, m, 0, 19, 20, ones, rot16);
    step!(g, a, b, c, d, m, 5, 20, 5, ones, rot16);
    step!(g, d, a, b, c, m, 10, 21, 9, ones, rot16);
    step!(g, c, d, a, b, m, 15, 22, 14, ones, rot16);
    step!(g, b, c, d, a, m, 4, 23, 20, ones, rot16);
    step!(g, a, b, c, d, m, 9, 24, 5, ones, rot16);
    step!(g, d, a, b, c, m, 14, 25, 9, ones, rot16);
    step!(g, c, d, a, b, m, 3, 26, 14, ones, rot16);
    step!(g, b, c, d, a, m, 8, 27, 20, ones, rot16);
    step!(g, a, b, c, d, m, 13, 28, 5, ones, rot16);
    step!(g, d, a, b, c, m, 2, 29, 9, ones, rot16);
    step!(g, c, d, a, b, m, 7, 30, 14, ones, rot16);
    step!(g, b, c, d, a, m, 12, 31, 20, ones, rot16);

    step!(h, a, b, c, d, m, 5, 32, 4, ones, rot16);
    step!(h, d, a, b, c, m, 8, 33, 11, ones, rot16);
    step!(h, c, d, a, b, m, 11, 34, 16, ones, rot16);
    step!(h, b, c, d, a, m, 14, 35, 23, ones, rot16);
    step!(h, a, b, c, d, m, 1, 36, 4, ones, rot16);
    step!(h, d, a, b, c, m, 4, 37, 11, ones, rot16);
    step!(h, c, d, a, b, m, 7, 38, 16, ones, rot16);
    step!(h, b, c, d, a, m, 10, 39, 23, ones, rot16);
    step!(h, a, b, c, d, m, 13, 40, 4, ones, rot16);
    step!(h, d, a, b, c, m, 0, 41, 11, ones, rot16);
    step!(h, c, d, a, b, m, 3, 42, 16, ones, rot16);
    step!(h, b, c, d, a, m, 6, 43, 23, ones, rot16);
    step!(h, a, b, c, d, m, 9, 44, 4, ones, rot16);
    step!(h, d, a, b, c, m, 12, 45, 11, ones, rot16);
    step!(h, c, d, a, b, m, 15, 46, 16, ones, rot16);
    step!(h, b, c, d, a, m, 2, 47, 23, ones, rot16);

    step!(i, a, b, c, d, m, 0, 48, 6, ones, rot16);
    step!(i, d, a, b, c, m, 7, 49, 10, ones, rot16);
    step!(i, c, d, a, b, m, 14, 50, 15, ones, rot16);
    step!(i, b, c, d, a, m, 5, 51, 21, ones, rot16);
    step!(i, a, b, c, d, m, 12, 52, 6, ones, rot16);
    step!(i, d, a, b, c, m, 3, 53, 10, ones, rot16);
    step!(i, c, d, a, b, m, 10, 54, 15, ones, rot16);
    step!(i, b, c, d, a, m, 1, 55, 21, ones, rot16);
    step!(i, a, b, c, d, m, 8, 56, 6, ones, rot16);
    step!(i, d, a, b, c, m, 15, 57, 10, ones, rot16);
    step!(i, c, d, a, b, m, 6, 58, 15, ones, rot16);
    step!(i, b, c, d, a, m, 13, 59, 21, ones, rot16);
    step!(i, a, b, c, d, m, 4, 60, 6, ones, rot16);
    step!(i, d, a, b, c, m, 11, 61, 10, ones, rot16);
    step!(i, c, d, a, b, m, 2, 62, 15, ones, rot16);
    step!(i, b, c, d, a, m, 9, 63, 21, ones, rot16);

    state[0] = add!(state[0], a);
    state[1] = add!(state[1], b);
    state[2] = add!(state[2], c);
    state[3] = add!(state[3], d);
}

/// Transposes eight rows of eight 32-bit words: word `k` of row `r` becomes lane `r` of `out[k]`.
#[target_feature(enable = "avx2")]
#[inline]
fn transpose8(r: &[__m256i; 8], out: &mut [__m256i]) {
    // Pairs of rows interleaved by word, then by pairs of words: each 128-bit half then holds one
    // word of four rows (the low half words 0..4, the high half words 4..8)...
    let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
    let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
    let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
    let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
    let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    let u0 = _mm256_unpacklo_epi64(t0, t2);
    let u1 = _mm256_unpackhi_epi64(t0, t2);
    let u2 = _mm256_unpacklo_epi64(t1, t3);
    let u3 = _mm256_unpackhi_epi64(t1, t3);
    let u4 = _mm256_unpacklo_epi64(t4, t6);
    let u5 = _mm256_unpackhi_epi64(t4, t6);
    let u6 = _mm256_unpacklo_epi64(t5, t7);
    let u7 = _mm256_unpackhi_epi64(t5, t7);
    // ...and rows 0..4 and 4..8 of the same word are joined across the halves.
    out[0] = _mm256_permute2x128_si256::<0x20>(u0, u4);
    out[1] = _mm256_permute2x128_si256::<0x20>(u1, u5);
    out[2] = _mm256_permute2x128_si256::<0x20>(u2, u6);
    out[3] = _mm256_permute2x128_si256::<0x20>(u3, u7);
    out[4] = _mm256_permute2x128_si256::<0x31>(u0, u4);
    out[5] = _mm256_permute2x128_si256::<0x31>(u1, u5);
    out[6] = _mm256_permute2x128_si256::<0x31>(u2, u6);
    out[7] = _mm256_permute2x128_si256::<0x31>(u3, u7);
}

/// Loads 32 bytes of `page` from `offset`.
#[target_feature(enable = "avx2")]
#[inline]
fn load(page: &[u8; PAGE_SIZE], offset: usize) -> __m256i {
    let bytes: &[u8; 32] = page[offset..offset + 32].try_into().expect("32 bytes within the page");
    // SAFETY: `bytes` is 32 readable bytes, exactly one `__m256i`; the load is unaligned (`loadu`), and
    // AVX2 (for which `_mm256_loadu_si256`'s AVX is a prerequisite) is enabled on this function.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast::<__m256i>()) }
}

/// The lanes of `v` as eight 32-bit words.
#[target_feature(enable = "avx2")]
#[inline]
fn lanes(v: __m256i) -> [u32; LANES] {
    // SAFETY: `__m256i` and `[u32; 8]` have the same size (32 bytes) and every bit pattern is a valid
    // `[u32; 8]`.
    unsafe { std::mem::transmute::<__m256i, [u32; LANES]>(v) }
}

/// [`Md5x8::hmac_pages`] proper.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn hmac_pages_avx2(
    inner: &[u32; 4],
    outer: &[u32; 4],
    pages: &[&[u8; PAGE_SIZE]; LANES],
) -> [PageDigest; LANES] {
    let splat = |w: u32| _mm256_set1_epi32(w as i32);
    let mut state = [splat(inner[0]), splat(inner[1]), splat(inner[2]), splat(inner[3])];
    let zero = splat(0);
    let mut m = [zero; 16];
    let mut rows = [zero; 8];
    for block in 0..PAGE_SIZE / 64 {
        for half in 0..2 {
            for (row, page) in rows.iter_mut().zip(pages) {
                *row = load(page, block * 64 + half * 32);
            }
            transpose8(&rows, &mut m[half * 8..half * 8 + 8]);
        }
        compress(&mut state, &m);
    }
    // The inner hash's padding block, the same in every lane: 0x80, zeros, the length in bits.
    let mut pad = [zero; 16];
    pad[0] = splat(0x80);
    pad[14] = splat(INNER_BITS);
    compress(&mut state, &pad);

    // The outer hash: one block holding the inner digest (its words are the state's), 0x80, the length.
    let mut block = [zero; 16];
    block[..4].copy_from_slice(&state);
    block[4] = splat(0x80);
    block[14] = splat(OUTER_BITS);
    let mut state = [splat(outer[0]), splat(outer[1]), splat(outer[2]), splat(outer[3])];
    compress(&mut state, &block);

    let words = [lanes(state[0]), lanes(state[1]), lanes(state[2]), lanes(state[3])];
    let mut out = [[0u8; 16]; LANES];
    for (lane, digest) in out.iter_mut().enumerate() {
        for (w, chunk) in digest.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&words[w][lane].to_le_bytes());
        }
    }
    out
}
