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

use std::sync::atomic::Ordering;

use api::migration::MigrationMode;

use super::postcopy::{self, Outgoing};
use super::protocol::{self, Channel, Done, Hello, HelloAck, Kind, PageBatch, Switch};
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
            // Started by the confined VMM thread: its filter is this thread's.
            seccomp::inherit();
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
                // The destination may run the guest: this side must not, unless
                // asked to.
                Err(Failed::AfterCommit(_) | Failed::Postcopy(_)) => {}
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
    /// After the commit, while the destination ran the guest and fetched its memory.
    Postcopy(MigrationError),
}

impl Failed {
    /// The error to report; after the commit it says where the guest is.
    fn into_error(self) -> MigrationError {
        match self {
            Failed::BeforeCommit(e) => e,
            Failed::AfterCommit(e) => MigrationError::Vm(format!(
                "{e}, after the source told the destination to run the guest: the source stays paused; the guest runs on the destination, or waits there complete and paused (resume exactly one of them)"
            )),
            Failed::Postcopy(e) => MigrationError::Vm(format!(
                "{e}, during post-copy: the guest is paused here with all of its memory as it was at the switch-over; the destination freezes its copy when its link breaks or falls silent for {} s (this side waits {} s); resume the guest here (PATCH /vm) or send it again (PUT /migration/send)",
                transport::DESTINATION_STALL_TIMEOUT.as_secs(),
                transport::STALL_TIMEOUT.as_secs()
            )),
        }
    }
}

/// Copies guest RAM at `guest` into `buf`, through the mapping: about 0.2-0.5 µs a
/// page here where `pread` on the memfd took 0.6-0.8 (the kernel looks each page up in
/// the file; round 0 of 40 MiB spent 9-12 ms copying that way, 3.4-5.6 ms this way),
/// and a page an external handler has yet to serve is faulted in, not read as a hole.
pub fn copy_out(ram: &GuestRam, guest: GuestAddress, buf: &mut [u8]) -> Result<(), MigrationError> {
    let slice = ram
        .memory()
        .get_slice(guest, buf.len())
        .map_err(|e| MigrationError::Vm(format!("guest RAM at {:#x}: {e}", guest.0)))?;
    slice.copy_to(buf);
    Ok(())
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
    /// Bytes per second at most.
    limit: Option<u64>,
    since: Instant,
}

impl Pages<'_> {
    /// Queues memfd bytes `offset..offset+len`, sending full batches as they fill.
    fn send_range(&mut self, offset: u64, len: u64) -> Result<(), MigrationError> {
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
                let ram = self.ram;
                let copy_start = Instant::now();
                // Copied out of guest RAM first: the guest may write the page while it
                // is being sent, and the checksum must cover the bytes that travel.
                // (A later round sends the newer contents.)
                self.batch
                    .push(guest.0, piece, |buf| copy_out(ram, guest, buf))?;
                let took = copy_start.elapsed();
                self.copying += took;
                self.busy += took;
                at += piece as u64;
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
        limit: job
            .params
            .max_bandwidth_mib_s
            .map(|m| m.saturating_mul(1 << 20)),
        since: Instant::now(),
    };
    let mut result = exchange(&job, &mut tracker, link, &mut pages);
    if let Err(Failed::BeforeCommit(e) | Failed::Postcopy(e)) = &mut result {
        if matches!(e, MigrationError::Io { .. } | MigrationError::Closed) {
            if let Some(reason) = pages.conn.peer_reason() {
                *e = reason;
            }
        }
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
    let postcopy_mode = job.params.mode != MigrationMode::Precopy;
    let token = (postcopy_mode || job.params.postcopy_fallback).then(|| {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    let hello = Hello {
        version: protocol::VERSION,
        ferry_version: env!("CARGO_PKG_VERSION").into(),
        config: job.config.clone(),
        memory: protocol::regions_of(&job.ram),
        local: job.params.local,
        verify: job.params.verify && !job.params.local,
        fault_channel: token,
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
    // Post-copy's page requests get a stream of their own, so that they and their
    // answers never queue behind bulk pages.
    let fault_conn = match token {
        Some(token) => {
            let stream = transport::connect(&job.endpoint).map_err(before)?;
            let mut conn = Conn::new(stream, pages.progress.cancel.clone()).map_err(before)?;
            conn.send_json(Kind::Channel, &Channel { token })
                .map_err(before)?;
            Some(conn)
        }
        None => None,
    };

    let mut carry = None;
    let mut go_postcopy = job.params.mode == MigrationMode::Postcopy;
    match job.params.mode {
        _ if job.params.local => {}
        MigrationMode::Postcopy => {}
        MigrationMode::Precopy => {
            let (unsent, converged) = precopy(job, tracker, pages, None).map_err(before)?;
            go_postcopy = !converged && job.params.postcopy_fallback;
            carry = Some(unsent);
        }
        MigrationMode::Hybrid => {
            let rounds = job.params.precopy_rounds.unwrap_or(1);
            carry = Some(
                precopy(job, tracker, pages, Some(rounds))
                    .map_err(before)?
                    .0,
            );
            go_postcopy = true;
        }
    }

    // A pure post-copy lists the pages that hold data while the guest is paused: walk
    // them once now, so that the pause walks only what was a hole here.
    let earlier = if go_postcopy && tracker.is_none() && !job.whole {
        Some(job.ram.tracked().data_pages().map_err(|e| {
            before(MigrationError::Vm(format!(
                "cannot list guest RAM's pages: {e}"
            )))
        })?)
    } else {
        None
    };
    // The destination finishes making its VM (registering guest RAM with KVM takes
    // milliseconds at 4 GiB) before the guest pauses here, not while it is paused.
    // A pure post-copy lets the destination make room for those pages meanwhile: it
    // places them far faster into pages that exist (postcopy.rs).
    let room = match &earlier {
        Some(runs) => {
            let mut b = DirtyBitmap::new(job.ram.regions());
            for &(first, count) in runs {
                b.set_run(first, count);
            }
            protocol::encode_ranges(&super::postcopy::guest_ranges(&job.ram, &b))
        }
        None => Vec::new(),
    };
    let t = Instant::now();
    pages.conn.send(Kind::Prepare, &[&room]).map_err(before)?;
    pages.conn.recv_empty(Kind::Prepared).map_err(before)?;
    tracing::debug!("switch-over: the destination prepared in {:?}", t.elapsed());
    // Switch-over: from here the guest is paused until one side runs it.
    let t = Instant::now();
    let (state, paused_at_ns) = link.ask(Control::Switchover).map_err(before)?;
    tracing::debug!("switch-over: paused and saved in {:?}", t.elapsed());
    let mut last = match tracker.as_mut() {
        Some(tracker) => Some(
            tracker
                .collect()
                .map_err(|e| before(MigrationError::Vm(format!("dirty tracking: {e}"))))?,
        ),
        None => None,
    };
    if let (Some(last), Some(carry)) = (last.as_mut(), carry) {
        last.union_with(&carry);
    }
    let mut lacks = None;
    if go_postcopy {
        // The destination lacks what pre-copy left unsent, or every page that holds
        // data when nothing was sent.
        let missing = match last {
            Some(last) => last,
            None => all_data_pages(job, earlier.as_deref()).map_err(before)?,
        };
        let count = missing.count() as u64;
        tracing::debug!(
            "switch-over: {count} missing pages listed after {:?}",
            t.elapsed()
        );
        pages.progress.update(|s| {
            s.postcopy = true;
            s.remaining_pages = count;
        });
        tracing::info!("post-copy: the destination runs the guest; {count} pages follow");
        lacks = Some(missing);
    } else {
        if let Some(last) = last {
            let count = last.count() as u64;
            tracing::debug!(
                "switch-over: {count} last pages collected after {:?}",
                t.elapsed()
            );
            progress_round(pages.progress, count, 0.0);
            pages.send_bitmap(&last).map_err(before)?;
            tracing::debug!("switch-over: last pages sent after {:?}", t.elapsed());
        }
        if job.params.verify && !job.params.local {
            let hashes =
                verify::hash_data_pages(&job.ram).map_err(|e| before(MigrationError::Verify(e)))?;
            pages
                .conn
                .send(Kind::Hashes, &[&verify::encode(&hashes)])
                .map_err(before)?;
        }
    }
    pages
        .conn
        .send_json(
            Kind::State,
            &Switch {
                state,
                paused_at_ns,
                rounds: pages.progress.status().round,
                postcopy: lacks.is_some(),
            },
        )
        .map_err(before)?;
    // Post-copy: what the destination lacks follows the state.
    if let Some(missing) = &lacks {
        let ranges = super::postcopy::guest_ranges(&job.ram, missing);
        pages
            .conn
            .send(Kind::Missing, &[&protocol::encode_ranges(&ranges)])
            .map_err(before)?;
    }
    tracing::debug!("switch-over: state sent after {:?}", t.elapsed());

    pages.conn.recv_empty(Kind::Ready).map_err(before)?;
    tracing::debug!("switch-over: Ready after {:?}", t.elapsed());
    if !pages.progress.commit() {
        return Err(before(MigrationError::Cancelled));
    }
    let after = |e| Failed::AfterCommit(e);
    let during = |e| Failed::Postcopy(e);
    pages
        .conn
        .send(Kind::Go, &[])
        .map_err(if lacks.is_some() { during } else { after })?;
    let done: Done;
    match (lacks, fault_conn) {
        (Some(lacks), Some(fault_conn)) => {
            done = postcopy(job, pages, lacks, fault_conn).map_err(during)?;
        }
        (Some(_), None) => {
            return Err(during(MigrationError::Vm(
                "post-copy without a fault stream".into(),
            )))
        }
        (None, _) => done = pages.conn.recv_json(Kind::Done).map_err(after)?,
    }
    // Unregistering guest RAM takes milliseconds for a large guest, and on two cores
    // it would compete with the destination resuming: only once the guest runs there.
    // (On a failure, the thread's end drops the tracker before the guest resumes here.)
    if let Some(mut tracker) = tracker.take() {
        let _ = tracker.stop();
    }
    pages
        .progress
        .update(|s| s.downtime_ms = Some(done.downtime_ms));
    Ok(())
}

/// Every page of guest RAM that holds data (all of it when an external handler
/// serves it: its holes are pages not yet served), given a listing from `earlier`.
fn all_data_pages(
    job: &SendJob,
    earlier: Option<&[(usize, usize)]>,
) -> Result<DirtyBitmap, MigrationError> {
    let mut b = DirtyBitmap::new(job.ram.regions());
    if job.whole {
        b.set_run(0, memory::dirty::total_pages(job.ram.regions()));
        return Ok(b);
    }
    let ram = job.ram.tracked();
    let runs = match earlier {
        Some(earlier) => ram.data_pages_since(earlier),
        None => ram.data_pages(),
    }
    .map_err(|e| MigrationError::Vm(format!("cannot list guest RAM's pages: {e}")))?;
    for (first, count) in runs {
        b.set_run(first, count);
    }
    Ok(b)
}

/// After Go: answers page requests on a thread of its own and pushes every other
/// missing page here, until the destination holds them all. Returns the
/// destination's `Done`.
fn postcopy(
    job: &SendJob,
    pages: &mut Pages,
    lacks: DirtyBitmap,
    fault_conn: Conn,
) -> Result<Done, MigrationError> {
    let out = Outgoing::new(&job.ram, lacks);
    pages.conn.share_cores();
    let answer_error: std::sync::Mutex<Option<MigrationError>> = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        let answering = std::thread::Builder::new()
            .name("postcopy-answer".into())
            .spawn_scoped(scope, || {
                postcopy::serve_first();
                seccomp::apply(seccomp::Thread::Memory);
                if let Err(e) = out.answer(fault_conn) {
                    tracing::warn!("post-copy: answering page requests: {e}");
                    *answer_error.lock().expect("poisoned") = Some(e);
                    // The pusher sees it between batches.
                    out.stop.store(true, Ordering::Release);
                }
            })
            .map_err(|e| MigrationError::Vm(format!("cannot start a thread: {e}")));
        let result = answering.and_then(|_| push(&out, pages, &answer_error));
        out.stop.store(true, Ordering::Release);
        // The answering thread ends at its next poll.
        result
    })
}

/// The pusher: every page still to send, from the latest request on, then the end
/// of post-copy on the main stream.
fn push(
    out: &Outgoing,
    pages: &mut Pages,
    answer_error: &std::sync::Mutex<Option<MigrationError>>,
) -> Result<Done, MigrationError> {
    let total = memory::dirty::total_pages(pages.ram.regions());
    let mut cursor = 0usize;
    let mut last_hint = usize::MAX;
    let mut pushed = 0u64;
    let mut published = Instant::now();
    loop {
        if out.stop.load(Ordering::Acquire) {
            return Err(answer_error
                .lock()
                .expect("poisoned")
                .take()
                .unwrap_or_else(|| MigrationError::Vm("the page-request thread ended".into())));
        }
        let hint = out.hint.load(Ordering::Acquire);
        if hint != last_hint {
            last_hint = hint;
            cursor = hint;
        }
        let Some(first) = out.todo.next(cursor) else {
            break;
        };
        let mut count = 0;
        while count < protocol::MAX_RANGES && first + count < total && out.todo.take(first + count)
        {
            count += 1;
        }
        cursor = first + count.max(1);
        if count == 0 {
            continue;
        }
        pages.send_range(first as u64 * PAGE_SIZE, count as u64 * PAGE_SIZE)?;
        pushed += count as u64;
        if published.elapsed() >= Duration::from_millis(100) {
            publish(out, pages, pushed);
            published = Instant::now();
        }
    }
    pages.flush()?;
    publish(out, pages, pushed);
    pages.conn.send(Kind::PushDone, &[])?;
    let done: Done = pages.conn.recv_json(Kind::Done)?;
    pages.conn.recv_empty(Kind::Complete)?;
    pages.conn.send(Kind::CompleteAck, &[])?;
    publish(out, pages, pushed);
    Ok(done)
}

fn publish(out: &Outgoing, pages: &Pages, pushed: u64) {
    let sent = pages.sent + out.answered_bytes.load(Ordering::Relaxed);
    pages.progress.update(|s| {
        s.transferred_bytes = sent;
        s.pages_pushed = pushed;
        s.pages_requested = out.requested.load(Ordering::Relaxed);
        s.postcopy_faults = out.faults.load(Ordering::Relaxed);
        s.remaining_pages = out.todo.count();
    });
}

fn progress_round(progress: &Progress, remaining: u64, expected_ms: f64) {
    progress.update(|s| {
        s.remaining_dirty_pages = remaining;
        s.expected_downtime_ms = expected_ms;
    });
}

/// Round 0 and the rounds after it, until switch-over is due, or after `rounds`
/// rounds (hybrid). Returns the dirty pages collected last and not yet sent, and
/// whether they fit the downtime limit.
fn precopy(
    job: &SendJob,
    tracker: &mut Option<Box<dyn DirtyTracker>>,
    pages: &mut Pages,
    rounds: Option<u32>,
) -> Result<(DirtyBitmap, bool), MigrationError> {
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
        if let Some(rounds) = rounds {
            if round >= rounds {
                tracing::info!("hybrid: post-copy after {round} rounds, {pending} pages left");
                return Ok((unsent, false));
            }
        } else if fits || stale >= STALE_ROUNDS || round > job.params.max_rounds {
            tracing::info!(
                "pre-copy: switching over after round {round}: {pending} pages left, about {expected_ms:.1} ms"
            );
            return Ok((unsent, fits));
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
