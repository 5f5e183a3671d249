//! The `PagesZstd` payload: a [`PageBatch`]'s payload compressed with zstd, and the rule that says
//! when compressing a batch makes a migration faster.
//!
//! Layout: `u32 raw_len` (the `Pages` payload's length), then one zstd frame that decompresses to
//! exactly `raw_len` bytes. `raw_len` is checked against the `Pages` limit before anything is
//! decompressed, and the decompressor writes into a buffer of that size and no more: a compressed
//! frame cannot make a reader allocate more than a `Pages` frame could.
//!
//! A reader turns a `PagesZstd` frame into the same [`Message::Pages`](crate::Message::Pages) a
//! `Pages` frame gives, so nothing above the connection knows whether a batch was compressed.

use std::time::{Duration, Instant};

use super::codec::malformed;
use super::header::{FrameError, FrameType, PAGE_BATCH_MAX_PAYLOAD};
use super::page_batch::PageBatch;

/// zstd's level 1: its fastest standard level (about 400-600 MB/s of page content on one core of
/// this machine), which still entropy-codes (lz4 does not, and text-like pages shrink mostly by that).
const LEVEL: i32 = 1;

/// Bytes before the zstd frame.
const RAW_LEN_BYTES: usize = 4;

/// Decodes a `PagesZstd` payload into the batch it carries.
pub fn decompress_batch(payload: &[u8]) -> Result<PageBatch, FrameError> {
    let frame = FrameType::PagesZstd;
    let (len, data) = payload
        .split_first_chunk::<RAW_LEN_BYTES>()
        .ok_or_else(|| malformed(frame, "shorter than its length field"))?;
    let raw_len = u32::from_le_bytes(*len) as usize;
    if raw_len > PAGE_BATCH_MAX_PAYLOAD {
        return Err(malformed(
            frame,
            format!("announces {raw_len} bytes of pages, more than a Pages frame's {PAGE_BATCH_MAX_PAYLOAD}"),
        ));
    }
    let raw = zstd::bulk::decompress(data, raw_len).map_err(|e| malformed(frame, format!("zstd: {e}")))?;
    if raw.len() != raw_len {
        return Err(malformed(
            frame,
            format!("decompressed to {} bytes, not the {raw_len} announced", raw.len()),
        ));
    }
    PageBatch::from_payload(raw)
}

/// What compression did on one connection, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompressionStats {
    /// Batches sent compressed.
    pub batches: u64,
    /// Their `Pages` payload bytes, and what went on the wire for them instead.
    pub raw_bytes: u64,
    pub compressed_bytes: u64,
    /// Batches compressed to measure and then sent as they were (they did not shrink enough).
    pub probes_unused: u64,
    /// Time spent compressing.
    pub cpu: Duration,
}

/// When to compress the batches a connection sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionMode {
    /// Never (the default of a connection).
    Off,
    /// Every batch that shrinks.
    Always,
    /// When it makes sending faster: see [`PageCompressor::worth_it`].
    Adaptive,
}

/// Compresses batches for one connection and keeps what it measured.
pub struct PageCompressor {
    mode: CompressionMode,
    compressor: zstd::bulk::Compressor<'static>,
    /// The last compressed payload (reused).
    out: Vec<u8>,
    stats: CompressionStats,
    /// Moving estimates from compressed batches: raw bytes per second of compressing, and raw/wire.
    speed: Option<f64>,
    ratio: Option<f64>,
    /// Batches since the last one compressed (adaptive mode compresses one now and then to keep its
    /// estimates current).
    since_probe: u32,
}

/// In adaptive mode, one batch in this many is compressed while compression is off, to measure.
const PROBE_EVERY: u32 = 16;
/// Below this ratio a batch is sent as it was: the receiver's work is not worth a few bytes.
const MIN_RATIO: f64 = 1.05;
/// Weight of the newest sample in the moving estimates.
const ALPHA: f64 = 0.25;

impl PageCompressor {
    pub fn new(mode: CompressionMode) -> std::io::Result<PageCompressor> {
        Ok(PageCompressor {
            mode,
            compressor: zstd::bulk::Compressor::new(LEVEL)?,
            out: Vec::new(),
            stats: CompressionStats::default(),
            speed: None,
            ratio: None,
            since_probe: 0,
        })
    }

    pub fn mode(&self) -> CompressionMode {
        self.mode
    }

    pub fn stats(&self) -> CompressionStats {
        self.stats
    }

    /// Whether compressing beats sending as is over a link that moves `link_rate` bytes/s, with
    /// compression at `speed` raw bytes/s shrinking by `ratio`. Compressing then sending costs
    /// `1/speed + 1/(ratio × link)` seconds per raw byte (counted one after the other, as this
    /// connection does them), sending as is `1/link`: compress when
    /// `link_rate < speed × (1 − 1/ratio)`. Incompressible pages (ratio near 1) never qualify; on
    /// loopback (GB/s) zstd is slower than the link and does not either.
    pub fn worth_it(link_rate: f64, speed: f64, ratio: f64) -> bool {
        ratio >= MIN_RATIO && link_rate < speed * (1.0 - 1.0 / ratio)
    }

    /// The compressed payload of `batch` if it is to be sent compressed (a `PagesZstd` payload),
    /// else None. `link_rate` is the link's delivery rate in bytes/s if known.
    pub fn compress(&mut self, batch: &PageBatch, link_rate: Option<f64>) -> Option<&[u8]> {
        let raw = batch.as_bytes();
        if raw.is_empty() {
            return None;
        }
        let wanted = match self.mode {
            CompressionMode::Off => false,
            CompressionMode::Always => true,
            CompressionMode::Adaptive => match (link_rate, self.speed, self.ratio) {
                (Some(link), Some(speed), Some(ratio)) => {
                    Self::worth_it(link, speed, ratio) || self.since_probe + 1 >= PROBE_EVERY
                }
                // Nothing measured yet: measure.
                _ => true,
            },
        };
        if !wanted {
            self.since_probe += 1;
            return None;
        }
        self.since_probe = 0;
        let started = Instant::now();
        self.out.clear();
        self.out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        self.out
            .resize(RAW_LEN_BYTES + zstd::zstd_safe::compress_bound(raw.len()), 0);
        let written = match self.compressor.compress_to_buffer(raw, &mut self.out[RAW_LEN_BYTES..]) {
            Ok(n) => n,
            Err(_) => return None, // sent as is: compression is an optimisation
        };
        self.out.truncate(RAW_LEN_BYTES + written);
        let took = started.elapsed();
        self.stats.cpu += took;
        let ratio = raw.len() as f64 / self.out.len() as f64;
        let speed = raw.len() as f64 / took.as_secs_f64().max(1e-6);
        self.ratio = Some(self.ratio.map_or(ratio, |r| r + ALPHA * (ratio - r)));
        self.speed = Some(self.speed.map_or(speed, |s| s + ALPHA * (speed - s)));
        let send = match self.mode {
            CompressionMode::Adaptive => match link_rate {
                Some(link) => Self::worth_it(link, self.speed.unwrap_or(speed), ratio),
                None => ratio >= MIN_RATIO,
            },
            _ => ratio >= MIN_RATIO,
        };
        if !send {
            self.stats.probes_unused += 1;
            return None;
        }
        self.stats.batches += 1;
        self.stats.raw_bytes += raw.len() as u64;
        self.stats.compressed_bytes += self.out.len() as u64;
        Some(&self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_payload, Frame, FrameHeader, PageItem};
    use crate::Message;
    use perfplus_common::PAGE_SIZE;

    /// Text-like page content: letters with skewed frequencies, as compressible as prose by entropy.
    fn text_page(seed: u64) -> [u8; PAGE_SIZE] {
        const LETTERS: &[u8] = b"eeeeeetttttaaaaooooiiinnnsssshhrrdlcumwfgypbvk      ";
        let mut x = seed;
        std::array::from_fn(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            LETTERS[(x >> 33) as usize % LETTERS.len()]
        })
    }

    fn batch(pages: u64) -> PageBatch {
        let mut b = PageBatch::new();
        for p in 0..pages {
            b.push_full(p, &[p as u8; 16], &text_page(p));
            b.push_zero(1000 + p);
        }
        b
    }

    fn decode(payload: &[u8]) -> Result<Frame, FrameError> {
        let mut header = [0u8; 8];
        header[..2].copy_from_slice(&(FrameType::PagesZstd as u16).to_le_bytes());
        header[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        decode_payload(FrameHeader::parse(&header)?, payload.to_vec())
    }

    #[test]
    fn a_compressed_batch_decodes_to_the_same_batch() {
        let b = batch(64);
        let mut c = PageCompressor::new(CompressionMode::Always).unwrap();
        let payload = c.compress(&b, None).expect("text pages compress").to_vec();
        // About 4.5 bits of entropy a letter here: under 3/4 of the size (measured: 140464 of 264320).
        assert!(
            payload.len() * 4 < b.payload_len() * 3,
            "{} of {}",
            payload.len(),
            b.payload_len()
        );
        let Frame::Message(Message::Pages(got)) = decode(&payload).unwrap() else {
            panic!("not Pages")
        };
        assert_eq!(got, b);
        assert!(matches!(got.iter().next(), Some(Ok(PageItem::Full { page: 0, .. }))));
        let s = c.stats();
        assert_eq!((s.batches, s.raw_bytes), (1, b.payload_len() as u64));
        assert_eq!(s.compressed_bytes, payload.len() as u64);
    }

    #[test]
    fn a_frame_that_lies_about_its_size_is_refused_before_it_costs_memory() {
        let b = batch(4);
        let mut c = PageCompressor::new(CompressionMode::Always).unwrap();
        let mut payload = c.compress(&b, None).unwrap().to_vec();
        // More than a Pages frame may hold: refused from the length field.
        payload[..4].copy_from_slice(&(PAGE_BATCH_MAX_PAYLOAD as u32 + 1).to_le_bytes());
        let err = decode(&payload).unwrap_err().to_string();
        assert!(err.contains("more than a Pages frame"), "{err}");
        // Less than the content: the decompressor stops at the announced size.
        payload[..4].copy_from_slice(&(b.payload_len() as u32 - 1).to_le_bytes());
        assert!(decode(&payload).is_err());
        // More than the content: the sizes differ.
        payload[..4].copy_from_slice(&(b.payload_len() as u32 + 1).to_le_bytes());
        let err = decode(&payload).unwrap_err().to_string();
        assert!(err.contains("not the"), "{err}");
        // Garbage, and too short.
        assert!(decode(&[1, 0, 0, 0, 0xde, 0xad]).is_err());
        assert!(decode(&[1, 0]).is_err());
    }

    #[test]
    fn random_pages_are_sent_as_they_are() {
        let mut b = PageBatch::new();
        let mut x = 1u64;
        for p in 0..16 {
            let page: [u8; PAGE_SIZE] = std::array::from_fn(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            });
            b.push_full(p, &[0; 16], &page);
        }
        let mut c = PageCompressor::new(CompressionMode::Always).unwrap();
        assert!(c.compress(&b, None).is_none());
        assert_eq!(c.stats().batches, 0);
        assert_eq!(c.stats().probes_unused, 1);
    }

    #[test]
    fn adaptive_compresses_for_a_slow_link_and_not_for_a_fast_one() {
        // The rule itself: 1 Gbit/s (125 MB/s) with zstd at 400 MB/s and ratio 2.5: compress; a
        // 10 GB/s loopback: do not; incompressible content: never.
        assert!(PageCompressor::worth_it(125e6, 400e6, 2.5));
        assert!(!PageCompressor::worth_it(10e9, 400e6, 2.5));
        assert!(!PageCompressor::worth_it(1e6, 400e6, 1.01));
        let b = batch(64);
        let mut slow = PageCompressor::new(CompressionMode::Adaptive).unwrap();
        let mut fast = PageCompressor::new(CompressionMode::Adaptive).unwrap();
        let (mut slow_n, mut fast_n) = (0, 0);
        for _ in 0..40 {
            slow_n += slow.compress(&b, Some(1e6)).is_some() as u32;
            fast_n += fast.compress(&b, Some(1e12)).is_some() as u32;
        }
        assert_eq!(slow_n, 40, "a 1 MB/s link: every batch compressed");
        assert_eq!(fast_n, 0, "a link faster than any compressor: none sent compressed");
        // It measured now and then all the same (the first batch, then one in PROBE_EVERY).
        assert_eq!(fast.stats().probes_unused, 1 + 39 / PROBE_EVERY as u64);
        assert_eq!(
            PageCompressor::new(CompressionMode::Off)
                .unwrap()
                .compress(&b, Some(1.0)),
            None
        );
    }
}
