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
