//! The agent as a service: its systemd unit (checked by `systemd-analyze verify`), readiness over
//! `$NOTIFY_SOCKET`, the TOML config file and `--print-config`, and, around one real migration between
//! two agents, the Prometheus metrics and the JSON log with the migration id on every line.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::{assert_sound_report, kvm_missing, perfplus_command, Cluster, Expect, TestAgent, PERFPLUS};

/// How long a test waits for something that happens at once when all is well (a bound, not a measure).
const BOUND: Duration = Duration::from_secs(60);

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn systemd_analyze() -> Option<PathBuf> {
    ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// `systemd-analyze verify` on `unit`: its exit status and what it printed. It works without systemd
/// running (this machine has none as PID 1); it exits 0 on unknown keys and bad values but prints them.
fn verify(analyze: &Path, unit: &Path) -> (bool, String) {
    let out = Command::new(analyze)
        .arg("verify")
        .arg(unit)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("running systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let analyze = systemd_analyze().expect(
        "systemd-analyze is missing: scripts/setup.sh installs it (Debian's systemd package; it runs without \
         systemd as PID 1)",
    );
    let unit = std::fs::read_to_string(repo_file("scripts/systemd/perfplus-agent.service")).expect("the unit file");
    let exec = "ExecStart=/usr/local/bin/perfplus agent --config /etc/perfplus/agent.toml";
    assert!(unit.contains(exec), "the unit runs the agent from its config file");
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "LimitNOFILE=",
        "DeviceAllow=/dev/kvm rw",
    ] {
        assert!(unit.lines().any(|l| l.starts_with(line)), "the unit sets {line}");
    }
    // verify checks that ExecStart's program exists: the copy checked runs the binary just built.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("perfplus-agent.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/perfplus", PERFPLUS)).unwrap();
    let (ok, said) = verify(&analyze, &copy);
    assert!(ok && said.trim().is_empty(), "systemd-analyze verify: {said}");

    // The check can fail: a misspelt value and an unknown key are reported.
    let broken = dir.path().join("broken.service");
    let text = unit
        .replace("/usr/local/bin/perfplus", PERFPLUS)
        .replace("Type=notify", "Type=notfy\nRestartSecs=5");
    std::fs::write(&broken, text).unwrap();
    let (_, said) = verify(&analyze, &broken);
    assert!(said.contains("notfy") && said.contains("RestartSecs"), "{said}");
}

#[test]
fn the_agent_says_ready_over_notify_socket_once_it_listens() {
    let cluster = Cluster::new();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(BOUND)).unwrap();
    let socket_env = socket_path.to_str().unwrap();
    let agent = TestAgent::start_with_env(
        &cluster.issue("agent", "a"),
        &cluster.dir.path().join("a"),
        "0",
        None,
        &[("NOTIFY_SOCKET", socket_env)],
    );
    let mut buf = vec![0u8; 4096];
    let n = socket.recv(&mut buf).expect("a datagram on NOTIFY_SOCKET");
    let said = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(said.lines().any(|l| l == "READY=1"), "{said:?}");
    let status = said
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .expect("a STATUS= line");
    assert!(status.contains(&format!(":{}", agent.port())), "{status}");
    // Ready means it answers: a request right after READY=1 is served.
    let out = cluster.cli(&["vm", "list", "--agent", &agent.addr]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A NOTIFY_SOCKET nobody listens on does not stop the agent: it says so and serves.
    let lost = TestAgent::start_with_env(
        &cluster.issue("agent", "b"),
        &cluster.dir.path().join("b"),
        "0",
        None,
        &[("NOTIFY_SOCKET", dir.path().join("nobody").to_str().unwrap())],
    );
    let out = cluster.cli(&["vm", "list", "--agent", &lost.addr]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(lost.log_text().contains("NOTIFY_SOCKET"), "{}", lost.log_text());
}

/// `perfplus agent` with `args` and no other option, run to its end (for `--print-config` and refusals).
fn agent_once(args: &[&str]) -> (bool, String, String) {
    let out = perfplus_command(None)
        .arg("agent")
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("PERFPLUS_TLS_DIR")
        .output()
        .expect("running perfplus agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn the_agent_runs_from_its_config_file_and_flags_override_it() {
    let cluster = Cluster::new();
    let state = cluster.dir.path().join("from-file");
    let config = cluster.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "# an agent configured by its file alone\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n\
             tls_dir = \"{}\"\npage_store_size = \"0\"\nmax_vcpus = 2\nmax_vm_memory = \"64M\"\n\
             allow_destinations = [\"b\"]\nlog_level = \"debug\"\n",
            state.display(),
            cluster.issue("agent", "a").display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    // --print-config: the file's values, the defaults for the rest, a flag over the file.
    let (ok, printed, err) = agent_once(&["--config", config, "--print-config", "--max-vcpus", "3"]);
    assert!(ok, "{err}");
    assert!(printed.contains(config), "names the file it read: {printed}");
    for line in [
        "listen = \"127.0.0.1:0\"",
        "max_vcpus = 3",
        "max_vm_memory = \"64M\"",
        "page_store_size = \"0\"",
        "max_unauthenticated = 64",
        "log_format = \"text\"",
    ] {
        assert!(printed.lines().any(|l| l == line), "{line:?} in:\n{printed}");
    }

    // The agent itself, from the file: its quotas hold.
    std::fs::create_dir_all(&state).unwrap();
    let mut command = perfplus_command(None);
    command.args(["agent", "--config", config]).env_remove("RUST_LOG");
    let agent = TestAgent::spawn(command, state.join("agent.log"), None);
    let refused = cluster.cli(&[
        "vm",
        "start",
        "--agent",
        &agent.addr,
        "--name",
        "big",
        "--memory",
        "32M",
        "--vcpus",
        "3",
    ]);
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(text.contains("quota of 2 per VM"), "{text}");
    assert!(
        agent.log_text().contains("DEBUG"),
        "log_level from the file: {}",
        agent.log_text()
    );

    // An unknown key is an error naming the key and the file, before anything starts.
    let bad = cluster.dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:0\"\nmax_vcpu = 2\n").unwrap();
    let (ok, _, err) = agent_once(&["--config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("max_vcpu") && err.contains(bad.to_str().unwrap()), "{err}");
    let (ok, _, err) = agent_once(&["--config", "/nonexistent/perfplus/agent.toml"]);
    assert!(!ok && err.contains("/nonexistent/perfplus/agent.toml"), "{err}");
}

/// `GET /metrics` from `addr`: the body.
fn scrape(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connecting to the metrics endpoint");
    stream.set_read_timeout(Some(BOUND)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("reading the metrics");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The value of the sample `name` (with its labels, as printed) in a scrape.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{metrics}"))
}

/// An agent with metrics on a free port and a JSON log; returns it and its metrics address.
fn observed_agent(cluster: &Cluster, name: &str) -> (TestAgent, String) {
    let agent = TestAgent::start_with(
        &cluster.issue("agent", name),
        &cluster.dir.path().join(name),
        "64M",
        None,
        &["--metrics-listen", "127.0.0.1:0", "--log-format", "json"],
    );
    let line = agent.next_stdout_line(BOUND).expect("the metrics line");
    let addr = line
        .strip_prefix("perfplus agent metrics on http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_string();
    (agent, addr)
}

#[test]
fn metrics_and_the_json_log_follow_a_real_migration() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let (a, a_metrics) = observed_agent(&cluster, "a");
    let (b, b_metrics) = observed_agent(&cluster, "b");
    let before = scrape(&a_metrics);
    assert_eq!(sample(&before, "perfplus_migrations_total{outcome=\"completed\"}"), 0.0);
    assert_eq!(sample(&before, "perfplus_migration_pages_total{kind=\"full\"}"), 0.0);
    cluster.start_guest(&a, "m1", "32M", "dirtier:working-set=8M,rate=2k");
    assert_eq!(sample(&scrape(&a_metrics), "perfplus_vms_hosted"), 1.0);

    let report = cluster.cli_json(&[
        "migrate", "m1", "--from", &a.addr, "--to", &b.addr, "--mode", "precopy", "--json",
    ]);
    assert_sound_report(&report, Expect::PreCopy { pages: 32 * 256 });

    // The source counted the migration by its report.
    let after = scrape(&a_metrics);
    assert_eq!(sample(&after, "perfplus_migrations_total{outcome=\"completed\"}"), 1.0);
    assert_eq!(sample(&after, "perfplus_migrations_total{outcome=\"failed\"}"), 0.0);
    let rounds = report["rounds"].as_array().unwrap();
    let total = |field: &str| rounds.iter().map(|r| r[field].as_u64().unwrap()).sum::<u64>() as f64;
    let by_kind = [
        ("full", total("sent_pages")),
        ("zero", total("skipped_zero")),
        ("held", total("skipped_held")),
        ("unchanged", total("skipped_unchanged")),
    ];
    for (kind, pages) in by_kind {
        let name = format!("perfplus_migration_pages_total{{kind=\"{kind}\"}}");
        assert_eq!(sample(&after, &name), pages, "{kind} pages");
    }
    let counted: f64 = by_kind.iter().map(|(_, n)| n).sum();
    assert_eq!(
        counted,
        total("dirty_pages"),
        "the four kinds add up to the dirty pages"
    );
    assert!(sample(&after, "perfplus_migration_pages_total{kind=\"zero\"}") > 0.0);
    assert_eq!(
        sample(&after, "perfplus_migration_page_bytes_total{kind=\"full\"}"),
        total("sent_pages") * 4121.0
    );
    assert_eq!(
        sample(&after, "perfplus_migration_wire_bytes_total"),
        report["bytes_on_wire"].as_u64().unwrap() as f64
    );
    assert_eq!(
        sample(&after, "perfplus_migration_round_duration_seconds_count"),
        rounds.len() as f64
    );
    assert_eq!(sample(&after, "perfplus_migration_downtime_seconds_count"), 1.0);
    let downtime_s = report["downtime_ms"].as_f64().unwrap() / 1e3;
    assert!((sample(&after, "perfplus_migration_downtime_seconds_sum") - downtime_s).abs() < 1e-9);
    assert_eq!(sample(&after, "perfplus_migration_guest_stall_seconds_count"), 1.0);
    assert_eq!(sample(&after, "perfplus_vms_hosted"), 0.0);
    // The destination counted the arrival, and hosts the VM. It counts once its receiver has the
    // source's report, which may be after the CLI had it.
    support::wait_until(
        std::time::Duration::from_secs(30),
        "the destination to count the arrival",
        || {
            sample(
                &scrape(&b_metrics),
                "perfplus_incoming_migrations_total{result=\"hosted\"}",
            ) == 1.0
        },
    );
    let there = scrape(&b_metrics);
    assert_eq!(
        sample(&there, "perfplus_incoming_migrations_total{result=\"hosted\"}"),
        1.0
    );
    assert_eq!(sample(&there, "perfplus_vms_hosted"), 1.0);
    assert_eq!(sample(&there, "perfplus_migrations_total{outcome=\"completed\"}"), 0.0);

    // The JSON log: every line an object; the migration's lines carry its id, on both sides.
    let id = report["migration_id"].as_str().unwrap();
    for (agent, first, last) in [
        (&a, "migration out starts", "migration out complete"),
        (&b, "migration in starts", "migration in complete"),
    ] {
        let lines: Vec<Value> = agent
            .log_text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let message = |line: &Value| line["fields"]["message"].as_str().unwrap_or("").to_string();
        let start = lines
            .iter()
            .position(|l| message(l).starts_with(first))
            .unwrap_or_else(|| panic!("no {first:?} in {lines:?}"));
        let end = lines
            .iter()
            .position(|l| message(l).starts_with(last))
            .unwrap_or_else(|| panic!("no {last:?} in {lines:?}"));
        assert!(start < end);
        for line in &lines[start..=end] {
            let target = line["target"].as_str().unwrap_or("");
            if target.starts_with("perfplus::migration") || target.starts_with("perfplus::agent") {
                assert_eq!(line["span"]["migration_id"], id, "{line}");
            }
        }
        assert_eq!(lines[start]["span"]["vm"], "m1");
    }
}

#[test]
fn the_console_streams_escaped_and_is_logged_to_a_private_file() {
    if kvm_missing() {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("a");
    // The built-in guest as a kernel file, given a command line it refuses: it prints that line, an
    // escape sequence (ESC [31m) included, on its console.
    let kernel = cluster.dir.path().join("guest.elf");
    let out = cluster.cli(&["guest-image", "--out", kernel.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cluster.cli(&[
        "vm",
        "start",
        "--agent",
        &a.addr,
        "--name",
        "noisy",
        "--memory",
        "16M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "seed=\u{1b}[31mred",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = "bad command line value seed=";
    support::wait_until(BOUND, "the guest's complaint on its console", || {
        cluster.status(&a, "noisy")["console_tail"]
            .as_str()
            .is_some_and(|tail| tail.contains(printed))
    });

    // Escaped by default, raw on request; a reader's certificate may read it.
    let reader = cluster.issue("reader", "watcher");
    let escaped = cluster.cli_as(&reader, &["vm", "console", "noisy", "--agent", &a.addr, "--no-follow"]);
    assert!(escaped.status.success(), "{}", String::from_utf8_lossy(&escaped.stderr));
    let text = String::from_utf8_lossy(&escaped.stdout).to_string();
    assert!(text.contains("seed=\\x1b[31mred"), "{text:?}");
    assert!(
        !escaped.stdout.contains(&0x1b),
        "no raw escape byte reaches the terminal: {text:?}"
    );
    let raw = cluster.cli(&["vm", "console", "noisy", "--agent", &a.addr, "--no-follow", "--raw"]);
    assert!(raw.status.success());
    assert!(String::from_utf8_lossy(&raw.stdout).contains("seed=\u{1b}[31mred"));

    // The log file in the state directory: the raw bytes, mode 0600.
    let log = cluster.dir.path().join("a").join("console").join("noisy.log");
    support::wait_until(BOUND, "the console log file", || {
        std::fs::read(&log).is_ok_and(|bytes| String::from_utf8_lossy(&bytes).contains("seed=\u{1b}[31mred"))
    });
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);

    // Following: the stream stays open until the VM leaves, then the CLI ends by itself.
    let mut follow = support::Spawned::new(
        cluster
            .command_in(None, &["vm", "console", "noisy", "--agent", &a.addr])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = follow.child().stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let first = (0..)
        .map_while(|_| line_rx.recv_timeout(BOUND).ok())
        .find(|line| line.contains(printed));
    assert!(first.is_some(), "the following console shows what the console holds");
    assert!(follow.child().try_wait().unwrap().is_none(), "following: it stays open");
    let out = cluster.cli(&["vm", "stop", "noisy", "--agent", &a.addr]);
    assert!(out.status.success());
    support::wait_until(BOUND, "the console to end when the VM left", || {
        follow.child().try_wait().unwrap().is_some()
    });
    let ended = follow.wait_with_output();
    assert!(ended.status.success(), "{}", String::from_utf8_lossy(&ended.stderr));
    assert!(String::from_utf8_lossy(&ended.stderr).contains("console closed"));
}

#[test]
fn local_operators_use_the_control_socket_without_a_certificate() {
    let cluster = Cluster::new();
    // Its directory does not exist yet: the agent makes it 0700.
    let socket = cluster.dir.path().join("run").join("control.sock");
    let socket_arg = socket.to_str().unwrap();
    let mut a = TestAgent::start_with(
        &cluster.issue("agent", "a"),
        &cluster.dir.path().join("a"),
        "0",
        None,
        &["--control-socket", socket_arg],
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);

    // No credentials at all, and an operator's request is served (a missing VM is the answer, not a
    // refusal of the role).
    let agent = format!("unix:{socket_arg}");
    let local = |args: &[&str]| {
        perfplus_command(None)
            .args(["--tls-dir", "/nonexistent/perfplus-credentials"])
            .args(args)
            .env_remove("PERFPLUS_TLS_DIR")
            .output()
            .unwrap()
    };
    let out = local(&["vm", "list", "--agent", &agent]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no VMs"));
    let out = local(&["vm", "stop", "ghost", "--agent", &agent]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("no VM named \"ghost\""),
        "{text}"
    );
    // Without the socket, the same CLI has no credentials for the TLS port.
    let out = local(&["vm", "list", "--agent", &a.addr]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS credentials"));

    // Another user is refused by the agent itself (SO_PEERCRED), even with the file (and the
    // directories on its way) opened up to it.
    let opened = [cluster.dir.path(), socket.parent().unwrap()];
    for dir in opened {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", PERFPLUS])
        .args(["--tls-dir", "/nonexistent", "vm", "list", "--agent", &agent])
        .output()
        .expect("setpriv (util-linux)");
    assert!(!nobody.status.success(), "{}", String::from_utf8_lossy(&nobody.stdout));
    support::wait_until(BOUND, "the agent's word on the refused uid", || {
        a.log_text().contains("uid 65534")
    });
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    for dir in opened {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    // A second agent cannot take a socket the first serves; once the first is gone, its stale file is
    // replaced.
    let second = perfplus_command(None)
        .args(["--tls-dir"])
        .arg(cluster.issue("agent", "b"))
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--page-store-size",
            "0",
            "--state-dir",
        ])
        .arg(cluster.dir.path().join("b"))
        .args(["--control-socket", socket_arg])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another process serves it"));
    a.kill();
    let b = TestAgent::start_with(
        &cluster.issue("agent", "b"),
        &cluster.dir.path().join("b"),
        "0",
        None,
        &["--control-socket", socket_arg],
    );
    let out = local(&["vm", "list", "--agent", &agent]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(b);
}
