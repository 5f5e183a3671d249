//! Post-copy: the guest runs on the destination before its memory is there.
//!
//! - `perfplus_vmm::demand_paging`: guest RAM's guest view registered with userfaultfd (MISSING and
//!   MINOR modes), holes installed with `UFFDIO_COPY`, pages in the page cache (stale ones rewritten
//!   first) mapped with `UFFDIO_CONTINUE`.
//! - [`demand`]: the destination's per-page state (missing / requested / present), the fault thread,
//!   the pass that maps present pages after the resume, and the loop that installs demanded and pushed
//!   pages, surviving lost connections.
//! - [`supply`]: the source's demand server and background push, reconnecting with back-off.
//! - [`push`]: the push's plan (address order, pages next to recent faults first, paced just under the
//!   measured link rate), without I/O.
//!
//! ```text
//!  source (guest paused, memory kept)          destination (guest running)
//!  demand server  <== PageRequest ==========   fault thread <- uffd <- vCPU faults (MISSING: a hole,
//!                                                 MINOR: a stale page; a present one is mapped here)
//!                 === Pages (requested) ===>   UFFDIO_COPY, or write + UFFDIO_CONTINUE (wakes the vCPU)
//!  push           --- Pages (address order) ->  likewise
//!                 <-- PushAck (bytes applied)   (paces the push)
//!                 <-- AllPresent                only now does the source drop the guest
//! ```
//! The protocol is documented in [`perfplus_protocol`].
pub mod demand;
pub mod push;
pub mod supply;

use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use perfplus_protocol::connection::Connection;
use perfplus_protocol::{Channel, Message};

/// Keepalives on the demand channel, both ways.
pub const PING_INTERVAL: Duration = Duration::from_millis(250);
/// Silence on the demand channel after which a side considers the link lost and starts over.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends `msg` on a post-copy connection, giving up after [`LINK_TIMEOUT`]. A link that is down fills
/// the socket buffer, and an unbounded send would hold the post-copy loop (its keepalives, its time
/// limit, the operator's cancel) until TCP itself gave up, minutes later. A send cut short leaves the
/// connection unusable: the caller treats the link as lost and drops it.
pub async fn send_bounded(conn: &mut Connection, msg: &Message) -> anyhow::Result<()> {
    match tokio::time::timeout(LINK_TIMEOUT, conn.send(msg)).await {
        Ok(result) => result,
        Err(_) => anyhow::bail!(
            "sending {} to {} did not finish within {:.1} s: the link is taken for lost",
            msg.name(),
            conn.peer(),
            LINK_TIMEOUT.as_secs_f64()
        ),
    }
}

/// Connections the agent hands to a running post-copy migration (`PostcopyAttach`).
pub type AttachTx = UnboundedSender<(Connection, Channel)>;
pub type AttachRx = UnboundedReceiver<(Connection, Channel)>;

/// A bitmap (bit `i % 64` of word `i / 64`) of the pages `0..pages` for which `f` holds.
pub fn bitmap_of(pages: u64, f: impl Fn(u64) -> bool) -> Vec<u64> {
    let mut words = vec![0u64; pages.div_ceil(64) as usize];
    for p in 0..pages {
        if f(p) {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    words
}

/// A fresh random migration id (16 hex digits).
pub fn new_migration_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random source");
    hex::encode(bytes)
}
