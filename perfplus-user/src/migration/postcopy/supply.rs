//! Source side of post-copy, after the destination answered `Running`: serve page requests on the
//! demand channel, push every other missing page on the bulk connection, and never give the guest up.
//!
//! Which page is pushed next and when is [`super::push::PushPlan`]'s business (per-page state, order,
//! pacing). A request for a page already sent is not answered (the page is on its way), so a page
//! crosses the network once unless a connection is lost with it in flight (then the destination's
//! `ResumeState` says it is missing and it is sent again, counted in `pages_resent`).
//!
//! A lost link (an error, or 2 s without a keepalive) is retried with back-off (0.1 s doubling to 5 s;
//! `MigrateResume` from a CLI retries at once) until the migration's post-copy time limit
//! (`MigrateOptions::postcopy_timeout_ms`) has passed without a link, or an operator cancels: then the
//! supply ends with [`Outcome::broken`] set, and the guest's memory stays here (paused, stale since the
//! switch). It is kept until `AllPresent` otherwise.
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use perfplus_common::guest_abi::STATUS_PAGE_GPA;
use perfplus_common::PAGE_SIZE;
use tokio::sync::Notify;

use super::push::{PageState, PushPlan, PUSH_BATCH};
use super::{send_bounded, LINK_TIMEOUT, PING_INTERVAL};
use crate::fault_injection;
use crate::migration::outbound::Outbound;
use crate::migration::page_sender::{PageDecision, PageSender};
use perfplus_protocol::connection::Connection;
use perfplus_protocol::frame::PageBatch;
use perfplus_protocol::{Channel, Message, PostcopyAttach, Role};
use perfplus_vmm::PageSet;

/// What pre-copy hands over at the switch.
pub struct Handoff {
    pub demand: Connection,
    pub missing: PageSet,
    pub sender: PageSender,
    /// Link rate measured by the pre-copy rounds, bytes/s.
    pub link_rate: Option<f64>,
    /// Pages sent with the switch (already `SENT`).
    pub eager: Vec<u64>,
}

/// What the post-copy phase did, for the report.
#[derive(Default, Debug)]
pub struct Outcome {
    /// Pages of the guest.
    pub guest_pages: u64,
    pub postcopy_pages: u64,
    pub pages_demanded: u64,
    pub pages_pushed: u64,
    pub pages_resent: u64,
    /// References the destination could not resolve, sent again in full.
    pub refs_resent: u64,
    pub full_pages: u64,
    pub reconnects: u32,
    /// Bytes moved on connections that are closed now (the demand channels, lost bulk connections).
    pub other_connection_bytes: u64,
    /// Set when post-copy ended before the destination had every page: why, and how many pages it
    /// still lacked as far as the source knows.
    pub broken: Option<Broken>,
}

/// Post-copy that ended without `AllPresent`.
#[derive(Debug)]
pub struct Broken {
    pub why: String,
    /// Pages the destination lacked at its last acknowledgement.
    pub missing: u64,
}

/// The pages to send with the switch, before the vCPU state: the guest's status page (the agent reads
/// it, and must not fault on it), if it is missing.
pub fn eager_pages(missing: &PageSet) -> Vec<u64> {
    let status = STATUS_PAGE_GPA / PAGE_SIZE as u64;
    if status < missing.capacity() && missing.contains(status) {
        vec![status]
    } else {
        Vec::new()
    }
}

/// Adds `page` to `batch` as the destination needs it (never "unchanged": it has nothing there).
/// Returns true if the content went in full.
fn add_page(job: &Outbound, sender: &mut PageSender, page: u64, batch: &mut PageBatch) -> bool {
    let mut data = [0u8; PAGE_SIZE];
    job.vm.memory().read_page(page, &mut data);
    match sender.add(page, &data, batch) {
        PageDecision::Full => true,
        PageDecision::Unchanged => {
            // Cannot happen for a forgotten page; send it in full rather than nothing.
            sender.add_full(page, &data, batch);
            true
        }
        PageDecision::Zero | PageDecision::Held => false,
    }
}

/// Adds `pages` to `batch` as [`add_page`] does, hashing them together ([`PageSender::inspect_many`]).
/// Returns how many went in full.
fn add_pages(job: &Outbound, sender: &mut PageSender, pages: &[u64], batch: &mut PageBatch) -> u64 {
    let mut data = vec![[0u8; PAGE_SIZE]; pages.len()];
    for (&page, buf) in pages.iter().zip(data.iter_mut()) {
        job.vm.memory().read_page(page, buf);
    }
    let contents = sender.inspect_many(&data);
    let mut full = 0;
    for ((&page, buf), content) in pages.iter().zip(&data).zip(contents) {
        match sender.add_inspected(page, buf, content, batch) {
            PageDecision::Full => full += 1,
            PageDecision::Unchanged => {
                // Cannot happen for a forgotten page; send it in full rather than nothing.
                sender.add_full(page, buf, batch);
                full += 1;
            }
            PageDecision::Zero | PageDecision::Held => {}
        }
    }
    full
}

/// Sends the eager pages in full (the caller sends the VM state next). In full: the sender's idea of
/// what the destination holds is not up to date yet at that point of the switch.
pub async fn send_eager(
    job: &Outbound,
    conn: &mut Connection,
    sender: &mut PageSender,
    eager: &[u64],
) -> anyhow::Result<()> {
    if eager.is_empty() {
        return Ok(());
    }
    let mut batch = PageBatch::with_capacity(eager.len());
    let mut data = [0u8; PAGE_SIZE];
    for &page in eager {
        job.vm.memory().read_page(page, &mut data);
        sender.add_full(page, &data, &mut batch);
    }
    conn.send(&Message::Pages(batch)).await
}

/// Opens the demand channel of migration `id`.
pub async fn attach(job: &Outbound, id: &str, channel: Channel) -> anyhow::Result<Connection> {
    let mut conn = Connection::connect_timeout(&job.destination, Role::Peer, &job.credentials, Duration::from_secs(3))
        .await
        .with_context(|| format!("connecting to destination agent {}", job.destination))?;
    conn.send(&Message::PostcopyAttach(PostcopyAttach {
        id: id.to_string(),
        channel,
        secret: job.attach_secret,
    }))
    .await?;
    Ok(conn)
}

enum Event {
    Demand(anyhow::Result<Message>),
    Bulk(anyhow::Result<Message>),
    Tick,
    Push,
    PaceWait,
    Cancel,
}

/// Runs post-copy until the destination has every page. A lost link is retried until it comes back
/// (the guest cannot continue anywhere else) or the post-copy time limit passes without it; an
/// operator's cancel ends it too. `bulk` is replaced on a reconnection.
pub async fn run(
    job: &Outbound,
    id: &str,
    bulk: &mut Connection,
    handoff: Handoff,
    resume: &Notify,
) -> (Outcome, PageSender) {
    let mut outcome = Outcome {
        guest_pages: handoff.missing.capacity(),
        postcopy_pages: handoff.missing.count(),
        ..Default::default()
    };
    let mut sender = handoff.sender;
    let mut push = PushPlan::new(&handoff.missing, handoff.link_rate, Instant::now());
    for &p in &handoff.eager {
        push.mark_sent(p);
        outcome.pages_pushed += 1;
        outcome.full_pages += 1;
    }
    let mut demand = Some(handoff.demand);
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::from_millis(100);
    let mut exhausted = false;
    let limit = Duration::from_millis(job.options.postcopy_timeout_ms);
    // When the link was last known up, while it is down.
    let mut down_since: Option<Instant> = None;
    // Pages the destination has, as of its last acknowledgement.
    let mut present = outcome.guest_pages - outcome.postcopy_pages;
    let broken = |mut outcome: Outcome, why: String, present: u64| {
        let missing = outcome.guest_pages.saturating_sub(present);
        tracing::error!(id, missing, "post-copy broken: {why}");
        outcome.broken = Some(Broken { why, missing });
        outcome
    };
    loop {
        let Some(dem) = demand.as_mut() else {
            let since = *down_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= limit {
                let why = format!(
                    "no link to the destination for {:.1} s (the post-copy time limit)",
                    since.elapsed().as_secs_f64()
                );
                return (broken(outcome, why, present), sender);
            }
            // Link lost: reconnect with back-off, or at once when asked to resume.
            tokio::select! {
                _ = tokio::time::sleep(backoff.min(limit.saturating_sub(since.elapsed()))) => {}
                _ = resume.notified() => tracing::info!(id, "resume requested"),
                _ = job.cancel.cancelled() => {
                    return (broken(outcome, "cancelled by an operator".into(), present), sender);
                }
            }
            match reconnect(job, id).await {
                Ok((new_bulk, new_demand, missing)) => {
                    outcome.other_connection_bytes += bulk.bytes_sent() + bulk.bytes_received();
                    *bulk = new_bulk;
                    let (now_missing, resent) = push.restart(&missing, Instant::now(), |p| sender.forget(p));
                    outcome.pages_resent += resent;
                    exhausted = false;
                    outcome.reconnects += 1;
                    backoff = Duration::from_millis(100);
                    last_heard = Instant::now();
                    down_since = None;
                    present = push.pages() - now_missing;
                    tracing::info!(id, missing = now_missing, "post-copy link back, resuming");
                    fault_injection::reached("source:postcopy-resume").await;
                    if now_missing == 0 {
                        // The destination has everything: it wants to finish on this connection.
                        return (finish(outcome, new_demand), sender);
                    }
                    demand = Some(new_demand);
                }
                Err(e) => {
                    tracing::warn!(
                        id,
                        "post-copy reconnection failed (retrying in {:?}): {e:#}",
                        backoff * 2
                    );
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            continue;
        };
        let can_push = !exhausted && push.can_push();
        let paced = can_push && push.next_send() > Instant::now();
        let event = tokio::select! {
            biased;
            msg = dem.recv() => Event::Demand(msg),
            msg = bulk.recv() => Event::Bulk(msg),
            _ = tick.tick() => Event::Tick,
            _ = tokio::time::sleep_until(push.next_send().into()), if paced => Event::PaceWait,
            _ = std::future::ready(()), if can_push && !paced => Event::Push,
            _ = job.cancel.cancelled() => Event::Cancel,
        };
        let lost: Option<anyhow::Error> = match event {
            Event::Demand(Ok(Message::PageRequest { full, pages: wanted })) => {
                last_heard = Instant::now();
                serve(job, &mut sender, &mut push, &mut outcome, dem, full, &wanted)
                    .await
                    .err()
            }
            Event::Demand(Ok(Message::Ping)) => {
                last_heard = Instant::now();
                None
            }
            Event::Demand(Ok(other)) => Some(anyhow::anyhow!(
                "destination sent {} on the demand channel",
                other.describe()
            )),
            Event::Demand(Err(e)) | Event::Bulk(Err(e)) => Some(e),
            Event::Bulk(Ok(Message::PushAck { bytes, present: now })) => {
                push.on_ack(bytes, Instant::now());
                present = now;
                None
            }
            Event::Cancel => {
                return (broken(outcome, "cancelled by an operator".into(), present), sender);
            }
            Event::Bulk(Ok(Message::AllPresent)) => {
                return (finish(outcome, demand.take().expect("demand up")), sender)
            }
            Event::Bulk(Ok(other)) => Some(anyhow::anyhow!(
                "destination sent {} on the bulk channel",
                other.describe()
            )),
            Event::Tick => {
                if last_heard.elapsed() > LINK_TIMEOUT {
                    Some(anyhow::anyhow!(
                        "nothing from the destination for {:.1} s",
                        last_heard.elapsed().as_secs_f64()
                    ))
                } else {
                    send_bounded(dem, &Message::Ping).await.err()
                }
            }
            Event::PaceWait => None,
            Event::Push => {
                let mut batch = PageBatch::with_capacity(PUSH_BATCH);
                let mut pages = Vec::with_capacity(PUSH_BATCH);
                while pages.len() < PUSH_BATCH {
                    let Some(p) = push.next_page() else {
                        exhausted = true;
                        break;
                    };
                    push.mark_sent(p);
                    pages.push(p);
                }
                outcome.full_pages += add_pages(job, &mut sender, &pages, &mut batch);
                outcome.pages_pushed += pages.len() as u64;
                if batch.is_empty() {
                    None
                } else {
                    let (len, before) = (batch.payload_len() as u64, bulk.bytes_sent());
                    match send_bounded(bulk, &Message::Pages(batch)).await {
                        Ok(()) => {
                            push.after_send(len, bulk.bytes_sent() - before, Instant::now());
                            fault_injection::reached("source:postcopy-push").await;
                            None
                        }
                        Err(e) => Some(e),
                    }
                }
            }
        };
        if let Some(err) = lost {
            tracing::warn!(
                id,
                "post-copy link lost; the source keeps the guest's memory and reconnects: {err:#}"
            );
            if let Some(d) = demand.take() {
                outcome.other_connection_bytes += d.bytes_sent() + d.bytes_received();
            }
            down_since = Some(last_heard);
        }
    }
}

fn finish(mut outcome: Outcome, demand: Connection) -> Outcome {
    outcome.other_connection_bytes += demand.bytes_sent() + demand.bytes_received();
    outcome
}

/// Answers one page request on the demand channel.
async fn serve(
    job: &Outbound,
    sender: &mut PageSender,
    push: &mut PushPlan,
    outcome: &mut Outcome,
    demand: &mut Connection,
    full: bool,
    wanted: &[u64],
) -> anyhow::Result<()> {
    let pages = push.pages();
    let mut batch = PageBatch::with_capacity(wanted.len().min(PUSH_BATCH));
    for &page in wanted {
        if page >= pages {
            bail!("destination requested page {page}, but the guest has {pages} pages");
        }
        let slot = push.state(page);
        if full {
            // A reference the destination could not resolve: the content, whatever it was told before.
            let mut data = [0u8; PAGE_SIZE];
            job.vm.memory().read_page(page, &mut data);
            sender.add_full(page, &data, &mut batch);
            outcome.refs_resent += 1;
            outcome.full_pages += 1;
        } else if slot == PageState::Sent {
            // On its way already (pushed, or requested twice): it arrives without being sent again.
            continue;
        } else {
            if slot == PageState::NotNeeded {
                // The destination should have it; send it anyway rather than leave a vCPU waiting.
                tracing::warn!(page, "destination requested a page it was not missing");
                sender.forget(page);
                outcome.pages_resent += 1;
            }
            if add_page(job, sender, page, &mut batch) {
                outcome.full_pages += 1;
            }
            outcome.pages_demanded += 1;
        }
        push.mark_sent(page);
        // The pages after a fault are likely next: push them first.
        push.prioritize_after(page);
        if batch.len() >= PUSH_BATCH {
            let full_batch = std::mem::replace(&mut batch, PageBatch::with_capacity(PUSH_BATCH));
            send_bounded(demand, &Message::Pages(full_batch)).await?;
        }
    }
    if !batch.is_empty() {
        send_bounded(demand, &Message::Pages(batch)).await?;
        fault_injection::reached("source:postcopy-demand").await;
    }
    Ok(())
}

/// A new bulk connection (answered with the pages still missing) and a new demand channel.
async fn reconnect(job: &Outbound, id: &str) -> anyhow::Result<(Connection, Connection, PageSet)> {
    let mut bulk = attach(job, id, Channel::Bulk).await?;
    let missing = match tokio::time::timeout(Duration::from_secs(5), bulk.recv()).await {
        Ok(Ok(Message::ResumeState { missing })) => missing,
        Ok(Ok(other)) => bail!("destination answered the resume with {}", other.describe()),
        Ok(Err(e)) => return Err(e.context("waiting for the destination's resume state")),
        Err(_) => bail!("no resume state from the destination within 5 s"),
    };
    let pages = job.memory_bytes / PAGE_SIZE as u64;
    if missing.len() as u64 != pages.div_ceil(64) {
        bail!(
            "destination's resume bitmap has {} words for {pages} pages",
            missing.len()
        );
    }
    let missing = PageSet::from_bitmap(missing, pages);
    let demand = attach(job, id, Channel::Demand).await?;
    Ok((bulk, demand, missing))
}
