//! The shaped link as the benchmarks check it: its rate measured with iperf3 before any run.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::support::{netns, ShapedLink, Spawned};

/// The link's rate as iperf3 measures it (TCP, 2 s, namespace a → b, server on `port` in b), in
/// Mbit/s; None without iperf3.
pub fn iperf(link: &ShapedLink, port: u16) -> Option<f64> {
    let port = port.to_string();
    let mut cmd = std::process::Command::new("iperf3");
    netns::run_inside(&mut cmd, link.b.name());
    let mut server = Spawned::new(
        cmd.args(["-s", "-1", "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut cmd = std::process::Command::new("iperf3");
    netns::run_inside(&mut cmd, link.a.name());
    let out = cmd
        .args(["-c", ShapedLink::IP_B, "-p", &port, "-t", "2", "-J"])
        .output()
        .ok()?;
    let _ = server.child().wait();
    let json: Value = serde_json::from_slice(&out.stdout).ok()?;
    json["end"]["sum_received"]["bits_per_second"].as_f64().map(|b| b / 1e6)
}
