//! End to end on loopback: a source QEMU 7.2 migrates the built-in guest to a source relay (unix
//! socket), which sends the relay dialect over TCP to a destination relay, which feeds the
//! destination QEMU's `-incoming` socket. QEMU's return path is on, so it is relayed back too.

mod support;

use std::sync::Arc;

use perfplus_qemu::digest::HmacMd5;
use perfplus_qemu::relay::{destination, source, RelayConfig, RelayStats};
use serde_json::json;
use support::*;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_migrates_through_two_relays_and_keeps_running_clean() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, tsc_khz) = guest_kernel(dir.path());
    let append = format!("{WORKLOAD} tsc_khz={tsc_khz}");
    let mut src = Qemu::start(dir.path(), "source", &kernel, 64, &append, false);
    let mut dst = Qemu::start(dir.path(), "destination", &kernel, 64, &append, true);
    src.wait_for_console("; running").await;
    let mut src_qmp = src.qmp().await;
    let mut dst_qmp = dst.qmp().await;
    for qmp in [&mut src_qmp, &mut dst_qmp] {
        qmp.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "return-path", "state": true }] }),
        )
        .await
        .unwrap();
        qmp.check_supported().await.unwrap();
    }
    let incoming = dir.path().join("incoming.sock");
    dst_qmp
        .execute(
            "migrate-incoming",
            json!({ "uri": format!("unix:{}", incoming.display()) }),
        )
        .await
        .unwrap();

    let digester = Arc::new(HmacMd5::new(b"a cluster's page key"));
    let config = RelayConfig::default();
    let link_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let link_address = link_listener.local_addr().unwrap();
    let destination_relay = tokio::spawn({
        let digester = digester.clone();
        async move {
            let (link, _) = link_listener.accept().await.unwrap();
            let qemu = UnixStream::connect(&incoming).await.unwrap();
            destination::run(link, qemu, &*digester, config).await
        }
    });
    let outgoing = dir.path().join("outgoing.sock");
    let qemu_listener = UnixListener::bind(&outgoing).unwrap();
    let source_relay = tokio::spawn({
        let digester = digester.clone();
        async move {
            let (qemu, _) = qemu_listener.accept().await.unwrap();
            let link = TcpStream::connect(link_address).await.unwrap();
            source::run(qemu, link, &*digester, config).await
        }
    });

    src_qmp.migrate(&format!("unix:{}", outgoing.display())).await.unwrap();
    let info = wait_migration(&mut src_qmp).await;
    assert_eq!(info["status"], "completed", "source QEMU: {info}\n{}", src.stderr());
    let sent: RelayStats = source_relay.await.unwrap().expect("the source relay");
    let received: RelayStats = destination_relay.await.unwrap().expect("the destination relay");
    let dst_info = wait_migration(&mut dst_qmp).await;
    assert_eq!(
        dst_info["status"],
        "completed",
        "destination QEMU: {dst_info}\n{}",
        dst.stderr()
    );
    let status = dst_qmp.execute("query-status", json!({})).await.unwrap();
    assert_eq!(status["status"], "running", "{status}");

    // The guest goes on verifying its pages on the destination.
    let line = dst.next_progress_lines().await;
    let console = dst.console();
    assert_eq!(field(&line, "mismatches="), 0, "{console}");
    assert!(!console.contains("MISMATCH") && !console.contains("FATAL"), "{console}");

    // Every record QEMU sent is accounted for, and Perf+ did something with them.
    let total = sent.total();
    let ram = &info["ram"];
    println!("QEMU: {info}\nsource relay: {sent:?}\ndestination relay: {received:?}");
    assert_eq!(
        total.full + total.referenced + total.host_referenced + total.unchanged,
        ram["normal"].as_u64().unwrap()
    );
    assert_eq!(total.zero + total.zero_unchanged, ram["duplicate"].as_u64().unwrap());
    assert_eq!(received.total().full, total.full);
    assert_eq!(received.total().referenced, total.referenced);
    // The guest's `dup` pages share 16 contents: most of them must travel as references.
    assert!(total.referenced > 100, "{total:?}");
    // While it migrates the guest rewrites pages, 20 % of them with unchanged content, and QEMU
    // re-sends them: some must be dropped (they are on the destination already).
    assert!(total.unchanged > 0, "{total:?}");
    assert!(sent.bytes_out < sent.bytes_in, "the link carried less than QEMU sent");
    assert!(sent.return_path_bytes > 0, "QEMU's return path went through the relays");
    assert_eq!(sent.return_path_bytes, received.return_path_bytes);
}
