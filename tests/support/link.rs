//! A shaped link: two network namespaces joined by a veth pair, each end rate-limited with `tc tbf`.

use std::sync::atomic::{AtomicU32, Ordering};

use super::netns::{ip, must, Netns};

/// Namespaces `a` and `b` joined by a veth pair (`<base>a` in `a`, `<base>b` in `b`), addresses
/// [`ShapedLink::IP_A`] and [`ShapedLink::IP_B`], each end shaped to the same rate with tbf.
///
/// Dropping it deletes the veth pair, then both namespaces.
pub struct ShapedLink {
    dev_a: String,
    dev_b: String,
    // Declared after `dev_a`: Drop deletes the veth pair first, then these fields delete the namespaces.
    pub a: Netns,
    pub b: Netns,
}

impl ShapedLink {
    /// The address of namespace `a`'s end. Every link has its own pair of namespaces, so links in
    /// concurrent tests may use the same addresses.
    pub const IP_A: &'static str = "10.77.0.1";
    /// The address of namespace `b`'s end.
    pub const IP_B: &'static str = "10.77.0.2";

    /// A new link shaped to `rate` (a tc rate, e.g. `150mbit`); `tag` (one letter) names it in `ip`
    /// listings. None (with the reason printed) where network namespaces cannot be made here.
    pub fn new(tag: char, rate: &str) -> Option<ShapedLink> {
        static LINKS: AtomicU32 = AtomicU32::new(0);
        assert!(tag.is_ascii_alphabetic(), "link tag {tag:?}: one ASCII letter");
        // Unique on this machine while this process runs; interface names have at most 15 bytes.
        let base = format!(
            "pp{tag}{}-{}",
            std::process::id(),
            LINKS.fetch_add(1, Ordering::Relaxed)
        );
        assert!(base.len() < 15, "link name {base} too long for an interface name");
        let a = match Netns::create(&format!("{base}a")) {
            Ok(ns) => ns,
            Err(reason) => {
                eprintln!("SKIPPED: cannot create network namespaces ({reason})");
                return None;
            }
        };
        let b = Netns::create(&format!("{base}b")).expect("a second network namespace");
        let (dev_a, dev_b) = (format!("{base}a"), format!("{base}b"));
        must(&[
            "ip",
            "link",
            "add",
            &dev_a,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &dev_b,
            "netns",
            b.name(),
        ]);
        let link = ShapedLink {
            dev_a,
            dev_b: dev_b.clone(),
            a,
            b,
        };
        for (ns, dev, ip) in [(&link.a, &link.dev_a, Self::IP_A), (&link.b, &dev_b, Self::IP_B)] {
            let ns = ns.name();
            must(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            // Burst 256 KiB (2 ms at 1 Gbit/s): over the largest packet the veth hands tbf (a 64 KiB
            // TSO/GSO packet plus its headers). tbf splits any packet over its burst into MTU-sized
            // ones in software, on the CPU that also runs the guests and agents, as a real NIC does not
            // (it segments in hardware): with burst 64 KiB every full-size packet was split, and
            // ksoftirqd took a share of the vCPU's core. Measured on the shaped bench (moderate,
            // perfplus alone, 1 Gbit/s): guest's longest stall 13-24 ms at 64 KiB against 3-4 ms at
            // 256 KiB (with the felt probe's scanner no longer waking every 0.5 ms, changed in the same
            // batch), total 2.6 s against 1.7 s; iperf3 953 and 957 Mbit/s.
            must(&[
                "tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb", "latency",
                "50ms",
            ]);
        }
        Some(link)
    }

    /// Takes `a`'s end of the link down (a cut) or up again.
    pub fn set_up(&self, up: bool) {
        must(&[
            "ip",
            "-n",
            self.a.name(),
            "link",
            "set",
            &self.dev_a,
            if up { "up" } else { "down" },
        ]);
    }
}

impl ShapedLink {
    /// Bytes the qdiscs of both ends have sent so far (tc's counters: every byte on the wire, both
    /// ways, headers included).
    pub fn bytes_sent(&self) -> u64 {
        [(&self.a, &self.dev_a), (&self.b, &self.dev_b)]
            .iter()
            .map(|(ns, dev)| {
                let out = std::process::Command::new("tc")
                    .args(["-n", ns.name(), "-s", "qdisc", "show", "dev", dev])
                    .output()
                    .expect("tc -s qdisc show");
                let text = String::from_utf8_lossy(&out.stdout);
                text.split_once("Sent ")
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        // Deleting one end deletes the pair, even while a process still holds a namespace.
        let _ = ip(&["-n", self.a.name(), "link", "del", &self.dev_a]);
    }
}
