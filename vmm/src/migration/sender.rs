//! The source: pre-copy rounds while the guest runs, then the switch-over and the
//! commit, on a thread of its own.
//!
//! 1. Hello, and the destination's answer (it checks that it can run this VM).
//! 2. Local: guest RAM's memfd, and nothing else of memory. Otherwise round 0 sends
//!    every page the memfd holds (`SEEK_DATA`: pages never touched are holes here and
//!    zero there), with dirty tracking already on, so that a write during the round is
//!    sent in a later one.
//! 3. Each round collects the pages written since the last and sends them, until the
//!    pages left would take no longer than `downtime_limit_ms` at the measured rate,
//!    rounds stop shrinking the dirty set, or `max_rounds` is reached.
//! 4. Switch-over: the VMM thread pauses the VM (vCPUs and devices) and saves its
//!    state; the last dirty pages, the page hashes (`verify`) and the state follow.
//! 5. The destination builds the VM and says `Ready`. The source commits (it never
//!    runs the guest again), says `Go`, and waits for `Done`.
//!
//! Any failure before the commit resumes the guest here: a dead destination, a broken
//! link, a cancel, a refusal. After the commit the source stays paused: the
//! destination runs the guest, or holds it complete and paused.

use std::time::{Duration, Instant};

use api::migration::{Endpoint, MigrationSendParams};
use api::VmConfig;
use memory::dirty::{DirtyBitmap, DirtyTracker};
use memory::{GuestRam, PAGE_SIZE};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::protocol::{self, Done, Hello, HelloAck, Kind, PageBatch, Switch};
use super::transport::{self, Conn};
use super::{verify, Control, ControlLink, MigrationError, Progress};

/// Rounds in a row without a new smallest dirty set before pre-copy gives up
/// converging and switches over.
const STALE_ROUNDS: u32 = 5;
/// A switch-over that sends pages for less than this is not worth another round.
const SMALL_DOWNTIME_MS: f64 = 1.0;

/// What the source's thread needs.
pub struct SendJob {
    /// The request.
    pub params: MigrationSendParams,
    /// Its destination.
    pub endpoint: Endpoint,
    /// Guest RAM (a second handle on the same mapping).
    pub ram: GuestRam,
    /// Started dirty tracking (none for a local migration).
    pub tracker: Option<Box<dyn DirtyTracker>>,
    /// The configuration the VM runs.
    pub config: VmConfig,
    /// Round 0 sends all of guest RAM, not only the memfd's data: its holes are pages
    /// an external page-fault handler has yet to serve (read through the mapping, they
    /// are served).
    pub whole: bool,
}

/// Starts the source's thread.
pub fn spawn(
    job: SendJob,
    link: ControlLink,
    progress: std::sync::Arc<Progress>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("migration-send".into())
        .spawn(move || {
            let result = run(job, &link, &progress);
            // The VMM thread hears of the end before the API may start another
            // migration (`end` reopens it), so this Abort is always taken before any
            // request of the next one: the channel is in order.
            match &result {
                Ok(()) => {
                    let _ = link.send(Control::Finished);
                }
                Err(Failed::BeforeCommit(_)) => {
                    let _ = link.send(Control::Abort(progress.clone()));
                }
                // The destination may run the guest: this side must not.
                Err(Failed::AfterCommit(_)) => {}
            }
            let result = result.map_err(Failed::into_error);
            if let Err(e) = &result {
                tracing::warn!("migration failed: {e}");
            }
            progress.end(&result);
        })
}

/// A failure, and whether the source had committed.
#[derive(Debug)]
enum Failed {
    BeforeCommit(MigrationError),
    AfterCommit(MigrationError),
}

impl Failed {
    /// The error to report; after the commit it says where the guest is.
    fn into_error(self) -> MigrationError {
        match self {
            Failed::BeforeCommit(e) => e,
            Failed::AfterCommit(e) => MigrationError::Vm(format!(
                "{e}, after the source told the destination to run the guest: the source stays paused; the guest runs on the destination, or waits there complete and paused (resume exactly one of them)"
            )),
        }
    }
}

/// Pages sent and how fast.
struct Pages<'a> {
    conn: Conn,
    ram: &'a GuestRam,
    progress: &'a Progress,
    batch: PageBatch,
    /// Bytes of guest memory sent.
    sent: u64,
    /// Time spent sending them.
    busy: Duration,
    /// Of which copying them out of guest RAM.
    copying: Duration,
    /// Read guest RAM through the mapping rather than the memfd (see `send_range`).
    through_mapping: bool,
    /// Bytes per second at most.
    limit: Option<u64>,
    since: Instant,
}

impl Pages<'_> {
    /// Queues memfd bytes `offset..offset+len`, sending full batches as they fill.
    fn send_range(&mut self, offset: u64, len: u64) -> Result<(), MigrationError> {
        // The pieces come in memfd order, one after the other.
        let mut memfd_at = offset;
        for (addr, n) in self.ram.guest_ranges(offset, len) {
            let mut at = 0u64;
            while at < n {
                let piece = usize::try_from(n - at)
                    .unwrap_or(usize::MAX)
                    .min(protocol::BATCH_BYTES);
                if !self.batch.fits(piece) {
                    self.flush()?;
                }
                let guest = GuestAddress(addr.0 + at);
                let (ram, through_mapping) = (self.ram, self.through_mapping);
                let copy_start = Instant::now();
                // Copied out of guest RAM first: the guest may write the page while it
                // is being sent, and the checksum must cover the bytes that travel.
                // (A later round sends the newer contents.) `pread` on the memfd
                // copies in the kernel without faulting on this process's mapping; a
                // page an external handler has yet to serve reads as a hole that way,
                // so such RAM is read through the mapping, which faults it in.
                self.batch.push(guest.0, piece, |buf| {
                    if through_mapping {
                        let slice = ram.memory().get_slice(guest, piece).map_err(|e| {
                            MigrationError::Vm(format!("guest RAM at {:#x}: {e}", guest.0))
                        })?;
                        slice.copy_to(buf);
                        Ok(())
                    } else {
                        use std::os::unix::fs::FileExt;
                        ram.file().read_exact_at(buf, memfd_at).map_err(|e| {
                            MigrationError::Vm(format!("guest RAM at {:#x}: {e}", guest.0))
                        })
                    }
                })?;
                let took = copy_start.elapsed();
                self.copying += took;
                self.busy += took;
                at += piece as u64;
                memfd_at += piece as u64;
            }
        }
        Ok(())
    }

    fn send_bitmap(&mut self, pages: &DirtyBitmap) -> Result<(), MigrationError> {
        for (first, count) in pages.runs() {
            self.send_range(first as u64 * PAGE_SIZE, count as u64 * PAGE_SIZE)?;
        }
        self.flush()
    }

    /// Sends the batch (a cancel is taken there, between frames).
    fn flush(&mut self) -> Result<(), MigrationError> {
        let bytes = self.batch.data_len() as u64;
        let started = Instant::now();
        self.batch.flush(&mut self.conn)?;
        self.busy += started.elapsed();
        self.sent += bytes;
        if let Some(limit) = self.limit {
            // Ahead of the cap: wait until the bytes sent are due.
            let due = Duration::from_secs_f64(self.sent as f64 / limit as f64);
            let elapsed = self.since.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        let sent = self.sent;
        self.progress.update(|s| s.transferred_bytes = sent);
        Ok(())
    }

    /// Bytes per second while sending (capped when a limit is set), or a guess of
    /// 1 GiB/s before anything was measured.
    fn rate(&self) -> f64 {
        let secs = self.busy.as_secs_f64();
        let measured = if self.sent >= 1 << 20 && secs > 0.0 {
            self.sent as f64 / secs
        } else {
            (1u64 << 30) as f64
        };
        match self.limit {
            Some(limit) => measured.min(limit as f64),
            None => measured,
        }
    }
}

fn run(mut job: SendJob, link: &ControlLink, progress: &Progress) -> Result<(), Failed> {
    let mut tracker = job.tracker.take();
    let before = |e| Failed::BeforeCommit(e);
    let stream = transport::connect(&job.endpoint).map_err(before)?;
    let conn = Conn::new(stream, progress.cancel.clone()).map_err(before)?;
    let mut pages = Pages {
        conn,
        ram: &job.ram,
        progress,
        batch: PageBatch::new(),
        sent: 0,
        busy: Duration::ZERO,
        copying: Duration::ZERO,
        through_mapping: job.whole,
        limit: job
            .params
            .max_bandwidth_mib_s
            .map(|m| m.saturating_mul(1 << 20)),
        since: Instant::now(),
    };
    let mut result = exchange(&job, &mut tracker, link, &mut pages);
    if let Err(Failed::BeforeCommit(e)) = &result {
        if matches!(e, MigrationError::Io { .. } | MigrationError::Closed) {
            if let Some(reason) = pages.conn.peer_reason() {
                result = Err(Failed::BeforeCommit(reason));
            }
        }
    }
    if let Err(Failed::BeforeCommit(e)) = &result {
        if e.worth_telling() {
            pages.conn.send_failure(&e.to_string());
        }
    }
    pages.conn.shutdown();
    result
}

fn exchange(
    job: &SendJob,
    tracker: &mut Option<Box<dyn DirtyTracker>>,
    link: &ControlLink,
    pages: &mut Pages,
) -> Result<(), Failed> {
    let before = |e| Failed::BeforeCommit(e);
    let hello = Hello {
        version: protocol::VERSION,
        ferry_version: env!("CARGO_PKG_VERSION").into(),
        config: job.config.clone(),
        memory: protocol::regions_of(&job.ram),
        local: job.params.local,
        verify: job.params.verify && !job.params.local,
    };
    pages.conn.send_json(Kind::Hello, &hello).map_err(before)?;
    if job.params.local {
        pages.conn.send(Kind::Memfd, &[]).map_err(before)?;
        pages.conn.send_fd(job.ram.file()).map_err(before)?;
    }
    // The destination answers once it has checked the VM and made guest RAM.
    let ack: HelloAck = pages.conn.recv_json(Kind::HelloAck).map_err(before)?;
    if ack.version != protocol::VERSION {
        return Err(before(MigrationError::Protocol(format!(
            "the destination speaks version {}, this ferry {}",
            ack.version,
            protocol::VERSION
        ))));
    }

    let mut carry = None;
    if !job.params.local {
        carry = Some(precopy(job, tracker, pages).map_err(before)?);
    }

    // Switch-over: from here the guest is paused until one side runs it.
    let t = Instant::now();
    let (state, paused_at_ns) = link.ask(Control::Switchover).map_err(before)?;
    tracing::debug!("switch-over: paused and saved in {:?}", t.elapsed());
    if let Some(tracker) = tracker.as_mut() {
        let mut last = tracker
            .collect()
            .map_err(|e| before(MigrationError::Vm(format!("dirty tracking: {e}"))))?;
        if let Some(carry) = carry {
            for p in carry.pages() {
                last.set(p);
            }
        }
        let count = last.count() as u64;
        progress_round(pages.progress, count, 0.0);
        pages.send_bitmap(&last).map_err(before)?;
    }
    if job.params.verify && !job.params.local {
        let hashes =
            verify::hash_data_pages(&job.ram).map_err(|e| before(MigrationError::Verify(e)))?;
        pages
            .conn
            .send(Kind::Hashes, &[&verify::encode(&hashes)])
            .map_err(before)?;
    }
    pages
        .conn
        .send_json(
            Kind::State,
            &Switch {
                state,
                paused_at_ns,
                rounds: pages.progress.status().round,
            },
        )
        .map_err(before)?;
    tracing::debug!("switch-over: state sent after {:?}", t.elapsed());

    pages.conn.recv_empty(Kind::Ready).map_err(before)?;
    tracing::debug!("switch-over: Ready after {:?}", t.elapsed());
    if !pages.progress.commit() {
        return Err(before(MigrationError::Cancelled));
    }
    let after = |e| Failed::AfterCommit(e);
    pages.conn.send(Kind::Go, &[]).map_err(after)?;
    // Unregistering guest RAM takes milliseconds for a large guest: not before the
    // destination runs it. (On a failure, the thread's end drops the tracker before
    // the guest resumes here.)
    if let Some(mut tracker) = tracker.take() {
        let _ = tracker.stop();
    }
    let done: Done = pages.conn.recv_json(Kind::Done).map_err(after)?;
    pages
        .progress
        .update(|s| s.downtime_ms = Some(done.downtime_ms));
    Ok(())
}

fn progress_round(progress: &Progress, remaining: u64, expected_ms: f64) {
    progress.update(|s| {
        s.remaining_dirty_pages = remaining;
        s.expected_downtime_ms = expected_ms;
    });
}

/// Round 0 and the rounds after it, until switch-over is due. Returns the dirty pages
/// collected last and not yet sent.
fn precopy(
    job: &SendJob,
    tracker: &mut Option<Box<dyn DirtyTracker>>,
    pages: &mut Pages,
) -> Result<DirtyBitmap, MigrationError> {
    let tracker = tracker
        .as_mut()
        .ok_or_else(|| MigrationError::Vm("pre-copy needs dirty tracking".into()))?;
    let extents = if job.whole {
        vec![(0, job.ram.size())]
    } else {
        job.ram
            .data_extents()
            .map_err(|e| MigrationError::Vm(e.to_string()))?
    };
    for (offset, len) in extents {
        pages.send_range(offset, len)?;
    }
    pages.flush()?;
    tracing::debug!(
        "round 0: {} MiB in {:?} ({:?} copying out of guest RAM), {:?} since the start",
        pages.sent >> 20,
        pages.busy,
        pages.copying,
        pages.since.elapsed()
    );
    let limit_ms = job.params.downtime_limit_ms as f64;
    // Pages written and not sent since: what a switch-over now would send.
    let mut unsent = DirtyBitmap::new(job.ram.regions());
    let mut previous: Option<DirtyBitmap> = None;
    let mut last_pending = pages.sent / PAGE_SIZE;
    let mut smallest = u64::MAX;
    let mut stale = 0;
    let mut round = 0u32;
    loop {
        round += 1;
        let dirty = tracker
            .collect()
            .map_err(|e| MigrationError::Vm(format!("dirty tracking: {e}")))?;
        unsent.union_with(&dirty);
        let pending = unsent.count() as u64;
        let rate = pages.rate();
        let expected_ms = (pending * PAGE_SIZE) as f64 / rate * 1e3;
        pages.progress.update(|s| {
            s.round = round;
            s.remaining_dirty_pages = pending;
            s.expected_downtime_ms = expected_ms;
            s.throughput_mib_s = rate / (1 << 20) as f64;
        });
        if pending < smallest {
            smallest = pending;
            stale = 0;
        } else {
            stale += 1;
        }
        // Within the limit, one more round is still worth it while rounds halve what
        // is left: a slow writer then stops for well under a millisecond of pages.
        let halving = pending * 2 <= last_pending;
        let fits = expected_ms <= limit_ms && (!halving || expected_ms <= SMALL_DOWNTIME_MS);
        if fits || stale >= STALE_ROUNDS || round > job.params.max_rounds {
            tracing::info!(
                "pre-copy: switching over after round {round}: {pending} pages left, about {expected_ms:.1} ms"
            );
            return Ok(unsent);
        }
        last_pending = pending;
        // A page written in this round and the last is hot: it is sent once, at the
        // switch-over, not every round.
        let mut send = unsent.clone();
        if let Some(previous) = &previous {
            send.remove(&dirty.and(previous));
        }
        pages.send_bitmap(&send)?;
        unsent.remove(&send);
        previous = Some(dirty);
    }
}
