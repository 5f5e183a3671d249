//! The hostile-input suite of issue 10, items 1, 2 and 7, against real agents: an on-path relay that
//! forwards the TLS handshake untouched and then flips one bit of a page, of the vCPU state or of a
//! control request, or replays records; certificates that are wrong (another cluster, expired, the
//! wrong role); destinations an agent must not migrate to; post-copy connections without the
//! migration's secret. Each is refused with a message that names what was wrong, and a migration
//! that is refused leaves the guest running, intact, on the source.

mod support;

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use perfplus_protocol::connection::Connection;
use perfplus_protocol::tls::pki::Ca;
use perfplus_protocol::{CertRole, Channel, Credentials, Identity, Message, PostcopyAttach, Role};
use support::{guest_counter, kvm_missing, wait_until, Arm, Cluster, Relay, Spawned, Tamper, TestAgent};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(future)
}

/// The guest runs on `agent`, keeps writing, and its self-check found no bad page.
fn assert_guest_runs(cluster: &Cluster, agent: &TestAgent, name: &str) {
    let status = cluster.status(agent, name);
    assert_eq!(status["run_state"], "running", "{status}");
    let written = guest_counter(&status, "pages_written");
    wait_until(Duration::from_secs(60), "the guest to keep writing", || {
        guest_counter(&cluster.status(agent, name), "pages_written") > written
    });
    assert_eq!(guest_counter(&cluster.status(agent, name), "mismatches"), 0);
}

fn assert_no_vms(cluster: &Cluster, agent: &TestAgent) {
    let list = cluster.cli_json(&["vm", "list", "--agent", &agent.addr, "--json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
}

/// What an agent logs when a TLS record from its peer does not verify.
const TAMPERED: &str = "failed authentication: altered, replayed or injected on the way";

/// A migration through a relay that alters the page stream once 1 MiB of it passed: refused on both
/// sides, the guest still runs on the source, nothing stays on the destination.
#[test]
fn a_flipped_or_replayed_record_of_the_page_stream_stops_the_migration_and_the_source_keeps_the_guest() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let b = cluster.agent("b");
    cluster.start_guest(&a, "g", "64M", "dirtier:working-set=16M,rate=5k,mix=unique:100");
    for tamper in [Tamper::FlipBit, Tamper::Replay] {
        let relay = Relay::start(&b.addr, tamper, Arm::AfterBytes(1 << 20));
        let out = cluster.cli(&[
            "migrate",
            "g",
            "--from",
            &a.addr,
            "--to",
            &relay.addr,
            "--mode",
            "precopy",
        ]);
        assert!(!out.status.success(), "{tamper:?}: the migration must fail");
        assert!(relay.tampered(), "{tamper:?}: the relay altered nothing");
        let text = stderr_of(&out);
        assert!(
            text.contains("failed authentication"),
            "{tamper:?}: the CLI says what was wrong: {text}"
        );
        wait_until(Duration::from_secs(20), "the destination to log the tampering", || {
            b.log_text().contains(TAMPERED)
        });
        assert_guest_runs(&cluster, &a, "g");
        assert_no_vms(&cluster, &b);
    }
    // And the guest can still leave, over a clean path.
    let out = cluster.cli(&["migrate", "g", "--from", &a.addr, "--to", &b.addr, "--mode", "precopy"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
}

/// The source holds before it sends the vCPU state; the relay is armed; the first record of the state
/// arrives with one bit flipped: the destination refuses it before restoring anything, and the source,
/// which has not committed, resumes its guest.
#[test]
fn a_flipped_bit_in_the_vcpu_state_stops_the_migration_before_the_commit() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let release = cluster.dir.path().join("release");
    let hold = format!("source:state:until={}", release.display());
    let a = cluster.start_agent_with_env("a", "64M", None, &[("PERFPLUS_FAULT_AT", hold.as_str())]);
    let b = cluster.agent("b");
    cluster.start_guest(&a, "g", "32M", "dirtier:working-set=4M,rate=5k");
    let relay = Relay::start(&b.addr, Tamper::FlipBit, Arm::ByHand);
    let migrate = Spawned::new(
        cluster
            .command_in(
                None,
                &[
                    "migrate",
                    "g",
                    "--from",
                    &a.addr,
                    "--to",
                    &relay.addr,
                    "--mode",
                    "precopy",
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("perfplus migrate"),
    );
    wait_until(
        Duration::from_secs(60),
        "the source to hold before the vCPU state",
        || a.log_text().contains("fault point source:state reached"),
    );
    relay.arm();
    std::fs::write(&release, b"").unwrap();
    let out = migrate.wait_with_output();
    assert!(!out.status.success(), "the migration must fail");
    assert!(relay.tampered());
    assert!(stderr_of(&out).contains("failed authentication"), "{}", stderr_of(&out));
    wait_until(Duration::from_secs(20), "the destination to log the tampering", || {
        b.log_text().contains(TAMPERED)
    });
    assert!(
        !b.log_text().contains("restored"),
        "nothing was restored: {}",
        b.log_text()
    );
    assert_guest_runs(&cluster, &a, "g");
    assert_no_vms(&cluster, &b);
}

/// The issue's relay that turns `vm list` into `vm stop`: whatever one flipped bit changes in a control
/// request, the agent refuses the record and does nothing; a recorded session replayed on a new
/// connection does not get past the TLS handshake.
#[test]
fn a_rewritten_or_replayed_control_request_is_refused() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    cluster.start_guest(&a, "g", "32M", "dirtier:working-set=4M,rate=5k");
    let operator = Credentials::load(&cluster.tls_dir).unwrap();

    let relay = Relay::start(&a.addr, Tamper::FlipBit, Arm::ByHand);
    let text = block_on(async {
        let mut conn = Connection::connect(&relay.addr, Role::Control, &operator)
            .await
            .unwrap();
        // The handshake passed untouched; now the request is altered on the way.
        relay.arm();
        conn.send(&Message::VmStop { name: "g".into() }).await.unwrap();
        format!("{:#}", conn.recv().await.unwrap_err())
    });
    assert!(relay.tampered());
    assert!(
        text.contains("refused this side's data: it failed authentication there"),
        "{text}"
    );
    wait_until(Duration::from_secs(20), "the agent to log the tampering", || {
        a.log_text().contains(TAMPERED)
    });
    assert_guest_runs(&cluster, &a, "g");

    // A `vm stop` session recorded on the path, replayed on a new connection.
    let recorder = Relay::start(&a.addr, Tamper::FlipBit, Arm::AfterBytes(u64::MAX));
    let out = cluster.cli(&["vm", "stop", "g", "--agent", &recorder.addr]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let recorded = recorder.recorded();
    assert!(!recorded.is_empty());
    cluster.start_guest(&a, "g", "32M", "dirtier:working-set=4M,rate=5k");
    let log_before = a.log_text().len();
    {
        use std::io::{Read, Write};
        let mut replay = std::net::TcpStream::connect(&a.addr).unwrap();
        replay.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = replay.write_all(&recorded);
        let mut sink = Vec::new();
        let _ = replay.read_to_end(&mut sink);
    }
    wait_until(Duration::from_secs(20), "the agent to refuse the replay", || {
        a.log_text()[log_before..].contains("was altered on the way")
    });
    assert_guest_runs(&cluster, &a, "g");
}

/// Writes credentials for `identity` from `ca`, valid from `not_before` to `not_after`, into `dir`.
fn write_credentials(
    ca: &Ca,
    ca_pem: &str,
    identity: &Identity,
    valid: (SystemTime, SystemTime),
    dir: &std::path::Path,
) {
    let issued = ca.issue_between(identity, valid.0, valid.1).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("cert.pem"), issued.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), issued.key_pem).unwrap();
    std::fs::write(dir.join("page.key"), format!("{}\n", ca.page_secret().to_hex())).unwrap();
}

/// Runs `perfplus agent` with the credentials in `tls_dir`, which must refuse to start: its output
/// (killed, by the pid this test started, and the test failed if it still runs after 20 s).
fn agent_that_must_not_start(tls_dir: &std::path::Path, state_dir: &std::path::Path) -> std::process::Output {
    let mut agent = Spawned::new(
        support::perfplus_command(None)
            .arg("--tls-dir")
            .arg(tls_dir)
            .args(["agent", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("perfplus agent"),
    );
    wait_until(Duration::from_secs(20), "the agent to refuse to start", || {
        !matches!(agent.child().try_wait(), Ok(None))
    });
    let out = agent.wait_with_output();
    assert!(!out.status.success(), "the agent must not start");
    out
}

#[test]
fn wrong_expired_and_foreign_certificates_are_refused_naming_what_was_wrong() {
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    let ca = Ca::load(&cluster.ca_dir).unwrap();
    let ca_pem = std::fs::read_to_string(cluster.ca_dir.join("ca.pem")).unwrap();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);

    // An expired operator certificate: the CLI says so before it connects; presented anyway, the agent
    // refuses it and the client learns why.
    let expired = cluster.dir.path().join("expired");
    let old = Identity::new(CertRole::Operator, "old").unwrap();
    write_credentials(&ca, &ca_pem, &old, (now - 30 * day, now - day), &expired);
    let out = cluster.cli_as(&expired, &["vm", "list", "--agent", &a.addr]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("cert.pem (operator \"old\"): expired on "),
        "{}",
        stderr_of(&out)
    );
    let read = |file: &str| std::fs::read(expired.join(file)).unwrap();
    let stale = Credentials::from_pem_unchecked(&read("ca.pem"), &read("cert.pem"), &read("key.pem")).unwrap();
    let text = block_on(async {
        format!(
            "{:#}",
            Connection::connect(&a.addr, Role::Control, &stale).await.err().unwrap()
        )
    });
    assert!(
        text.ends_with("refused this side's certificate (operator \"old\"): it has expired or is not valid yet (by that side's clock)"),
        "{text}"
    );
    wait_until(
        Duration::from_secs(20),
        "the agent to log the expired certificate",
        || a.log_text().contains("(operator \"old\") expired on "),
    );

    // An agent whose certificate expired does not start.
    let expired_agent = cluster.dir.path().join("expired-agent");
    write_credentials(
        &ca,
        &ca_pem,
        &Identity::new(CertRole::Agent, "z").unwrap(),
        (now - 30 * day, now - day),
        &expired_agent,
    );
    let out = agent_that_must_not_start(&expired_agent, &cluster.dir.path().join("z"));
    assert!(
        stderr_of(&out).contains("cert.pem (agent \"z\"): expired on "),
        "{}",
        stderr_of(&out)
    );

    // A certificate of another cluster that trusts this one's CA (a CA certificate is no secret): the
    // agent refuses it, naming the holder it claims to be.
    let other = Ca::create("other", 1).unwrap();
    let stranger = other
        .issue(&Identity::new(CertRole::Operator, "mallory").unwrap(), 1)
        .unwrap();
    let stranger = Credentials::from_pem_unchecked(
        ca_pem.as_bytes(),
        stranger.cert_pem.as_bytes(),
        stranger.key_pem.as_bytes(),
    )
    .unwrap();
    let text = block_on(async {
        format!(
            "{:#}",
            Connection::connect(&a.addr, Role::Control, &stranger)
                .await
                .err()
                .unwrap()
        )
    });
    assert!(
        text.ends_with(
            "refused this side's certificate (operator \"mallory\"): it is not issued by the CA of its cluster"
        ),
        "{text}"
    );
    wait_until(
        Duration::from_secs(20),
        "the agent to log the foreign certificate",
        || {
            a.log_text().contains(
            "(operator \"mallory\") is not issued by this cluster's CA (cluster \"test\"): a certificate of another cluster, or self-signed",
        )
        },
    );

    // An operator's certificate where an agent's belongs: the agent does not start.
    let out = agent_that_must_not_start(&cluster.tls_dir, &cluster.dir.path().join("y"));
    assert!(
        stderr_of(&out).contains("an agent needs an agent's certificate; this one is operator \"tester\"'s"),
        "{}",
        stderr_of(&out)
    );

    // The old flag says what replaced it.
    let out = support::perfplus_command(None)
        .args(["--cluster-key-file", "/nonexistent", "vm", "list"])
        .output()
        .unwrap();
    assert!(
        stderr_of(&out).contains("cluster keys were replaced by TLS certificates"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn roles_limit_what_a_certificate_may_do() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    cluster.start_guest(&a, "g", "32M", "dirtier:working-set=4M,rate=5k");

    // A reader lists and reads status, and nothing more.
    let reader = cluster.issue("reader", "monitor");
    let out = cluster.cli_as(&reader, &["vm", "list", "--agent", &a.addr]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(cluster
        .cli_as(&reader, &["vm", "status", "g", "--agent", &a.addr])
        .status
        .success());
    let out = cluster.cli_as(&reader, &["vm", "stop", "g", "--agent", &a.addr]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains(
            "VmStop refused: the certificate of reader \"monitor\" may only read (vm list, vm status); starting, \
             stopping, resuming, migrating, cancelling and tracking need an operator's certificate"
        ),
        "{}",
        stderr_of(&out)
    );
    // So does another agent's certificate: a host broken into cannot steer the others.
    let out = cluster.cli_as(
        &cluster.issue("agent", "b"),
        &["migrate", "g", "--from", &a.addr, "--to", &a.addr],
    );
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("Migrate refused: the certificate of agent \"b\" may only read"),
        "{}",
        stderr_of(&out)
    );

    // An operator's certificate cannot open an agent-to-agent connection (receive a guest's memory, or
    // send one).
    let operator = Credentials::load(&cluster.tls_dir).unwrap();
    let text = block_on(async {
        format!(
            "{:#}",
            Connection::connect(&a.addr, Role::Peer, &operator).await.err().unwrap()
        )
    });
    assert_eq!(
        text,
        format!(
            "{} refused the handshake: a peer (agent-to-agent) connection needs an agent's certificate; this side \
             presented the certificate of operator \"tester\"",
            a.addr
        )
    );
    assert_guest_runs(&cluster, &a, "g");
}

#[test]
fn an_agent_migrates_only_to_destinations_it_trusts() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent_with_options("a", &["--allow-destination", "b,c"]);
    let b = cluster.agent("b");
    let d = cluster.agent("d");
    cluster.start_guest(&a, "g", "32M", "dirtier:working-set=4M,rate=5k");

    // Not on the allow-list.
    let out = cluster.cli(&["migrate", "g", "--from", &a.addr, "--to", &d.addr, "--mode", "precopy"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains(&format!(
            "refusing {}: agent \"d\" is not among the destinations this agent may migrate to (b, c)",
            d.addr
        )),
        "{}",
        stderr_of(&out)
    );
    // Another agent than the one the operator named answers at that address.
    let out = cluster.cli(&[
        "migrate",
        "g",
        "--from",
        &a.addr,
        "--to",
        &b.addr,
        "--to-agent",
        "c",
        "--mode",
        "precopy",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains(&format!(
            "refusing {}: it is agent \"b\", not the agent \"c\" this migration was asked to go to",
            b.addr
        )),
        "{}",
        stderr_of(&out)
    );
    // An agent of another cluster.
    let other = Cluster::named("other");
    let x = other.agent("b");
    let out = cluster.cli(&["migrate", "g", "--from", &a.addr, "--to", &x.addr, "--mode", "precopy"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains(&format!(
            "the certificate of {} (agent \"b\") is not issued by this cluster's CA (cluster \"test\")",
            x.addr
        )),
        "{}",
        stderr_of(&out)
    );
    assert_guest_runs(&cluster, &a, "g");
    for agent in [&b, &d] {
        assert_no_vms(&cluster, agent);
    }
    assert_no_vms(&other, &x);

    // The one the operator named, on the list: it goes.
    let out = cluster.cli(&[
        "migrate",
        "g",
        "--from",
        &a.addr,
        "--to",
        &b.addr,
        "--to-agent",
        "b",
        "--mode",
        "precopy",
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_guest_runs(&cluster, &b, "g");
}

/// While a post-copy migration runs, a connection that knows its id (shown in `vm status`) but not its
/// secret, or that comes from another agent, is refused; the migration completes.
#[test]
fn a_postcopy_attach_needs_the_migrations_secret_and_its_source() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let release = cluster.dir.path().join("release");
    let hold = format!("source:postcopy-push:until={}", release.display());
    let a = cluster.start_agent_with_env("a", "64M", None, &[("PERFPLUS_FAULT_AT", hold.as_str())]);
    let b = cluster.agent("b");
    cluster.start_guest(&a, "g", "32M", "dirtier:working-set=4M,rate=5k");
    let migrate = Spawned::new(
        cluster
            .command_in(
                None,
                &["migrate", "g", "--from", &a.addr, "--to", &b.addr, "--mode", "postcopy"],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("perfplus migrate"),
    );
    wait_until(Duration::from_secs(60), "the source to hold its push", || {
        a.log_text().contains("fault point source:postcopy-push reached")
    });
    let note = cluster.status(&a, "g")["note"].as_str().unwrap_or_default().to_string();
    let id = note
        .split("(migration ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no migration id in {note:?}"))
        .to_string();

    let attach = |credentials: Credentials, secret: [u8; 32]| {
        let (addr, id) = (b.addr.clone(), id.clone());
        block_on(async move {
            let mut conn = Connection::connect(&addr, Role::Peer, &credentials).await.unwrap();
            conn.send(&Message::PostcopyAttach(PostcopyAttach {
                id,
                channel: Channel::Demand,
                secret,
            }))
            .await
            .unwrap();
            format!("{:#}", conn.recv().await.unwrap_err())
        })
    };
    // The source's own certificate, without the secret.
    let text = attach(cluster.agent_credentials("a"), [0; 32]);
    assert!(
        text.ends_with(&format!(
            "post-copy attach to migration {id:?} refused: wrong secret for that migration"
        )),
        "{text}"
    );
    // Another agent of the cluster.
    let text = attach(cluster.agent_credentials("rogue"), [0; 32]);
    assert!(
        text.ends_with(&format!(
            "post-copy attach to migration {id:?} refused: it comes from agent \"rogue\", the migration from agent \"a\""
        )),
        "{text}"
    );

    std::fs::write(&release, b"").unwrap();
    let out = migrate.wait_with_output();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_guest_runs(&cluster, &b, "g");
}
