//! Mutations of an input, without coverage feedback: bit flips, interesting integers (in every width,
//! both byte orders), random bytes, insertions, deletions, duplicated ranges, splices with another
//! input, and a fix-up that makes a frame header's length field announce the bytes that follow it,
//! so that mutated payloads get past the header's checks.

/// splitmix64: small, fast, and reproducible from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        perfplus_common::splitmix::next(&mut self.0)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Values that sit on the edges decoders check.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    4,
    8,
    9,
    13,
    16,
    25,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x1000,
    0x1019, // a full page item
    0x7fff,
    0x8000,
    0xffff,
    0x10000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX - 1,
    u64::MAX,
];

fn interesting(rng: &mut Rng) -> u64 {
    let v = INTERESTING[rng.below(INTERESTING.len())];
    match rng.below(4) {
        0 => v.wrapping_add(1),
        1 => v.wrapping_sub(1),
        _ => v,
    }
}

/// Writes `value` as `width` bytes at `at` (clipped to the buffer), little- or big-endian.
fn put_int(buf: &mut [u8], at: usize, width: usize, value: u64, big_endian: bool) {
    let bytes = if big_endian {
        value.to_be_bytes()[8 - width..].to_vec()
    } else {
        value.to_le_bytes()[..width].to_vec()
    };
    for (i, b) in bytes.into_iter().enumerate() {
        if let Some(slot) = buf.get_mut(at + i) {
            *slot = b;
        }
    }
}

/// A postcard varint (LEB128) of `value`, as postcard writes lengths and integers.
fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// One mutation of `buf` in place; `other` is another input to splice from.
fn mutate_once(buf: &mut Vec<u8>, other: &[u8], rng: &mut Rng, max_len: usize) {
    let len = buf.len();
    match rng.below(12) {
        0 if len > 0 => {
            let at = rng.below(len);
            buf[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = rng.below(len);
            buf[at] = rng.next_u64() as u8;
        }
        2 | 3 if len > 0 => {
            let width = [1, 2, 4, 8][rng.below(4)];
            let at = rng.below(len);
            let value = interesting(rng);
            put_int(buf, at, width, value, rng.chance(4));
        }
        4 if len > 0 => {
            // A postcard varint over whatever was there: lengths and counts with odd values.
            let at = rng.below(len);
            let v = varint(interesting(rng));
            let end = (at + v.len()).min(len);
            buf.splice(at..end, v);
        }
        5 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            buf.splice(at..at, bytes);
        }
        6 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            buf.drain(at..at + n);
        }
        7 if len > 0 => {
            // Duplicate a range (repeated items, repeated fields).
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(4200));
            let copy = buf[at..at + n].to_vec();
            let to = rng.below(len + 1);
            buf.splice(to..to, copy);
        }
        8 if !other.is_empty() => {
            // Splice: a range of another input over or into this one.
            let from = rng.below(other.len());
            let n = 1 + rng.below((other.len() - from).min(4200));
            let to = rng.below(len + 1);
            let end = if rng.chance(2) { (to + n).min(len) } else { to };
            buf.splice(to..end, other[from..from + n].iter().copied());
        }
        9 if len > 0 => buf.truncate(rng.below(len)),
        10 if len >= 8 => {
            // Frame header length field = the bytes that follow, so the payload gets decoded.
            let payload = (len - 8) as u32;
            buf[4..8].copy_from_slice(&payload.to_le_bytes());
        }
        _ => {
            let at = rng.below(len + 1);
            let value = interesting(rng);
            let width = [1, 2, 4, 8][rng.below(4)];
            let mut bytes = vec![0; width];
            put_int(&mut bytes, 0, width, value, false);
            buf.splice(at..at, bytes);
        }
    }
    buf.truncate(max_len);
}

/// A mutant of `input`: one to eight stacked mutations, at most `max_len` bytes.
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let mut buf = input.to_vec();
    let rounds = 1 + rng.below(8);
    for _ in 0..rounds {
        mutate_once(&mut buf, other, rng, max_len);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutants_stay_within_the_length_and_differ() {
        let mut rng = Rng::new(7);
        let input = vec![0u8; 100];
        let mut changed = 0;
        for _ in 0..1000 {
            let m = mutate(&input, b"other input", &mut rng, 128);
            assert!(m.len() <= 128);
            changed += usize::from(m != input);
        }
        assert!(changed > 900, "{changed}");
        assert_eq!(varint(300), [0xac, 0x02]);
    }
}
