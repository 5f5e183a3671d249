//! A real QEMU 7.2 stream, captured at test time (`migrate exec:cat > FILE` from a QEMU running the
//! built-in guest), parsed in chunks of every size and written back byte for byte.

mod support;

use perfplus_qemu::stream::{self, Dialect, Item, Parser, RamBody};
use support::*;

/// Parses `bytes` fed in chunks of `chunk` bytes; returns the items.
fn parse_in_chunks(bytes: &[u8], chunk: usize) -> Vec<Item> {
    let mut parser = Parser::new(Dialect::Qemu);
    let mut items = Vec::new();
    for piece in bytes.chunks(chunk) {
        parser.feed(piece);
        while let Some(item) = parser.next_item().unwrap() {
            items.push(item);
        }
        assert!(
            parser.buffered() < 2 * stream::PAGE_SIZE + chunk,
            "the parser holds more than an item"
        );
    }
    parser.finish().unwrap();
    items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_stream_round_trips_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, tsc_khz) = guest_kernel(dir.path());
    let append = format!("{WORKLOAD} tsc_khz={tsc_khz}");
    let mut qemu = Qemu::start(dir.path(), "source", &kernel, 32, &append, false);
    qemu.wait_for_console("; running").await;
    let mut qmp = qemu.qmp().await;
    assert_eq!(qmp.check_supported().await.unwrap().0, 7);
    let file = dir.path().join("stream");
    qmp.migrate(&format!("exec:cat > {}", file.display())).await.unwrap();
    let info = wait_migration(&mut qmp).await;
    assert_eq!(info["status"], "completed", "{info}");
    let bytes = std::fs::read(&file).unwrap();

    for chunk in [1, 7, 4096, 65536, bytes.len()] {
        let items = parse_in_chunks(&bytes, chunk);
        let mut written = Vec::new();
        let mut tail = Vec::new();
        for item in &items {
            stream::write(item, &mut written);
            if let Item::Tail(t) = item {
                tail.extend_from_slice(t);
            }
        }
        assert!(
            written == bytes,
            "chunks of {chunk}: written stream differs from QEMU's"
        );

        let pages = items
            .iter()
            .filter(|i| matches!(i, Item::Ram(r) if matches!(r.body, RamBody::Page(_))))
            .count();
        let zeros = items
            .iter()
            .filter(|i| matches!(i, Item::Ram(r) if matches!(r.body, RamBody::Zero(_))))
            .count();
        let ram = &info["ram"];
        assert_eq!(pages as u64, ram["normal"].as_u64().unwrap(), "pages QEMU counted");
        assert_eq!(
            zeros as u64,
            ram["duplicate"].as_u64().unwrap(),
            "zero pages QEMU counted"
        );
        assert!(matches!(items[0], Item::Header { version: 3 }));
        assert!(matches!(&items[1], Item::Configuration { machine } if machine.starts_with("pc-i440fx-7.2")));
        let parts = stream::split_tail(&tail).expect("the tail ends with EOF and the vmdesc");
        let vmdesc: serde_json::Value = serde_json::from_str(parts.vmdesc.expect("a vmdesc")).unwrap();
        assert!(
            vmdesc["devices"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["name"] == "timer"),
            "the vmdesc lists the devices"
        );
    }
}
