//! The relay's decisions on a synthetic stream, without I/O: source filter, then destination
//! expander, then what a QEMU would load from the result.

use std::collections::HashMap;

use super::*;
use crate::digest::HmacMd5;
use crate::stream::{self, Dialect, Item, Parser, RamBlock, RamBody, RamRecord, PAGE_SIZE};

fn page(fill: u8) -> RamBody {
    RamBody::Page(Box::new([fill; PAGE_SIZE]))
}

fn record(block: usize, name: Option<&str>, page_index: u64, body: RamBody) -> Item {
    Item::Ram(RamRecord {
        offset: page_index * PAGE_SIZE as u64,
        block_name: name.map(String::from),
        block,
        body,
    })
}

/// Two blocks, "a" (4 pages) and "b" (2 pages); round 1 sends everything, round 2 re-sends some
/// pages unchanged, the stop-and-copy changes one.
fn qemu_stream() -> Vec<u8> {
    let items = vec![
        Item::Header { version: 3 },
        Item::Configuration {
            machine: "pc-q35-7.2".into(),
        },
        Item::SectionStart {
            id: 2,
            name: "ram".into(),
            instance: 0,
            version: 4,
        },
        Item::RamMemSize { total: 6 * 4096 },
        Item::RamBlock(RamBlock {
            name: "a".into(),
            length: 4 * 4096,
        }),
        Item::RamBlock(RamBlock {
            name: "b".into(),
            length: 2 * 4096,
        }),
        Item::RamEos,
        Item::Footer { id: 2 },
        Item::SectionPart { id: 2 },
        record(0, Some("a"), 0, page(1)),
        record(0, None, 1, page(2)),
        record(0, None, 2, page(1)), // same content as a/0: a reference
        record(0, None, 3, RamBody::Zero(0)),
        record(1, Some("b"), 0, page(2)), // a reference again
        record(1, None, 1, page(3)),
        Item::RamEos,
        Item::Footer { id: 2 },
        Item::SectionPart { id: 2 },
        record(0, Some("a"), 0, page(1)), // unchanged: dropped, and it carried the block's name
        record(0, None, 1, page(4)),      // must now carry "a" itself
        record(0, None, 3, RamBody::Zero(0)), // unchanged zero: dropped
        Item::RamEos,
        Item::Footer { id: 2 },
        Item::SectionEnd { id: 2 },
        record(1, Some("b"), 1, page(3)), // unchanged
        record(1, None, 0, page(4)),      // a reference to a/1's new content
        Item::RamEos,
        Item::Footer { id: 2 },
        Item::Tail(vec![4, 0, 0, 0, 9, 0]),
    ];
    let mut out = Vec::new();
    for item in &items {
        stream::write(item, &mut out);
    }
    out
}

fn run_through<S: FnMut(Item, &mut Vec<u8>) -> Result<(), RelayError>>(
    bytes: &[u8],
    dialect: Dialect,
    mut step: S,
) -> Vec<u8> {
    let mut parser = Parser::new(dialect);
    parser.feed(bytes);
    let mut out = Vec::new();
    while let Some(item) = parser.next_item().unwrap() {
        step(item, &mut out).unwrap();
    }
    parser.finish().unwrap();
    out
}

/// What a QEMU loading `bytes` ends up with: the content of every page written, by (block, offset).
fn loaded(bytes: &[u8]) -> HashMap<(usize, u64), [u8; PAGE_SIZE]> {
    let mut memory = HashMap::new();
    run_through(bytes, Dialect::Qemu, |item, _| {
        if let Item::Ram(r) = item {
            let content = match r.body {
                RamBody::Page(p) => *p,
                RamBody::Zero(fill) => [fill; PAGE_SIZE],
                RamBody::Ref(_) => unreachable!(),
            };
            memory.insert((r.block, r.offset), content);
        }
        Ok(())
    });
    memory
}

#[test]
fn unchanged_pages_are_dropped_held_ones_referenced_and_qemu_loads_the_same_memory() {
    let digester = HmacMd5::new(b"test key");
    let original = qemu_stream();
    let mut filter = source::Filter::new(&digester, RelayConfig::default());
    let link = run_through(&original, Dialect::Qemu, |item, out| filter.step(item, out));
    let mut expander = destination::Expander::new(&digester, RelayConfig::default());
    let rebuilt = run_through(&link, Dialect::Relay, |item, out| expander.step(item, out));

    assert_eq!(
        loaded(&rebuilt),
        loaded(&original),
        "the destination QEMU loads the same memory"
    );
    let counts = |c: &PageCounts| (c.full, c.referenced, c.unchanged, c.zero, c.zero_unchanged);
    let stats = filter.stats();
    assert_eq!(stats.sections, 4);
    assert_eq!(
        counts(&stats.precopy),
        (4, 2, 1, 1, 1),
        "pre-copy: full, referenced, unchanged, zero, zero unchanged"
    );
    assert_eq!(counts(&stats.stop_and_copy), (0, 1, 1, 0, 0), "stop-and-copy");
    assert_eq!(expander.stats().total().referenced, 3);
    assert!(
        link.len() < original.len() - 4 * PAGE_SIZE,
        "five pages fewer on the link"
    );
    // Fed one byte at a time, the destination writes the same stream.
    let mut expander = destination::Expander::new(&digester, RelayConfig::default());
    let mut parser = Parser::new(Dialect::Relay);
    let mut bytewise = Vec::new();
    for byte in &link {
        parser.feed(std::slice::from_ref(byte));
        while let Some(item) = parser.next_item().unwrap() {
            expander.step(item, &mut bytewise).unwrap();
        }
    }
    assert_eq!(bytewise, rebuilt);
}

#[test]
fn a_reference_the_destination_does_not_hold_fails_and_is_never_written() {
    let digester = HmacMd5::new(b"test key");
    let original = qemu_stream();
    // The source believes the destination holds pages; the destination holds none.
    let mut filter = source::Filter::new(&digester, RelayConfig::default());
    let link = run_through(&original, Dialect::Qemu, |item, out| filter.step(item, out));
    let mut expander = destination::Expander::new(&digester, RelayConfig { held_pages: 0 });
    let mut parser = Parser::new(Dialect::Relay);
    parser.feed(&link);
    let mut out = Vec::new();
    let error = loop {
        let item = parser.next_item().unwrap().expect("a reference before the end");
        if let Err(e) = expander.step(item, &mut out) {
            break e;
        }
    };
    assert!(matches!(error, RelayError::MissingReference(_)), "{error}");
}

#[test]
fn with_nothing_held_every_changed_page_travels_whole() {
    let digester = HmacMd5::new(b"test key");
    let config = RelayConfig { held_pages: 0 };
    let mut filter = source::Filter::new(&digester, config);
    let link = run_through(&qemu_stream(), Dialect::Qemu, |item, out| filter.step(item, out));
    let mut expander = destination::Expander::new(&digester, config);
    let rebuilt = run_through(&link, Dialect::Relay, |item, out| expander.step(item, out));
    assert_eq!(filter.stats().total().referenced, 0);
    assert_eq!(filter.stats().total().full, 7);
    assert_eq!(loaded(&rebuilt), loaded(&qemu_stream()));
}

/// The destination host's pages, by digest; `lie` hands out another content for every digest.
struct FakeHost {
    pages: HashMap<crate::stream::Digest, [u8; PAGE_SIZE]>,
    lie: bool,
    fetched: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl HostPages for FakeHost {
    fn fetch(&mut self, digest: &crate::stream::Digest, out: &mut [u8; PAGE_SIZE]) -> bool {
        self.fetched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.pages.get(digest) {
            Some(page) if self.lie => {
                *out = *page;
                out[0] ^= 1;
                true
            }
            Some(page) => {
                *out = *page;
                true
            }
            None => false,
        }
    }
}

fn host_with(digester: &HmacMd5, fills: &[u8], lie: bool) -> FakeHost {
    use crate::digest::PageDigester;
    FakeHost {
        pages: fills
            .iter()
            .map(|&f| (digester.digest(&[f; PAGE_SIZE]), [f; PAGE_SIZE]))
            .collect(),
        lie,
        fetched: Default::default(),
    }
}

fn prefixes(digester: &HmacMd5, fills: &[u8]) -> std::collections::HashSet<u64> {
    use crate::digest::PageDigester;
    fills
        .iter()
        .map(|&f| digest_prefix(&digester.digest(&[f; PAGE_SIZE])))
        .collect()
}

/// Pages handed to a tee, in order.
#[derive(Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<(crate::stream::Digest, u8)>>>);

impl PageTee for Collect {
    fn page(&mut self, digest: crate::stream::Digest, page: Box<[u8; PAGE_SIZE]>) {
        self.0.lock().unwrap().push((digest, page[0]));
    }
}

#[test]
fn pages_the_destination_host_holds_travel_as_references_and_are_expanded_from_it() {
    let digester = HmacMd5::new(b"test key");
    let original = qemu_stream();
    // The host holds contents 2 and 3 (a page store of a VM that left); 4 is new.
    let mut filter =
        source::Filter::new(&digester, RelayConfig::default()).with_host_held(prefixes(&digester, &[2, 3]));
    let link = run_through(&original, Dialect::Qemu, |item, out| filter.step(item, out));
    let host = host_with(&digester, &[2, 3], false);
    let fetched = host.fetched.clone();
    let mut expander = destination::Expander::new(&digester, RelayConfig::default()).with_host(Box::new(host));
    let rebuilt = run_through(&link, Dialect::Relay, |item, out| expander.step(item, out));
    assert_eq!(loaded(&rebuilt), loaded(&original));

    let counts = |c: &PageCounts| (c.full, c.referenced, c.host_referenced);
    // a/0 = 1 whole, a/1 = 2 from the host, a/2 = 1 of this migration, b/0 = 2 of this migration now
    // (the expander kept what the host gave), b/1 = 3 from the host; then a/1 = 4 whole; then b/0 = 4
    // of this migration.
    assert_eq!(
        counts(&filter.stats().precopy),
        (2, 2, 2),
        "pre-copy: full, this migration, host"
    );
    assert_eq!(counts(&filter.stats().stop_and_copy), (0, 1, 0), "stop-and-copy");
    assert_eq!(
        counts(&expander.stats().precopy),
        counts(&filter.stats().precopy),
        "both sides count alike"
    );
    assert_eq!(
        counts(&expander.stats().stop_and_copy),
        counts(&filter.stats().stop_and_copy)
    );
    assert_eq!(
        fetched.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "the host is asked once per content"
    );
}

#[test]
fn without_an_advertisement_nothing_is_sent_as_a_host_reference() {
    let digester = HmacMd5::new(b"test key");
    let mut filter = source::Filter::new(&digester, RelayConfig::default());
    let link = run_through(&qemu_stream(), Dialect::Qemu, |item, out| filter.step(item, out));
    assert_eq!(filter.stats().total().host_referenced, 0);
    // A host that holds everything is never asked.
    let host = host_with(&digester, &[1, 2, 3, 4], false);
    let fetched = host.fetched.clone();
    let mut expander = destination::Expander::new(&digester, RelayConfig::default()).with_host(Box::new(host));
    run_through(&link, Dialect::Relay, |item, out| expander.step(item, out));
    assert_eq!(fetched.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// Runs `link` through `expander` until it fails; the error and what was written for QEMU before it.
fn until_error(link: &[u8], expander: &mut destination::Expander) -> (RelayError, Vec<u8>) {
    let mut parser = Parser::new(Dialect::Relay);
    parser.feed(link);
    let mut out = Vec::new();
    loop {
        let item = parser.next_item().unwrap().expect("an error before the end");
        if let Err(e) = expander.step(item, &mut out) {
            return (e, out);
        }
    }
}

#[test]
fn a_host_reference_the_host_no_longer_resolves_stops_the_stream_there() {
    let digester = HmacMd5::new(b"test key");
    // Advertised 2 and 3, but 3 is gone by the time its reference comes (evicted, corrupt on disk).
    let mut filter =
        source::Filter::new(&digester, RelayConfig::default()).with_host_held(prefixes(&digester, &[2, 3]));
    let link = run_through(&qemu_stream(), Dialect::Qemu, |item, out| filter.step(item, out));
    let mut expander = destination::Expander::new(&digester, RelayConfig::default()).with_host(Box::new(host_with(
        &digester,
        &[2],
        false,
    )));
    let (error, written) = until_error(&link, &mut expander);
    assert!(matches!(error, RelayError::MissingReference(_)), "{error}");
    // Nothing of b/1 (content 3) nor after it reached QEMU's stream: no zeros in its place.
    let memory = loaded_prefix(&written);
    assert!(!memory.contains_key(&(1, 4096)), "b/1 was never written");
    assert_eq!(memory.len(), 5, "a/0..a/3 and b/0 only: {:?}", memory.keys());
}

#[test]
fn a_host_page_that_does_not_hash_to_its_digest_is_refused() {
    let digester = HmacMd5::new(b"test key");
    let mut filter = source::Filter::new(&digester, RelayConfig::default()).with_host_held(prefixes(&digester, &[2]));
    let link = run_through(&qemu_stream(), Dialect::Qemu, |item, out| filter.step(item, out));
    let mut expander = destination::Expander::new(&digester, RelayConfig::default()).with_host(Box::new(host_with(
        &digester,
        &[2],
        true,
    )));
    let (error, _) = until_error(&link, &mut expander);
    assert!(matches!(error, RelayError::DigestMismatch(_)), "{error}");
}

#[test]
fn the_tees_get_each_content_and_the_last_pages_are_what_qemu_ends_with() {
    use crate::digest::PageDigester;
    let digester = HmacMd5::new(b"test key");
    let source_tee = Collect::default();
    let mut filter = source::Filter::new(&digester, RelayConfig::default())
        .with_host_held(prefixes(&digester, &[3]))
        .with_tee(Box::new(source_tee.clone()));
    let link = run_through(&qemu_stream(), Dialect::Qemu, |item, out| filter.step(item, out));
    let destination_tee = Collect::default();
    let mut expander = destination::Expander::new(&digester, RelayConfig::default())
        .with_host(Box::new(host_with(&digester, &[3], false)))
        .with_tee(Box::new(destination_tee.clone()));
    run_through(&link, Dialect::Relay, |item, out| expander.step(item, out));

    let fills = |tee: &Collect| tee.0.lock().unwrap().iter().map(|(_, f)| *f).collect::<Vec<_>>();
    // The source keeps every content that left (3 too: its own store may not have it); the
    // destination what came whole (3 is on its host already).
    assert_eq!(fills(&source_tee), [1, 2, 3, 4]);
    assert_eq!(fills(&destination_tee), [1, 2, 4]);
    // At the end: a/0 = 1, a/1 = 4, a/2 = 1, a/3 zero, b/0 = 4, b/1 = 3.
    let digest = |f: u8| digester.digest(&[f; PAGE_SIZE]);
    let mut want = vec![digest(1), digest(3), digest(4)];
    want.sort();
    let mut at_source = filter.last_pages();
    at_source.sort();
    let mut at_destination = expander.last_pages();
    at_destination.sort();
    assert_eq!(at_source, want);
    assert_eq!(at_destination, want);
}

/// What a QEMU loading the beginning of a stream (cut anywhere) would have written, by address.
fn loaded_prefix(bytes: &[u8]) -> HashMap<(usize, u64), [u8; PAGE_SIZE]> {
    let mut parser = Parser::new(Dialect::Qemu);
    parser.feed(bytes);
    let mut memory = HashMap::new();
    while let Ok(Some(item)) = parser.next_item() {
        if let Item::Ram(r) = item {
            let content = match r.body {
                RamBody::Page(p) => *p,
                RamBody::Zero(fill) => [fill; PAGE_SIZE],
                RamBody::Ref(_) => unreachable!(),
            };
            memory.insert((r.block, r.offset), content);
        }
    }
    memory
}

/// A failed relay closes both of its connections at once: the destination QEMU, which keeps its
/// return path open while it waits for the rest of the stream, sees its socket close instead of
/// waiting for ever.
#[tokio::test]
async fn a_relay_that_fails_closes_both_connections_without_waiting_for_qemu() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let digester = HmacMd5::new(b"test key");
    let mut filter = source::Filter::new(&digester, RelayConfig::default()).with_host_held(prefixes(&digester, &[2]));
    let link_bytes = run_through(&qemu_stream(), Dialect::Qemu, |item, out| filter.step(item, out));
    let (mut source_end, link) = tokio::io::duplex(1 << 20);
    let (qemu, mut qemu_end) = tokio::io::duplex(1 << 20);
    source_end.write_all(&link_bytes).await.unwrap();
    // The host holds nothing: the first host reference fails the relay.
    let expander = destination::Expander::new(&digester, RelayConfig::default()).with_host(Box::new(host_with(
        &digester,
        &[],
        false,
    )));
    let relayed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        destination::run_expander(link, qemu, expander),
    )
    .await
    .expect("the relay ends although neither QEMU nor the source closed anything");
    assert!(matches!(relayed, Err(RelayError::MissingReference(_))), "{relayed:?}");
    let mut got = Vec::new();
    qemu_end.read_to_end(&mut got).await.unwrap();
    assert!(
        got.len() < qemu_stream().len(),
        "QEMU got a truncated stream, then end of file"
    );
}

/// A digester that counts how it is asked.
struct Counting {
    inner: HmacMd5,
    one: std::sync::atomic::AtomicUsize,
    many: std::sync::atomic::AtomicUsize,
}

impl crate::digest::PageDigester for Counting {
    fn digest(&self, page: &[u8; PAGE_SIZE]) -> crate::stream::Digest {
        self.one.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.digest(page)
    }

    fn digest_many(&self, pages: &[&[u8; PAGE_SIZE]]) -> Vec<crate::stream::Digest> {
        self.many.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        pages.iter().map(|page| self.inner.digest(page)).collect()
    }
}

#[tokio::test]
async fn the_pumps_hash_a_chunks_pages_together_and_relay_the_same_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let digester = Counting {
        inner: HmacMd5::new(b"test key"),
        one: Default::default(),
        many: Default::default(),
    };
    // Page by page, without I/O: what the link and QEMU must get.
    let mut filter = source::Filter::new(&digester.inner, RelayConfig::default());
    let link_expected = run_through(&qemu_stream(), Dialect::Qemu, |item, out| filter.step(item, out));
    let mut expander = destination::Expander::new(&digester.inner, RelayConfig::default());
    let qemu_expected = run_through(&link_expected, Dialect::Relay, |item, out| expander.step(item, out));

    let (mut qemu_in, qemu) = tokio::io::duplex(1 << 20);
    let (link_source, link_destination) = tokio::io::duplex(1 << 20);
    let (qemu_out, mut qemu_destination) = tokio::io::duplex(1 << 20);
    qemu_in.write_all(&qemu_stream()).await.unwrap();
    qemu_in.shutdown().await.unwrap();
    let reading = async {
        let mut got = Vec::new();
        qemu_destination.read_to_end(&mut got).await.unwrap();
        drop(qemu_destination);
        got
    };
    let (source, destination, got) = tokio::join!(
        source::run(qemu, link_source, &digester, RelayConfig::default()),
        destination::run(link_destination, qemu_out, &digester, RelayConfig::default()),
        reading,
    );
    source.unwrap();
    let expanded = destination.unwrap().total().referenced;
    assert!(expanded > 0);
    assert_eq!(
        got, qemu_expected,
        "the destination QEMU gets what the page-by-page relay gives"
    );
    assert!(
        digester.many.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "each side hashed in batches"
    );
    // One at a time: only the filter's zero page, and each reference the expander checks before use.
    assert_eq!(
        digester.one.load(std::sync::atomic::Ordering::Relaxed) as u64,
        1 + expanded,
        "whole pages are hashed in batches"
    );
}
