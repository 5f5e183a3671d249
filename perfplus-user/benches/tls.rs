//! What TLS costs the page stream: pages per second through a `Connection` with TLS 1.3 (the only way
//! agents talk) against the same framing in clear, on loopback and over a 1 Gbit/s tbf-shaped veth
//! link between two network namespaces. Run: `scripts/bench.sh tls` (or `cargo bench -p perfplus
//! --bench tls`).
//!
//! Method. One process, two ends of one connection: the sender sends full `Pages` frames of 1024
//! pages (4 MiB, what the engine sends in bulk) with non-repeating content, as the engine does (one
//! vectored write per batch), then a `RoundEnd`; the receiver reads and decodes every frame (the
//! engine's `recv`) and answers the `RoundEnd`; the time is from the first byte to that answer.
//! - Loopback: 2 GiB per run, 3 runs per mode alternating, median. Also the CPU time of the whole
//!   process (both ends: encryption and decryption, copies, syscalls) per GiB, from `getrusage`.
//! - Shaped link: namespaces joined by a veth pair, each end `tc tbf rate 1gbit` (the harness of
//!   `tests/postcopy.rs`); the sockets are made inside the namespaces by threads that join them
//!   (`setns`). 256 MiB per run, 3 runs per mode alternating, median. The link is the bottleneck: what
//!   TLS could add is its CPU time per byte (if it did not keep up) and the 22 bytes per 16 KiB record.
//! - The TLS handshake (connect + accept, mutual certificates, the perfplus Hello) on loopback:
//!   median of 20.
//! - A real migration over a fresh 1 Gbit/s link (two agents in the namespaces, 512 MiB guest with 256
//!   MiB of distinct pages, pre-copy): its total time, bytes and bandwidth with TLS. There is no agent
//!   without TLS to compare with; the clear estimate scales the link-bound part (bytes at 1 Gbit/s)
//!   by the transfer ratio measured just before.
//!
//! The clear mode (`Connection::insecure_clear_for_benchmarks`) exists only for this comparison: no
//! agent accepts a connection without TLS.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Instant;

use perfplus_protocol::connection::Connection;
use perfplus_protocol::frame::PageBatch;
use perfplus_protocol::{CertRole, Credentials, Identity, Message, Role};
use support::ShapedLink;
use tokio::net::TcpStream;

const PAGE: usize = 4096;
const BATCH_PAGES: usize = 1024;
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Clear,
    Tls,
}

/// CPU time of this process so far (user + system), in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes a `struct rusage` into the zeroed value we own; RUSAGE_SELF is valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A batch of full pages whose content does not repeat (content does not matter to AES-GCM; it would
/// to a compressing link).
fn batch() -> Message {
    let mut batch = PageBatch::with_capacity(BATCH_PAGES);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut page = [0u8; PAGE];
    for p in 0..BATCH_PAGES as u64 {
        for chunk in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        batch.push_full(p, &[p as u8; 16], &page);
    }
    Message::Pages(batch)
}

/// Sends `batches` page batches from `sender` to `receiver`; returns (seconds, CPU seconds).
async fn transfer(mut sender: Connection, mut receiver: Connection, batches: usize, msg: &Message) -> (f64, f64) {
    let receiving = tokio::spawn(async move {
        let mut pages = 0usize;
        loop {
            match receiver.recv().await.expect("receiving") {
                Message::Pages(b) => pages += b.iter().count(),
                Message::RoundEnd { round } => {
                    receiver
                        .send(&Message::RoundAck { round, missing: vec![] })
                        .await
                        .expect("acknowledging");
                    return pages;
                }
                other => panic!("unexpected {}", other.name()),
            }
        }
    });
    let cpu = cpu_seconds();
    let start = Instant::now();
    for _ in 0..batches {
        sender.send(msg).await.expect("sending pages");
    }
    sender
        .send(&Message::RoundEnd { round: 1 })
        .await
        .expect("sending RoundEnd");
    match sender.recv().await.expect("the acknowledgement") {
        Message::RoundAck { .. } => {}
        other => panic!("unexpected {}", other.name()),
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu;
    assert_eq!(receiving.await.unwrap(), batches * BATCH_PAGES);
    (elapsed, cpu)
}

struct Cluster {
    a: Credentials,
    b: Credentials,
}

fn cluster() -> Cluster {
    let (a, ca) = Credentials::ephemeral(&Identity::new(CertRole::Agent, "a").unwrap()).unwrap();
    let b = Credentials::issued_by(&ca, &Identity::new(CertRole::Agent, "b").unwrap()).unwrap();
    Cluster { a, b }
}

/// Two ends over connected `client` and `server` sockets, in `mode`.
async fn ends(mode: Mode, client: TcpStream, server: TcpStream, c: &Cluster) -> (Connection, Connection) {
    match mode {
        Mode::Clear => {
            let id = |n: &str| Identity::new(CertRole::Agent, n).unwrap();
            (
                Connection::insecure_clear_for_benchmarks(client, id("b")).unwrap(),
                Connection::insecure_clear_for_benchmarks(server, id("a")).unwrap(),
            )
        }
        Mode::Tls => {
            let (client, server) = tokio::join!(
                Connection::open(client, Role::Peer, &c.a),
                Connection::accept(server, &c.b)
            );
            (client.expect("TLS client"), server.expect("TLS server").0)
        }
    }
}

async fn loopback_sockets() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.unwrap(), server.unwrap().0)
}

/// Runs `f` on a thread that joined network namespace `name`: sockets it makes live there.
fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(format!("/run/netns/{name}")).expect("the namespace");
            // SAFETY: setns on a descriptor we own, for this thread only (a thread of our own that
            // ends after `f`); no memory is touched.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

fn link_sockets(link: &ShapedLink) -> (TcpStream, TcpStream) {
    let listener = in_netns(link.b.name(), || {
        std::net::TcpListener::bind((ShapedLink::IP_B, 0)).unwrap()
    });
    let addr = listener.local_addr().unwrap();
    let client = in_netns(link.a.name(), || std::net::TcpStream::connect(addr).unwrap());
    let (server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_nonblocking(true).unwrap();
    }
    (
        TcpStream::from_std(client).unwrap(),
        TcpStream::from_std(server).unwrap(),
    )
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let c = cluster();
    let msg = batch();
    let batch_bytes = (BATCH_PAGES * PAGE) as f64;

    // Handshake time.
    let mut handshakes = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        runtime.block_on(async {
            let (client, server) = loopback_sockets().await;
            ends(Mode::Tls, client, server, &c).await
        });
        handshakes.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "TLS handshake on loopback (connect + accept, mutual certificates, Hello): median {:.2} ms",
        median(handshakes)
    );

    // Loopback.
    let batches = 512; // 2 GiB
    let mut results = [
        (Mode::Clear, Vec::new(), Vec::new()),
        (Mode::Tls, Vec::new(), Vec::new()),
    ];
    for _ in 0..3 {
        for (mode, times, cpus) in results.iter_mut() {
            let (t, cpu) = runtime.block_on(async {
                let (client, server) = loopback_sockets().await;
                let (s, r) = ends(*mode, client, server, &c).await;
                transfer(s, r, batches, &msg).await
            });
            times.push(t);
            cpus.push(cpu);
        }
    }
    let total = batches as f64 * batch_bytes;
    println!("\nLoopback, {} MiB per run, median of 3:", total as u64 >> 20);
    let mut loop_rates = Vec::new();
    for (mode, times, cpus) in &results {
        let t = median(times.clone());
        let cpu_per_gib = median(cpus.clone()) / (total / GIB);
        let pages = total / PAGE as f64 / t;
        println!(
            "  {mode:?}: {:>8.0} pages/s  {:>6.0} MB/s  CPU (both ends) {:.3} s/GiB",
            pages,
            total / t / 1e6,
            cpu_per_gib
        );
        loop_rates.push((pages, cpu_per_gib));
    }
    let extra_cpu = loop_rates[1].1 - loop_rates[0].1;
    println!(
        "  TLS/clear: {:.2}x the pages/s; TLS adds {:.3} CPU-s per GiB (both ends): at 1 Gbit/s ({:.3} GiB/s) \
         that is {:.1} % of one core",
        loop_rates[1].0 / loop_rates[0].0,
        extra_cpu,
        1e9 / 8.0 / GIB,
        extra_cpu * 1e9 / 8.0 / GIB * 100.0
    );

    // Shaped link.
    let Some(link) = ShapedLink::new('t', "1gbit") else {
        println!("\nshaped link: SKIPPED (no network namespaces here)");
        return;
    };
    let batches = 64; // 256 MiB
    let total = batches as f64 * batch_bytes;
    let mut times = [(Mode::Clear, Vec::new()), (Mode::Tls, Vec::new())];
    for _ in 0..3 {
        for (mode, t) in times.iter_mut() {
            let secs = runtime.block_on(async {
                let (client, server) = link_sockets(&link);
                let (s, r) = ends(*mode, client, server, &c).await;
                transfer(s, r, batches, &msg).await.0
            });
            t.push(secs);
        }
    }
    println!(
        "\n1 Gbit/s tbf link between two namespaces, {} MiB per run, median of 3:",
        total as u64 >> 20
    );
    let mut medians = Vec::new();
    for (mode, t) in &times {
        let t = median(t.clone());
        println!(
            "  {mode:?}: {:.3} s  {:>6.0} pages/s  {:>5.0} Mbit/s of pages",
            t,
            total / PAGE as f64 / t,
            total * 8.0 / t / 1e6
        );
        medians.push(t);
    }
    let ratio = medians[1] / medians[0];
    println!("  TLS/clear time: {ratio:.3} ({:+.1} %)", (ratio - 1.0) * 100.0);
    drop(link);

    // A real migration over a fresh 1 Gbit/s link (agents in the namespaces, TLS as always): how much
    // of its total time is the link's, and what the transfer ratio above makes of it.
    if support::kvm_missing() {
        return;
    }
    let Some(link) = ShapedLink::new('u', "1gbit") else {
        return;
    };
    let cluster = support::Cluster::new();
    let a = cluster.agent_in(&link.a, "a", "0");
    let b = cluster.agent_in(&link.b, "b", "0");
    cluster.start_guest(&a, "g", "512M", "dirtier:working-set=256M,rate=5k,mix=unique:100");
    let to_b = b.addr_via(ShapedLink::IP_B);
    let report = cluster.cli_json_in(
        a.netns(),
        &[
            "migrate", "g", "--from", &a.addr, "--to", &to_b, "--mode", "precopy", "--json",
        ],
    );
    let total_ms = report["total_ms"].as_f64().unwrap();
    let wire = report["bytes_on_wire"].as_f64().unwrap();
    let link_ms = wire * 8.0 / 1e9 * 1e3;
    println!(
        "\nMigration of a 512 MiB guest (256 MiB of distinct pages) over 1 Gbit/s, TLS: total {total_ms:.0} ms, \
         {:.0} MiB on the wire ({:.0} Mbit/s average; the bytes alone need {link_ms:.0} ms at 1 Gbit/s), downtime \
         {:.1} ms, agent CPU {:.0} ms. At the transfer ratio above, the same migration in clear would take \
         ~{:.0} ms: TLS costs it {:+.1} %.",
        wire / (1u64 << 20) as f64,
        report["average_mbps"].as_f64().unwrap(),
        report["downtime_ms"].as_f64().unwrap(),
        report["agent_cpu_ms"].as_f64().unwrap(),
        total_ms - link_ms * (1.0 - 1.0 / ratio),
        (total_ms / (total_ms - link_ms * (1.0 - 1.0 / ratio)) - 1.0) * 100.0
    );
}
