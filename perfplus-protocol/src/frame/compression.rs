//! Compressed payloads: `PagesZstd` (a [`PageBatch`]'s payload) and `QemuStreamZstd` (a chunk of a
//! relayed QEMU stream) compressed with zstd, and the one rule that says when compressing what a
//! connection sends makes it faster, for both.
//!
//! Layout of both: `u32 raw_len` (the length of the payload of the uncompressed frame, `Pages` or
//! `QemuStream`), then one zstd frame that decompresses to exactly `raw_len` bytes. `raw_len` is
//! checked against the uncompressed frame's limit before anything is decompressed, and the
//! decompressor writes into a buffer of that size and no more: a compressed frame cannot make a reader
//! allocate more than the uncompressed frame could.
//!
//! A reader turns a `PagesZstd` frame into the same [`Message::Pages`](crate::Message::Pages) a
//! `Pages` frame gives, and a `QemuStreamZstd` frame into the same
//! [`Message::QemuStream`](crate::Message::QemuStream), so nothing above the connection knows whether
//! a payload was compressed.

use std::time::{Duration, Instant};

use super::codec::malformed;
use super::header::{FrameError, FrameType};
use super::page_batch::PageBatch;

/// zstd's level 1: its fastest standard level (about 400-600 MB/s of page content on one core of
/// this machine), which still entropy-codes (lz4 does not, and text-like pages shrink mostly by that).
const LEVEL: i32 = 1;

/// Bytes before the zstd frame.
const RAW_LEN_BYTES: usize = 4;

/// The frame a compressed frame stands for, whose limit bounds what it decompresses to.
fn uncompressed(frame: FrameType) -> FrameType {
    match frame {
        FrameType::PagesZstd => FrameType::Pages,
        FrameType::QemuStreamZstd => FrameType::QemuStream,
        other => unreachable!("{other} is not a compressed frame"),
    }
}

/// The payload a compressed payload of frame type `frame` (`PagesZstd`, `QemuStreamZstd`) carries:
/// at most the uncompressed frame's limit, checked from the length field before anything is
/// decompressed, and exactly as long as announced.
pub fn decompress(frame: FrameType, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let raw_frame = uncompressed(frame);
    let max = raw_frame.limit().max();
    let (len, data) = payload
        .split_first_chunk::<RAW_LEN_BYTES>()
        .ok_or_else(|| malformed(frame, "shorter than its length field"))?;
    let raw_len = u32::from_le_bytes(*len) as usize;
    if raw_len > max {
        return Err(malformed(
            frame,
            format!("announces {raw_len} bytes, more than a {raw_frame} frame's {max}"),
        ));
    }
    // The decompressor gets a buffer of `raw_len` bytes and fails rather than write past it.
    let raw = zstd::bulk::decompress(data, raw_len).map_err(|e| malformed(frame, format!("zstd: {e}")))?;
    if raw.len() != raw_len {
        return Err(malformed(
            frame,
            format!("decompressed to {} bytes, not the {raw_len} announced", raw.len()),
        ));
    }
    Ok(raw)
}

/// Decodes a `PagesZstd` payload into the batch it carries.
pub fn decompress_batch(payload: &[u8]) -> Result<PageBatch, FrameError> {
    PageBatch::from_payload(decompress(FrameType::PagesZstd, payload)?)
}

/// What compression did on one connection, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompressionStats {
    /// Payloads sent compressed (page batches, or chunks of a QEMU stream).
    pub batches: u64,
    /// Their uncompressed payload bytes, and what went on the wire for them instead.
    pub raw_bytes: u64,
    pub compressed_bytes: u64,
    /// Batches compressed to measure and then sent as they were (they did not shrink enough).
    pub probes_unused: u64,
    /// Time spent compressing.
    pub cpu: Duration,
}

/// When to compress the payloads (page batches, QEMU stream chunks) a connection sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionMode {
    /// Never (the default of a connection).
    Off,
    /// Every payload that shrinks.
    Always,
    /// When it makes sending faster: see [`Compressor::worth_it`].
    Adaptive,
}

/// The link's rate as the rule needs it (what the link carries while the sender keeps it busy), from
/// the kernel's delivery-rate samples of a TCP connection (TCP_INFO).
///
/// A sample taken while the sender was application-limited (nothing queued behind it) tells how fast
/// a burst crossed, not what the link sustains: behind a token-bucket shaper a burst within the
/// bucket crosses at the interface's speed (1 GB/s measured on the tests' 1 Gbit/s link, where the
/// busy samples were 55-170 MB/s). So such samples count only until a busy one is seen (on an idle
/// or fast link they are all there is, and high, as they should be), and the busy ones are averaged,
/// not maximised: they scatter.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkRate {
    /// Moving average of the samples taken while the sender kept the link busy.
    busy: Option<f64>,
    /// The highest sample taken while it did not.
    idle_max: Option<f64>,
}

impl LinkRate {
    /// One delivery-rate sample, bytes/s, and whether the sender was application-limited then.
    pub fn observe(&mut self, rate: f64, app_limited: bool) {
        if rate.is_nan() || rate <= 0.0 {
            return;
        }
        if app_limited {
            self.idle_max = Some(self.idle_max.map_or(rate, |r| r.max(rate)));
        } else {
            self.busy = Some(self.busy.map_or(rate, |r| r + ALPHA * (rate - r)));
        }
    }

    /// The link's rate in bytes/s, if any sample came.
    pub fn estimate(&self) -> Option<f64> {
        self.busy.or(self.idle_max)
    }
}

/// Compresses the payloads one connection sends and keeps what it measured. It sees bytes only: the
/// connection gives it a `Pages` payload or a `QemuStream` chunk and frames what comes back as
/// `PagesZstd` or `QemuStreamZstd`.
pub struct Compressor {
    mode: CompressionMode,
    compressor: zstd::bulk::Compressor<'static>,
    /// The last compressed payload (reused).
    out: Vec<u8>,
    stats: CompressionStats,
    /// Moving estimates from compressed batches: raw bytes per second of compressing, and raw/wire.
    speed: Option<f64>,
    ratio: Option<f64>,
    /// Payloads since the last one compressed (adaptive mode compresses one now and then to keep its
    /// estimates current).
    since_probe: u32,
}

/// In adaptive mode, one payload in this many is compressed while compression is off, to measure.
const PROBE_EVERY: u32 = 16;
/// Below this ratio a payload is sent as it was: the receiver's work is not worth a few bytes.
const MIN_RATIO: f64 = 1.05;
/// Weight of the newest sample in the moving estimates.
const ALPHA: f64 = 0.25;

impl Compressor {
    pub fn new(mode: CompressionMode) -> std::io::Result<Compressor> {
        Ok(Compressor {
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
    /// loopback (GB/s) zstd is slower than the link and does not either. The one rule for page batches
    /// and relayed QEMU streams alike.
    pub fn worth_it(link_rate: f64, speed: f64, ratio: f64) -> bool {
        ratio >= MIN_RATIO && link_rate < speed * (1.0 - 1.0 / ratio)
    }

    /// The compressed payload (`u32` length of `raw`, then the zstd frame) if `raw` is to be sent
    /// compressed, else None. `link_rate` is the link's delivery rate in bytes/s if known. An empty
    /// payload is never compressed.
    pub fn compress(&mut self, raw: &[u8], link_rate: Option<f64>) -> Option<&[u8]> {
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
    use crate::frame::{
        decode_frame, decode_payload, Frame, FrameHeader, PageItem, HEADER_LEN, PAGE_BATCH_MAX_PAYLOAD,
    };
    use crate::message::QEMU_STREAM_CHUNK_MAX;
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
        decode_as(FrameType::PagesZstd, payload)
    }

    /// A frame of type `frame` around `payload`, decoded the connection's way (owned payload); the
    /// slice decoder must agree.
    fn decode_as(frame: FrameType, payload: &[u8]) -> Result<Frame, FrameError> {
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes[..2].copy_from_slice(&(frame as u16).to_le_bytes());
        bytes[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        let header = FrameHeader::parse(bytes[..HEADER_LEN].try_into().unwrap())?;
        let owned = decode_payload(header, payload.to_vec());
        let sliced = decode_frame(&bytes).map(|f| f.expect("a whole frame").0);
        assert_eq!(owned, sliced);
        owned
    }

    /// A chunk of a relayed QEMU stream as the relay writes it: RAM records (an 8-byte address with
    /// flags, then a page of text-like content).
    fn stream_chunk(pages: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for p in 0..pages {
            out.extend_from_slice(&((p << 12) | 0x08).to_be_bytes());
            out.extend_from_slice(&text_page(p));
        }
        out
    }

    #[test]
    fn a_compressed_qemu_stream_chunk_decodes_to_the_same_chunk() {
        let chunk = stream_chunk(64);
        let mut c = Compressor::new(CompressionMode::Always).unwrap();
        let payload = c.compress(&chunk, None).expect("text pages compress").to_vec();
        assert!(
            payload.len() * 4 < chunk.len() * 3,
            "{} of {}",
            payload.len(),
            chunk.len()
        );
        assert_eq!(
            decode_as(FrameType::QemuStreamZstd, &payload).unwrap(),
            Frame::Message(Message::QemuStream(chunk.clone()))
        );
        let s = c.stats();
        assert_eq!((s.batches, s.raw_bytes), (1, chunk.len() as u64));
        assert_eq!(s.compressed_bytes, payload.len() as u64);
        // The largest chunk a QemuStream frame may carry comes back too; the end of a direction (an
        // empty chunk) is never compressed.
        let mut big = stream_chunk(QEMU_STREAM_CHUNK_MAX as u64 / 4104 + 1);
        big.truncate(QEMU_STREAM_CHUNK_MAX);
        let payload = c.compress(&big, None).unwrap().to_vec();
        assert_eq!(
            decode_as(FrameType::QemuStreamZstd, &payload).unwrap(),
            Frame::Message(Message::QemuStream(big))
        );
        assert_eq!(c.compress(&[], None), None);
    }

    #[test]
    fn a_qemu_stream_chunk_that_lies_about_its_size_is_refused_before_it_costs_memory() {
        let chunk = stream_chunk(4);
        let mut c = Compressor::new(CompressionMode::Always).unwrap();
        let mut payload = c.compress(&chunk, None).unwrap().to_vec();
        // More than a QemuStream frame may hold: refused from the length field alone, whatever
        // follows it (here nothing: there is nothing to decompress, so it was not tried).
        let lie = (QEMU_STREAM_CHUNK_MAX as u32 + 1).to_le_bytes();
        let err = decode_as(FrameType::QemuStreamZstd, &lie).unwrap_err().to_string();
        assert_eq!(
            err,
            "payload of frame QemuStreamZstd malformed: announces 1048577 bytes, more than a QemuStream \
             frame's 1048576"
        );
        let whole = [&lie[..], &payload[4..]].concat();
        assert_eq!(
            decode_as(FrameType::QemuStreamZstd, &whole).unwrap_err().to_string(),
            err
        );
        let err = decode_as(FrameType::QemuStreamZstd, &u32::MAX.to_le_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("announces 4294967295 bytes"), "{err}");
        // Less than the content: the decompressor stops at the announced size.
        payload[..4].copy_from_slice(&(chunk.len() as u32 - 1).to_le_bytes());
        assert!(decode_as(FrameType::QemuStreamZstd, &payload).is_err());
        // More than the content: the sizes differ.
        payload[..4].copy_from_slice(&(chunk.len() as u32 + 1).to_le_bytes());
        let err = decode_as(FrameType::QemuStreamZstd, &payload).unwrap_err().to_string();
        assert!(err.contains("not the"), "{err}");
        // Garbage, too short, and a payload over the frame's limit (refused from the header).
        assert!(decode_as(FrameType::QemuStreamZstd, &[1, 0, 0, 0, 0xde, 0xad]).is_err());
        assert!(decode_as(FrameType::QemuStreamZstd, &[1, 0]).is_err());
        assert!(matches!(
            FrameType::QemuStreamZstd.check_len(QEMU_STREAM_CHUNK_MAX + 5),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_zip_bomb_expands_no_further_than_its_frame_allows() {
        // 256 MiB of zeros in a few KiB of zstd: a payload well within the frame's limit.
        use std::io::Read;
        let bomb = zstd::stream::encode_all(std::io::repeat(0).take(256 << 20), LEVEL).unwrap();
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        for (frame, max) in [
            (FrameType::QemuStreamZstd, QEMU_STREAM_CHUNK_MAX),
            (FrameType::PagesZstd, PAGE_BATCH_MAX_PAYLOAD),
        ] {
            // Announcing the most the frame may carry: the decompressor fills that buffer and fails
            // rather than write past it (the zstd frame says 256 MiB; nothing that large exists).
            let payload = [&(max as u32).to_le_bytes()[..], &bomb].concat();
            let err = decode_as(frame, &payload).unwrap_err().to_string();
            assert!(err.contains("zstd:"), "{frame}: {err}");
            // Announcing the truth is a lie too large for the frame, refused before decompressing.
            let payload = [&(256u32 << 20).to_le_bytes()[..], &bomb].concat();
            let err = decode_as(frame, &payload).unwrap_err().to_string();
            assert!(err.contains("announces 268435456 bytes, more than a"), "{frame}: {err}");
        }
    }

    #[test]
    fn a_compressed_batch_decodes_to_the_same_batch() {
        let b = batch(64);
        let mut c = Compressor::new(CompressionMode::Always).unwrap();
        let payload = c.compress(b.as_bytes(), None).expect("text pages compress").to_vec();
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
        let mut c = Compressor::new(CompressionMode::Always).unwrap();
        let mut payload = c.compress(b.as_bytes(), None).unwrap().to_vec();
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
        let mut c = Compressor::new(CompressionMode::Always).unwrap();
        assert!(c.compress(b.as_bytes(), None).is_none());
        assert_eq!(c.stats().batches, 0);
        assert_eq!(c.stats().probes_unused, 1);
    }

    #[test]
    fn the_link_rate_is_what_the_link_sustains_not_what_a_burst_did() {
        let mut link = LinkRate::default();
        assert_eq!(link.estimate(), None);
        // Idle samples alone: the highest (loopback, or a link the sender never fills).
        link.observe(69e6, true);
        link.observe(1002e6, true);
        assert_eq!(link.estimate(), Some(1002e6));
        // Then busy ones (samples of the tests' 1 Gbit/s link): their average, whatever bursts did.
        for rate in [
            130e6, 103e6, 98e6, 117e6, 24e6, 118e6, 99e6, 170e6, 114e6, 55e6, 138e6, 100e6,
        ] {
            link.observe(rate, false);
            link.observe(1002e6, true);
        }
        let rate = link.estimate().unwrap();
        assert!((80e6..150e6).contains(&rate), "{rate}");
        // Text-like content (ratio 1.78) at zstd's 400 MB/s pays there; a burst's rate would say not.
        assert!(Compressor::worth_it(rate, 400e6, 1.78));
        assert!(!Compressor::worth_it(1002e6, 400e6, 1.78));
        link.observe(0.0, false);
        assert_eq!(link.estimate(), Some(rate));
    }

    #[test]
    fn adaptive_compresses_for_a_slow_link_and_not_for_a_fast_one() {
        // The rule itself: 1 Gbit/s (125 MB/s) with zstd at 400 MB/s and ratio 2.5: compress; a
        // 10 GB/s loopback: do not; incompressible content: never.
        assert!(Compressor::worth_it(125e6, 400e6, 2.5));
        assert!(!Compressor::worth_it(10e9, 400e6, 2.5));
        assert!(!Compressor::worth_it(1e6, 400e6, 1.01));
        let b = batch(64);
        let mut slow = Compressor::new(CompressionMode::Adaptive).unwrap();
        let mut fast = Compressor::new(CompressionMode::Adaptive).unwrap();
        let (mut slow_n, mut fast_n) = (0, 0);
        for _ in 0..40 {
            slow_n += slow.compress(b.as_bytes(), Some(1e6)).is_some() as u32;
            fast_n += fast.compress(b.as_bytes(), Some(1e12)).is_some() as u32;
        }
        assert_eq!(slow_n, 40, "a 1 MB/s link: every batch compressed");
        assert_eq!(fast_n, 0, "a link faster than any compressor: none sent compressed");
        // It measured now and then all the same (the first batch, then one in PROBE_EVERY).
        assert_eq!(fast.stats().probes_unused, 1 + 39 / PROBE_EVERY as u64);
        assert_eq!(
            Compressor::new(CompressionMode::Off)
                .unwrap()
                .compress(b.as_bytes(), Some(1.0)),
            None
        );
    }
}
