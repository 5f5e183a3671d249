//! What splitting a page batch by the incompressibility estimate does to the bytes of the
//! benchmark's content mix, without a VM: `cargo run --release -p perfplus-protocol --example zsplit`.
//!
//! Builds the first round of a guest written with the benchmark's mix (`unique:30,text:20,dup:20,
//! zero:10,same:20`, the built-in guest's rules from guest/src/content.rs: `unique` and `same` pages
//! are random streams, `dup` pages one of 16 random contents, `text` pages English words,
//! `perfplus_common::text`) as the sender would: a `dup` content sent in full once, then as references, zero pages as
//! zero markers; 1024 items a batch. Then prints, for all batches together, the payload bytes raw,
//! compressed whole (what `--compression zstd` sends, and `auto` only if it pays), and split (the pages
//! that look incompressible raw, the rest compressed), with zstd's CPU time for each, what the
//! adaptive rule decides on a 1 Gbit/s link, and the cost of the estimate per page.
//!
//! Arguments: `[pages]` (default 16384, 64 MiB of guest memory).

use std::collections::HashSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use perfplus_common::splitmix::{mix64, next};
use perfplus_common::PAGE_SIZE;
use perfplus_protocol::frame::{
    looks_incompressible, CompressionMode, Compressor, PageBatch, SendPlan, HEADER_LEN, PAGE_BATCH_MAX_ITEMS,
};

/// A random page, as the guest writes them: the splitmix64 stream keyed `key`.
fn stream(key: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    let mut x = key;
    for word in page.chunks_exact_mut(8) {
        word.copy_from_slice(&next(&mut x).to_le_bytes());
    }
    page
}

/// A text page, as the guest writes them (`perfplus_common::text`).
fn text(key: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    perfplus_common::text::text_page(key, &mut page);
    page
}

/// A digest for the example: the content's kind and key (the real one is a keyed hash).
fn digest(kind: u8, key: u64) -> [u8; 16] {
    let mut d = [kind; 16];
    d[..8].copy_from_slice(&key.to_le_bytes());
    d
}

/// The first round's batches of `pages` pages of the benchmark's mix.
fn round(pages: u64) -> Vec<PageBatch> {
    // Percentages of unique, dup, zero, same; text is the rest (the guest's order).
    let thresholds = [30, 50, 60, 80];
    let seed = 1u64;
    let (kind_salt, unique_salt) = (mix64(seed ^ 0x4b49_4e44), mix64(seed ^ 0x554e_4951));
    let (dup_salt, same_salt) = (mix64(seed ^ 0x4455_5000), mix64(seed ^ 0x5341_4d45));
    let mut sent_dups = HashSet::new();
    let mut batches = Vec::new();
    let mut batch = PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS);
    for page in 0..pages {
        let h = mix64(page ^ kind_salt) % 100;
        if h < thresholds[0] {
            let key = mix64(mix64(unique_salt ^ page));
            batch.push_full(page, &digest(1, key), &stream(key));
        } else if h < thresholds[1] {
            let slot = mix64(dup_salt ^ page) % 16;
            let key = mix64(dup_salt.wrapping_add(slot));
            if sent_dups.insert(slot) {
                batch.push_full(page, &digest(1, key), &stream(key));
            } else {
                batch.push_ref(page, &digest(1, key));
            }
        } else if h < thresholds[2] {
            batch.push_zero(page);
        } else if h < thresholds[3] {
            let key = mix64(same_salt ^ page);
            batch.push_full(page, &digest(1, key), &stream(key));
        } else {
            let key = mix64(mix64(unique_salt ^ page ^ 0x5445_5854));
            batch.push_full(page, &digest(2, key), &text(key));
        }
        if batch.is_full() {
            batches.push(std::mem::replace(
                &mut batch,
                PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS),
            ));
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn main() {
    let pages: u64 = std::env::args()
        .nth(1)
        .map_or(16384, |a| a.parse().expect("a page count"));
    let batches = round(pages);
    let items: usize = batches.iter().map(PageBatch::len).sum();
    let raw: u64 = batches.iter().map(|b| (HEADER_LEN + b.payload_len()) as u64).sum();
    let full_pages: Vec<[u8; PAGE_SIZE]> = batches
        .iter()
        .flat_map(|b| b.iter())
        .filter_map(|i| match i.unwrap() {
            perfplus_protocol::frame::PageItem::Full { data, .. } => Some(*data),
            _ => None,
        })
        .collect();
    let random = full_pages.iter().filter(|p| looks_incompressible(p)).count();
    println!(
        "{pages} pages of the mix unique:30,text:20,dup:20,zero:10,same:20: {} batches, {items} items, {} full \
         pages ({random} look incompressible, {:.0} %)",
        batches.len(),
        full_pages.len(),
        100.0 * random as f64 / full_pages.len() as f64
    );

    // Whole: every batch compressed by zstd level 1, as `--compression zstd` does (it then sends the
    // batch raw if it shrank by less than 1.05; `auto` also if it does not pay on the link).
    let mut whole = zstd::bulk::Compressor::new(1).expect("zstd");
    let (mut whole_wire, mut whole_payload, mut whole_cpu) = (0u64, 0u64, Duration::ZERO);
    for b in &batches {
        let started = Instant::now();
        let compressed = whole.compress(b.as_bytes()).expect("zstd");
        whole_cpu += started.elapsed();
        whole_payload += b.payload_len() as u64;
        whole_wire += (HEADER_LEN + 4 + compressed.len()) as u64;
    }
    // Split: adaptive on a link slow enough that compressing always pays (1 MB/s): every batch
    // estimated and split.
    let mut split = Compressor::new(CompressionMode::Adaptive).expect("zstd");
    let (mut split_wire, mut frames, mut raw_part) = (0u64, 0usize, 0u64);
    let started = Instant::now();
    for b in &batches {
        match split.plan_pages(b, Some(1e6)) {
            SendPlan::AsIs => {
                split_wire += (HEADER_LEN + b.payload_len()) as u64;
                frames += 1;
            }
            SendPlan::Compressed(p) => {
                split_wire += (HEADER_LEN + p.len()) as u64;
                frames += 1;
            }
            SendPlan::Split {
                first,
                rest,
                rest_compressed,
            } => {
                raw_part += first.payload_len() as u64;
                split_wire += (2 * HEADER_LEN + first.payload_len()) as u64
                    + rest_compressed.map_or(rest.payload_len(), <[u8]>::len) as u64;
                frames += 2;
            }
        }
    }
    let split_total = started.elapsed();
    let ss = split.stats();
    let speed = whole_payload as f64 / whole_cpu.as_secs_f64();
    println!("bytes of frames (headers included):");
    println!("  raw            {:8.2} MB", mb(raw));
    println!(
        "  whole batches  {:8.2} MB  ({:.3}x; zstd {:.1} ms of CPU, {:.0} MB/s)",
        mb(whole_wire),
        raw as f64 / whole_wire as f64,
        whole_cpu.as_secs_f64() * 1e3,
        speed / 1e6
    );
    println!(
        "  split          {:8.2} MB  ({:.3}x, {frames} frames; {:.2} MB sent raw by the estimate, {:.2} MB \
         compressed to {:.2} MB ({:.2}x); zstd {:.1} ms of CPU, estimate + split + zstd {:.1} ms)",
        mb(split_wire),
        raw as f64 / split_wire as f64,
        mb(raw_part),
        mb(ss.raw_bytes),
        mb(ss.compressed_bytes),
        ss.raw_bytes as f64 / ss.compressed_bytes as f64,
        ss.cpu.as_secs_f64() * 1e3,
        split_total.as_secs_f64() * 1e3
    );
    // The adaptive rule on a 1 Gbit/s link (125 MB/s) with zstd at the speed measured here.
    let link = 125e6;
    let whole_ratio = raw as f64 / whole_wire as f64;
    let rest_ratio = ss.raw_bytes as f64 / ss.compressed_bytes as f64;
    let yes = |worth: bool| if worth { "yes" } else { "no" };
    println!(
        "on 1 Gbit/s with zstd at {:.0} MB/s, `auto` compresses: whole batches {} (ratio {whole_ratio:.3}), the \
         split rest {} (ratio {rest_ratio:.2})",
        speed / 1e6,
        yes(whole_ratio >= 1.05 && Compressor::worth_it(link, speed, whole_ratio)),
        yes(Compressor::worth_it(link, speed, rest_ratio)),
    );

    // The estimate alone, per page: over a batch's worth of pages (4 MiB, in the cache as a batch just
    // built is) and over all of them (from memory).
    let per_page = |pages: &[[u8; PAGE_SIZE]], reps: usize| {
        let started = Instant::now();
        let mut n = 0usize;
        for _ in 0..reps {
            for p in pages {
                n += looks_incompressible(black_box(p)) as usize;
            }
        }
        black_box(n);
        started.elapsed().as_nanos() as f64 / (reps * pages.len()) as f64
    };
    let batch_pages = &full_pages[..full_pages.len().min(PAGE_BATCH_MAX_ITEMS)];
    let cached = per_page(batch_pages, 200);
    let uncached = per_page(&full_pages, 20);
    let zstd_per_page = whole_cpu.as_nanos() as f64 / (whole_payload as f64 / PAGE_SIZE as f64);
    println!(
        "estimate: {cached:.0} ns a page in the cache, {uncached:.0} ns from memory; zstd level 1: \
         {zstd_per_page:.0} ns a page"
    );
}
