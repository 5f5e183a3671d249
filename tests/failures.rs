//! What must not go wrong when things go wrong: a destination that dies mid-migration, a peer without
//! the cluster key, and peers that send garbage or hostile messages.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::Duration;

use perfplus_protocol::connection::Connection;
use perfplus_protocol::frame::{self, PageBatch};
use perfplus_protocol::{Message, MigrateBegin, MigrateOptions, Role};
use support::{assert_nothing_lost, cli_with_tls, guest_counter, kvm_missing, wait_until, Cluster, Spawned};

#[test]
fn killing_the_destination_mid_migration_leaves_the_source_guest_running() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let mut b = cluster.agent("b");
    cluster.start_guest(&a, "victim", "64M", "dirtier:working-set=16M,rate=50k");

    // A target no dirty set can meet keeps pre-copy iterating until the destination dies.
    let mut migrate = Spawned::new(
        cluster
            .command_in(None, &["migrate", "victim", "--from", &a.addr, "--to", &b.addr])
            .args([
                "--downtime-target",
                "0.001ms",
                "--max-rounds",
                "100000",
                "--mode",
                "precopy",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("perfplus migrate"),
    );
    let mut stderr = BufReader::new(migrate.child().stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "migrate ended before any round:\n{seen}"
        );
        seen.push_str(&line);
        if line.contains("round  2") {
            break;
        }
    }
    b.kill();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let status = migrate.child().wait().unwrap();
    assert!(!status.success(), "the migration must fail:\n{seen}{rest}");
    assert!(
        rest.contains("keeps running here"),
        "the error says the VM stayed: {rest}"
    );

    // The guest runs on A, unpaused, and its self-check keeps passing over full sweeps.
    let before = cluster.status(&a, "victim");
    assert_eq!(before["run_state"], "running", "{before}");
    let sweeps = guest_counter(&before, "verify_sweeps");
    let written = guest_counter(&before, "pages_written");
    wait_until(
        Duration::from_secs(20),
        "two more verification sweeps on the source",
        || guest_counter(&cluster.status(&a, "victim"), "verify_sweeps") >= sweeps + 2,
    );
    let after = cluster.status(&a, "victim");
    assert!(guest_counter(&after, "pages_written") > written);
    assert_eq!(guest_counter(&after, "mismatches"), 0);

    // Nothing to resume: `vm resume` is for a guest a committed migration left paused.
    let out = cluster.cli(&["vm", "resume", "victim", "--agent", &a.addr]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("is not paused"), "{text}");

    // And it can still leave, to another destination.
    let c = cluster.agent("c");
    let report = cluster.cli_json(&["migrate", "victim", "--from", &a.addr, "--to", &c.addr, "--json"]);
    assert_nothing_lost(&report);
}

#[test]
fn a_client_of_another_cluster_is_refused() {
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let other = Cluster::named("other");

    let refused = cli_with_tls(&other.tls_dir, &["vm", "list", "--agent", &a.addr]);
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(
        text.contains(&format!(
            "the certificate of {} (agent \"a\") is not issued by this cluster's CA (cluster \"other\")",
            a.addr
        )),
        "clear refusal: {text}"
    );

    // The agent itself is unharmed and serves a client of its cluster.
    let fine = cluster.cli(&["vm", "list", "--agent", &a.addr]);
    assert!(fine.status.success(), "{}", String::from_utf8_lossy(&fine.stderr));
    wait_until(Duration::from_secs(10), "the agent to log the refusal", || {
        a.log_text()
            .contains("refused this side's certificate (agent \"a\"): it is not issued by the CA of its cluster")
    });
}

#[test]
fn garbage_instead_of_a_handshake_is_refused_with_a_reason() {
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let mut stream = std::net::TcpStream::connect(&a.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // The agent hangs up on a client that does not speak the protocol, without serving anything.
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let mut rest = &bytes[..];
    while let Ok(Some((message, used))) = frame::decode(rest) {
        assert!(
            matches!(message, Message::Error { .. }),
            "only an error may come back, not {message:?}"
        );
        rest = &rest[used..];
    }
    // Its log names what was wrong.
    wait_until(Duration::from_secs(10), "the agent to log the refusal", || {
        a.log_text().contains(r#"its first bytes were \"GET / HT\""#) || a.log_text().contains("GET / HT")
    });
    assert!(
        a.log_text().contains("does not speak the perfplus protocol (TLS 1.3)"),
        "{}",
        a.log_text()
    );
    assert!(cluster.cli(&["vm", "list", "--agent", &a.addr]).status.success());
}

fn begin(name: &str, memory_bytes: u64) -> Message {
    Message::MigrateBegin(MigrateBegin {
        vm: name.into(),
        memory_bytes,
        vcpus: 1,
        cmdline: String::new(),
        options: MigrateOptions::default(),
        migration_id: "0123456789abcdef".into(),
        attach_secret: [7; 32],
    })
}

#[tokio::test]
async fn hostile_migration_messages_are_refused_and_name_what_was_wrong() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let key = cluster.agent_credentials("rogue");

    let refusal = |message: Message| {
        let key = key.clone();
        let addr = a.addr.clone();
        async move {
            let mut conn = Connection::connect(&addr, Role::Peer, &key).await.unwrap();
            conn.send(&message).await.unwrap();
            format!("{:#}", conn.recv().await.expect_err("the agent must refuse"))
        }
    };
    let text = refusal(begin("../../etc", 16 << 20)).await;
    assert!(text.contains("invalid VM name"), "{text}");
    let text = refusal(begin("huge", 1 << 50)).await;
    assert!(text.contains("creating VM huge"), "{text}");
    let text = refusal(Message::VmList).await;
    assert!(text.contains("must start with MigrateBegin"), "{text}");

    // A page outside the announced memory.
    let mut conn = Connection::connect(&a.addr, Role::Peer, &key).await.unwrap();
    conn.send(&begin("h1", 16 << 20)).await.unwrap();
    assert!(matches!(conn.recv().await.unwrap(), Message::MigrateReady(_)));
    let mut batch = PageBatch::with_capacity(1);
    batch.push_zero(1 << 40);
    conn.send(&Message::Pages(batch)).await.unwrap();
    let text = format!("{:#}", conn.recv().await.expect_err("out-of-range page"));
    assert!(text.contains("but the guest has 4096 pages"), "{text}");

    // Nothing of the refused migrations stayed behind, and the agent still serves.
    let list = cluster.cli_json(&["vm", "list", "--agent", &a.addr, "--json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
}
