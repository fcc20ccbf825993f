//! Post-copy: the guest runs on the destination before all of its memory is there.
//!
//! At the switch the source sends the pages the destination lacks (`Missing`). The
//! destination punches them out of its memfd, registers guest RAM with a userfaultfd
//! for missing pages, and runs the guest. Two streams then carry pages:
//! - the *fault stream*: the destination's fault thread reads each fault, asks the
//!   source for the page (`Request`), and places the answer (`Pages`) with
//!   `UFFDIO_COPY`, which wakes the vCPU or device thread that waits on it. A fault on a
//!   page the source never held is filled with zeros here, with no round trip;
//! - the *main stream*: the source pushes every other page it still has to send, from
//!   the page of the latest request on, and the destination's migration thread places
//!   them as they come.
//!
//! When every page is here the destination says `Complete`, the source `CompleteAck`,
//! and guest RAM is unregistered.
//!
//! *Room made before the pause.* A pure post-copy's source lists the pages that hold
//! data in `Prepare`, and the destination writes zeros over them in its memfd while
//! the guest still runs on the source (`make_room`). A page's first write costs about
//! 10 µs here, where the host's own memory is handed back to its hypervisor when free
//! (README, post-copy), against well under 1 µs for a page written again: placing
//! 976 MiB into new pages with `UFFDIO_COPY` took the destination 2.8 s, into pages
//! made before the pause 0.33-0.37 s. Those pages stay in the memfd, unmapped, and guest RAM is
//! registered for minor faults as well: a lacking page among them (`cached`) is placed
//! by writing the memfd and mapping it with `UFFDIO_CONTINUE`; any other lacking page
//! is a hole, placed with `UFFDIO_COPY` as above.
//!
//! Shared state, who writes it and who reads it:
//! - Destination `Incoming::pending` (pages still to arrive): both placing threads clear
//!   a hole's bit after its `UFFDIO_COPY` returned (placed, or `EEXIST`: placed by the
//!   other). Clearing is an atomic fetch-and, so exactly one of them sees the bit set and
//!   counts the page; none is counted twice or lost. The fault thread reads it to
//!   choose between asking the source and placing zeros: a hole it finds clear is
//!   placed, so the zero page fails with `EEXIST` and only wakes the faulting thread.
//! - A `cached` page's bit is cleared *before* it is written, by the one placing thread
//!   that wins the fetch-and; the other skips its copy. A second write would be wrong
//!   here, not merely wasted: the guest may have written the page since it was mapped.
//!   The winner writes the memfd, maps the page (`UFFDIO_CONTINUE`, which wakes every
//!   fault waiting on it), and only then clears its bit in `unmapped`. The fault thread,
//!   for a fault on a cached page that is no longer pending, maps it again when
//!   `unmapped` is clear (`EEXIST`: only a wake), and otherwise does nothing: the
//!   winner's map is still to come, and wakes the fault (the kernel queues a fault's
//!   waiter before the fault can be read); it maps the page again once `unmapped` is
//!   clear, in case the page was unmapped in between (reclaim may unmap shmem pages).
//!   A taken page counts in `placing` from just before its take until it is mapped
//!   (for good if its write or map fails), so that the pages still to arrive
//!   (`pending` + `placing`) never reach zero before they are all here. A minor fault on any other page is a page
//!   whose memfd contents are final (zeros made before the pause that the source no
//!   longer holds data in): it is mapped at once.
//! - Destination counters and `error`: atomics and a mutex, any thread; `error` keeps
//!   the first.
//! - Source `Outgoing::todo` (pages not yet sent): the answering thread and the pusher
//!   claim a page by clearing its bit (atomic fetch-and), so a page is pushed by at most
//!   one of them. A requested page is answered even when the pusher claimed it first:
//!   its batch may sit behind megabytes of others. The destination takes the second
//!   copy as `EEXIST`; both copies hold the same bytes, since the source's guest is
//!   paused.
//! - Source `hint`: the answering thread stores the latest requested page, the pusher
//!   reads it to move its cursor there. A stale read only delays the jump.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::migration::FaultLatency;
use memory::dirty::{guest_to_page, page_to_guest, Claim, DirtyBitmap};
use memory::{GuestRam, PageSet, PAGE_BYTES, PAGE_SIZE};
use userfaultfd::{Event, FaultKind, Uffd};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::protocol::{self, Kind, PageBatch};
use super::transport::{poll_readable, Conn};
use super::{MigrationError, Progress};

/// Pages after a requested one that go with its answer, when they are still to send:
/// a guest that touches a page is likely to touch the next ones. (15 before fault
/// serving ran first: a guest served sooner runs sooner and faults more often; with 31
/// it faulted less, and all its memory and the fast writer's first pass arrived
/// sooner; README, post-copy.)
const NEIGHBOURS: usize = 31;
/// Pages made room for that one thread takes, writes and maps at a time.
const WRITE_GROUP: usize = 16;
/// How often the threads publish their counters to `GET /migration`.
const PUBLISH: Duration = Duration::from_millis(100);
/// Poll timeout of the fault threads, so that they see their stop flag.
const POLL_MS: libc::c_int = 50;

/// The memfd pages of guest ranges, checked against the memory map: each range must
/// lie in RAM (`what` names the message in errors).
fn pages_of_ranges(
    ram: &GuestRam,
    ranges: &[(u64, u64)],
    what: &str,
) -> Result<Vec<(usize, usize)>, MigrationError> {
    ranges
        .iter()
        .map(|&(addr, len)| {
            ram.pages_of(GuestAddress(addr), len).map_err(|_| {
                MigrationError::Protocol(format!(
                    "{what} names {len:#x} bytes at guest address {addr:#x}, which is not all guest RAM here"
                ))
            })
        })
        .collect()
}

/// The pages in `bitmap` as guest-physical (address, length) ranges.
pub fn guest_ranges(ram: &GuestRam, bitmap: &DirtyBitmap) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (first, count) in bitmap.runs() {
        for (addr, len) in ram.guest_ranges(first as u64 * PAGE_SIZE, count as u64 * PAGE_SIZE) {
            out.push((addr.0, len));
        }
    }
    out
}

/// Parses and checks a `Missing` body into the set of pages it names.
pub fn decode_missing(ram: &GuestRam, body: &[u8]) -> Result<DirtyBitmap, MigrationError> {
    let ranges = protocol::decode_ranges(body)?;
    let mut lacks = DirtyBitmap::new(ram.regions());
    for (first, count) in pages_of_ranges(ram, &ranges, "the list of missing pages")? {
        lacks.set_run(first, count);
    }
    Ok(lacks)
}

/// How long the destination may spend making room before it answers `Prepare`: well
/// inside the source's `STALL_TIMEOUT`, which its wait for `Prepared` is under.
pub const ROOM_BUDGET: Duration = Duration::from_secs(5);

/// Makes room in `ram`'s memfd for the pages of `body` (a `Prepare` range list: the
/// pages that hold data on the source) by writing zeros over them, so that post-copy
/// places them into pages that exist; see the module doc. Stops at `ROOM_BUDGET` (the
/// rest are placed as holes). Returns the pages written.
pub fn make_room(
    ram: &GuestRam,
    body: &[u8],
    cancel: &AtomicBool,
) -> Result<DirtyBitmap, MigrationError> {
    use std::os::unix::fs::FileExt;
    let ranges = protocol::decode_ranges(body)?;
    let runs = pages_of_ranges(ram, &ranges, "Prepare")?;
    let mut room = DirtyBitmap::new(ram.regions());
    let zeros = vec![0u8; protocol::BATCH_BYTES];
    let chunk = protocol::BATCH_BYTES / PAGE_BYTES;
    let deadline = Instant::now() + ROOM_BUDGET;
    for (first, count) in runs {
        let mut p = first;
        while p < first + count {
            if cancel.load(Ordering::Relaxed) {
                return Err(MigrationError::Cancelled);
            }
            if Instant::now() > deadline {
                return Ok(room);
            }
            let n = chunk.min(first + count - p);
            ram.file()
                .write_all_at(&zeros[..n * PAGE_BYTES], p as u64 * PAGE_SIZE)
                .map_err(|e| {
                    MigrationError::Vm(format!("cannot make room in guest RAM's memfd: {e}"))
                })?;
            room.set_run(p, n);
            p += n;
        }
    }
    Ok(room)
}

// ---------------------------------------------------------------------------------
// The destination.

struct In {
    uffd: Uffd,
    ram: GuestRam,
    /// The pages missing at the switch; what the source may send.
    lacks: DirtyBitmap,
    /// The pages still to arrive.
    pending: PageSet,
    /// Lacking pages kept in the memfd (room made before the pause), placed by a write
    /// and `UFFDIO_CONTINUE`; the others are holes, placed with `UFFDIO_COPY`.
    cached: DirtyBitmap,
    /// The cached pages not yet mapped.
    unmapped: PageSet,
    /// Cached pages taken out of `pending` and not yet written and mapped (for good,
    /// when their write or map failed): still missing, though no longer pending.
    placing: AtomicU64,
    faults: AtomicU64,
    requested: AtomicU64,
    pushed: AtomicU64,
    /// Bytes received before the switch (pre-copy), and since, on both streams.
    precopied: u64,
    bytes: AtomicU64,
    latency: Mutex<Option<FaultLatency>>,
    error: Mutex<Option<String>>,
    /// Guest RAM's userfaultfd mechanism, while registered.
    claim: Mutex<Option<Claim>>,
}

impl In {
    fn fail(&self, msg: String) {
        tracing::error!("post-copy: {msg}");
        self.error.lock().expect("poisoned").get_or_insert(msg);
    }

    /// Checks a batch's ranges against the missing pages: the source sends nothing
    /// else. Returns their memfd pages.
    fn check(&self, ranges: &[(u64, u64)]) -> Result<Vec<(usize, usize)>, MigrationError> {
        let pages = pages_of_ranges(&self.ram, ranges, "a post-copy page batch")?;
        for (&(addr, _), &(first, count)) in ranges.iter().zip(&pages) {
            if let Some(p) = (first..first + count).find(|p| !self.lacks.get(*p)) {
                let at = page_to_guest(self.ram.regions(), p).map_or(addr, |a| a.0);
                return Err(MigrationError::Protocol(format!(
                    "the source sent the page at guest address {at:#x}, which the destination did not lack"
                )));
            }
        }
        Ok(pages)
    }

    /// Places a checked batch and takes its pages out of `pending`; returns how many
    /// were still pending.
    fn place(
        &self,
        ranges: &[(u64, u64)],
        pages: &[(usize, usize)],
        data: &[u8],
    ) -> Result<u64, MigrationError> {
        let mut at = 0usize;
        let mut new = 0u64;
        for (&(addr, len), &(first, count)) in ranges.iter().zip(pages) {
            // `read_batch` checked that the ranges add up to `data`.
            let len = usize::try_from(len)
                .map_err(|_| MigrationError::Protocol("a page range is too long".into()))?;
            let host = self
                .ram
                .regions()
                .iter()
                .find(|r| addr >= r.guest_addr.0 && addr < r.guest_addr.0 + r.size)
                .map(|r| r.host_addr + (addr - r.guest_addr.0))
                .ok_or_else(|| MigrationError::Vm(format!("no guest RAM at {addr:#x}")))?;
            let bytes = &data[at..at + len];
            // Runs of pages alike: holes, or pages kept in the memfd.
            let mut p = first;
            while p < first + count {
                let cached = self.cached.get(p);
                let run = (p..first + count)
                    .take_while(|q| self.cached.get(*q) == cached)
                    .count();
                let from = (p - first) * PAGE_BYTES;
                let (host, bytes) = (host + from as u64, &bytes[from..from + run * PAGE_BYTES]);
                new += if cached {
                    self.write_and_map(p, run, host, bytes)?
                } else {
                    memory::fault::place(&self.uffd, bytes, host, true)
                        .map_err(MigrationError::Vm)?;
                    (p..p + run).filter(|q| self.pending.take(*q)).count() as u64
                };
                p += run;
            }
            self.bytes.fetch_add(len as u64, Ordering::Relaxed);
            at += len;
        }
        Ok(new)
    }

    /// Places `run` cached pages from memfd page `first` on (at host address `host`):
    /// each that this thread takes out of `pending` is written and mapped, the others
    /// are the other placing thread's. Returns how many this thread placed.
    fn write_and_map(
        &self,
        first: usize,
        run: usize,
        host: u64,
        bytes: &[u8],
    ) -> Result<u64, MigrationError> {
        use std::os::unix::fs::FileExt;
        let mut placed = 0u64;
        let mut p = first;
        while p < first + run {
            if !self.take(p) {
                p += 1;
                continue;
            }
            // A few pages at a time: a fault on a page taken here waits for its
            // group's write and map, not for the whole batch's.
            let mut taken = 1;
            while p + taken < first + run && taken < WRITE_GROUP && self.take(p + taken) {
                taken += 1;
            }
            let from = (p - first) * PAGE_BYTES;
            let slice = &bytes[from..from + taken * PAGE_BYTES];
            self.ram
                .file()
                .write_all_at(slice, p as u64 * PAGE_SIZE)
                .map_err(|e| format!("cannot write guest RAM's memfd page {p}: {e}"))
                .and_then(|()| memory::fault::map(&self.uffd, host + from as u64, slice.len()))
                .and_then(|there| match there {
                    0 => Ok(()),
                    // Only the thread that took a page maps it: mapped already, the
                    // guest may have read it before this write.
                    n => Err(format!(
                        "{n} of the pages from memfd page {p} were mapped before their data came"
                    )),
                })
                // Taken but not here: they stay in `placing`, so that nothing reports
                // the migration complete.
                .map_err(MigrationError::Vm)?;
            for q in p..p + taken {
                self.unmapped.take(q);
            }
            self.placing.fetch_sub(taken as u64, Ordering::AcqRel);
            placed += taken as u64;
            p += taken;
        }
        Ok(placed)
    }

    /// Takes cached page `p` out of `pending` into `placing`; false when another
    /// thread took it. Counted in `placing` first, so that `remaining` never misses
    /// it in between.
    fn take(&self, p: usize) -> bool {
        self.placing.fetch_add(1, Ordering::AcqRel);
        let took = self.pending.take(p);
        if !took {
            self.placing.fetch_sub(1, Ordering::AcqRel);
        }
        took
    }

    /// Pages not here yet: pending, or taken and not yet written and mapped. `pending`
    /// is read first: a take seen there has its `placing` count seen too.
    fn remaining(&self) -> u64 {
        let pending = self.pending.count();
        pending + self.placing.load(Ordering::Acquire)
    }

    fn release(&self) {
        let mut claim = self.claim.lock().expect("poisoned");
        if claim.take().is_some() {
            memory::fault::unregister_missing(&self.uffd, &self.ram.tracked());
        }
    }
}

/// Punches out every page of `lacks` that holds data in `ram`'s memfd: a page that is
/// there is never faulted on, so it must not be one the source has newer contents of.
/// Only the memfd's data extents are walked, so a fresh destination costs one lseek.
fn empty(ram: &GuestRam, lacks: &DirtyBitmap) -> Result<(), MigrationError> {
    let failed =
        |e: &dyn std::fmt::Display| MigrationError::Vm(format!("cannot empty a missing page: {e}"));
    let page_of = |offset: u64| usize::try_from(offset / PAGE_SIZE).unwrap_or(usize::MAX);
    for (offset, len) in ram.data_extents().map_err(|e| failed(&e))? {
        let (first, end) = (
            page_of(offset),
            page_of((offset + len).div_ceil(PAGE_SIZE) * PAGE_SIZE),
        );
        let mut p = first;
        while p < end {
            if !lacks.get(p) {
                p += 1;
                continue;
            }
            let run = (p..end).take_while(|q| lacks.get(*q)).count();
            for (addr, bytes) in ram.guest_ranges(p as u64 * PAGE_SIZE, run as u64 * PAGE_SIZE) {
                ram.discard(addr, bytes).map_err(|e| failed(&e))?;
            }
            p += run;
        }
    }
    Ok(())
}

/// Punches out every page of `pages` (holes stay holes).
fn discard(ram: &GuestRam, pages: &DirtyBitmap) -> Result<(), MigrationError> {
    for (first, count) in pages.runs() {
        for (addr, bytes) in ram.guest_ranges(first as u64 * PAGE_SIZE, count as u64 * PAGE_SIZE) {
            ram.discard(addr, bytes)
                .map_err(|e| MigrationError::Vm(format!("cannot empty a missing page: {e}")))?;
        }
    }
    Ok(())
}

/// Guest RAM on the destination while post-copy runs; see the module doc.
pub struct Incoming {
    shared: Arc<In>,
    stop: EventFd,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Incoming {
    /// Makes the pages in `lacks` missing in `ram` (a pre-copy may have filled some with
    /// older contents), registers guest RAM for missing faults, and starts the fault
    /// thread on `conn`, the fault stream. Nothing may touch guest RAM between the holes
    /// and the registration: the VM must not run yet.
    ///
    /// With `room` (what `make_room` wrote, and all that the memfd holds), the lacking
    /// pages among `room` stay, unmapped, for minor faults; only the lacking pages
    /// outside it are punched.
    pub fn start(
        ram: &GuestRam,
        lacks: DirtyBitmap,
        room: Option<DirtyBitmap>,
        conn: Conn,
        progress: Arc<Progress>,
    ) -> Result<Incoming, MigrationError> {
        let precopied = progress.status().transferred_bytes;
        let cached = match &room {
            Some(room) => {
                // Lacking pages outside the room are placed as holes: punch any that
                // hold data now (written since the source listed its pages).
                let mut holes = lacks.clone();
                holes.remove(room);
                discard(ram, &holes)?;
                // Restoring the VM may have mapped pages already (KVM maps the
                // kvmclock page when its MSR is set): unmapped, each faults again once
                // guest RAM is registered, and KVM's own mappings go with them.
                let t = Instant::now();
                ram.unmap()
                    .map_err(|e| MigrationError::Vm(format!("post-copy: {e}")))?;
                tracing::debug!("post-copy: guest RAM unmapped in {:?}", t.elapsed());
                room.and(&lacks)
            }
            None => {
                empty(ram, &lacks)?;
                DirtyBitmap::new(ram.regions())
            }
        };
        let (uffd, claim) = memory::fault::register(&ram.tracked(), room.is_some())
            .map_err(|e| MigrationError::Vm(format!("post-copy: {e}")))?;
        let total = memory::dirty::total_pages(ram.regions());
        let shared = Arc::new(In {
            uffd,
            ram: ram.clone(),
            pending: PageSet::from_bitmap(&lacks, total),
            unmapped: PageSet::from_bitmap(&cached, total),
            placing: AtomicU64::new(0),
            cached,
            lacks,
            faults: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            precopied,
            bytes: AtomicU64::new(0),
            latency: Mutex::new(None),
            error: Mutex::new(None),
            claim: Mutex::new(Some(claim)),
        });
        let stop = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| MigrationError::Vm(format!("post-copy: eventfd: {e}")))?;
        let thread_stop = stop
            .try_clone()
            .map_err(|e| MigrationError::Vm(format!("post-copy: eventfd: {e}")))?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || {
                serve_first();
                seccomp::apply(seccomp::Thread::Memory);
                serve_faults(&s, conn, &thread_stop, &progress)
            })
            .map_err(|e| MigrationError::Vm(format!("post-copy: cannot start a thread: {e}")))?;
        Ok(Incoming {
            shared,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Checks and places a batch the source pushed on the main stream.
    pub fn pushed(&self, ranges: &[(u64, u64)], data: &[u8]) -> Result<(), MigrationError> {
        let pages = self.shared.check(ranges)?;
        let new = self.shared.place(ranges, &pages, data)?;
        self.shared.pushed.fetch_add(new, Ordering::Relaxed);
        Ok(())
    }

    /// Pages still to arrive.
    pub fn remaining(&self) -> u64 {
        self.shared.remaining()
    }

    /// The fault thread's error, if it failed.
    pub fn error(&self) -> Option<String> {
        self.shared.error.lock().expect("poisoned").clone()
    }

    /// Copies the counters into `progress`.
    pub fn publish(&self, progress: &Progress) {
        publish(&self.shared, progress);
    }

    /// Stops the fault thread.
    fn stop_thread(&self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.lock().expect("poisoned").take() {
            let _ = t.join();
        }
    }

    /// Stops the fault thread (its error, if any, is in `error` then); guest RAM stays
    /// registered.
    pub fn stop(&self) {
        self.stop_thread();
    }

    /// Every page is here: stops the fault thread and unregisters guest RAM at once, so
    /// that nothing waits on the end's handshake (a page the source never held reads
    /// as zeros from the kernel now).
    pub fn complete(&self) {
        self.stop_thread();
        self.shared.release();
    }

    /// Every page is here: stops the fault thread and gives guest RAM back to the
    /// kernel.
    pub fn finish(self) {
        self.stop_thread();
        self.shared.release();
    }

    /// The migration failed: stops serving faults but keeps guest RAM registered, so
    /// that nothing runs on with a missing page read as zeros. Whoever holds the
    /// returned value keeps it so; dropping it lets the kernel fill the holes.
    pub fn hold(self) -> Incoming {
        self.stop_thread();
        self
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.stop_thread();
        self.shared.release();
    }
}

fn publish(shared: &In, progress: &Progress) {
    let latency = *shared.latency.lock().expect("poisoned");
    let remaining = shared.remaining();
    progress.update(|s| {
        s.postcopy_faults = shared.faults.load(Ordering::Relaxed);
        s.pages_requested = shared.requested.load(Ordering::Relaxed);
        s.pages_pushed = shared.pushed.load(Ordering::Relaxed);
        s.remaining_pages = remaining;
        s.fault_latency_us = latency;
        s.transferred_bytes = shared.precopied + shared.bytes.load(Ordering::Relaxed);
    });
}

/// p50, p99 and max of `samples` (µs).
fn percentiles(samples: &[u32]) -> Option<FaultLatency> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_unstable();
    // The sample at `per_mille` of the way, rounded to the nearest.
    let at = |per_mille: usize| f64::from(s[((s.len() - 1) * per_mille + 500) / 1000]);
    Some(FaultLatency {
        p50: at(500),
        p99: at(990),
        max: at(1000),
    })
}

/// Puts the calling thread, one that serves page faults (the destination's fault
/// thread, the source's answering thread), ahead of the bulk threads, which keep both
/// cores busy (README, post-copy; `memory::serve_first`). Both threads sleep in
/// `poll` between faults and do a bounded amount of work for each.
pub(super) fn serve_first() {
    if let Err(e) = memory::serve_first() {
        tracing::debug!("post-copy: fault serving keeps normal priority: {e}");
    }
}

/// The destination's fault thread: faults to requests, answers into guest RAM.
fn serve_faults(shared: &In, mut conn: Conn, stop: &EventFd, progress: &Progress) {
    use std::os::fd::AsRawFd;
    // Pages asked for and not yet answered, with when their first fault was read.
    let mut waiting: HashMap<usize, Instant> = HashMap::new();
    let mut latencies: Vec<u32> = Vec::new();
    // Faults on cached pages that a placing thread had taken and not yet mapped.
    let mut deferred: Vec<(usize, u64)> = Vec::new();
    let mut data = Vec::with_capacity(protocol::BATCH_BYTES);
    let mut published = Instant::now();
    let fds = [shared.uffd.as_raw_fd(), conn.raw_fd(), stop.as_raw_fd()];
    loop {
        let ready = match poll_readable(fds, POLL_MS) {
            Ok(r) => r,
            Err(e) => return shared.fail(format!("poll: {e}")),
        };
        if ready[2] {
            break;
        }
        if ready[0] {
            if let Err(e) = take_faults(shared, &mut conn, &mut waiting, &mut deferred) {
                return shared.fail(format!("serving a page fault: {e}"));
            }
        }
        // The placing thread's map woke these faults; mapping them again once it is
        // done costs an `EEXIST`, and serves one whose page was unmapped in between.
        let mut again = Vec::new();
        deferred.retain(|&(page, addr)| {
            let wait = shared.unmapped.contains(page);
            if !wait {
                again.push(addr);
            }
            wait
        });
        for addr in again {
            if let Err(e) = memory::fault::map(&shared.uffd, addr, PAGE_BYTES) {
                return shared.fail(format!("serving a page fault: {e}"));
            }
        }
        if ready[1] {
            if let Err(e) = take_answer(shared, &mut conn, &mut data, &mut waiting, &mut latencies)
            {
                return shared.fail(format!("the fault stream: {e}"));
            }
        }
        if published.elapsed() >= PUBLISH {
            *shared.latency.lock().expect("poisoned") = percentiles(&latencies);
            publish(shared, progress);
            published = Instant::now();
        }
    }
    *shared.latency.lock().expect("poisoned") = percentiles(&latencies);
    publish(shared, progress);
}

/// Reads every queued fault: pages still to come are asked for (once), the others
/// placed as zeros, or only woken when they arrived meanwhile.
fn take_faults(
    shared: &In,
    conn: &mut Conn,
    waiting: &mut HashMap<usize, Instant>,
    deferred: &mut Vec<(usize, u64)>,
) -> Result<(), MigrationError> {
    let mut want: Vec<u8> = Vec::new();
    loop {
        let (addr, kind) = match shared.uffd.read_event() {
            Ok(Some(Event::Pagefault { addr, kind, .. })) => (addr as u64 & !(PAGE_SIZE - 1), kind),
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(e) => return Err(MigrationError::Vm(format!("reading faults: {e}"))),
        };
        shared.faults.fetch_add(1, Ordering::Relaxed);
        let region = shared
            .ram
            .regions()
            .iter()
            .find(|r| addr >= r.host_addr && addr < r.host_addr + r.size)
            .ok_or_else(|| MigrationError::Vm(format!("a fault outside guest RAM at {addr:#x}")))?;
        let guest = region.guest_addr.0 + (addr - region.host_addr);
        let page = guest_to_page(shared.ram.regions(), GuestAddress(guest))
            .ok_or_else(|| MigrationError::Vm(format!("a fault outside guest RAM at {addr:#x}")))?;
        if shared.pending.contains(page) {
            if let std::collections::hash_map::Entry::Vacant(e) = waiting.entry(page) {
                e.insert(Instant::now());
                want.extend_from_slice(&guest.to_le_bytes());
                if want.len() == 8 * protocol::MAX_REQUEST {
                    conn.send(Kind::Request, &[&want])?;
                    want.clear();
                }
            }
        } else if shared.unmapped.contains(page) {
            // Taken by a placing thread whose map is still to come and wakes this
            // fault (see the module doc); looked at again once it is mapped.
            if !deferred.contains(&(page, addr)) {
                deferred.push((page, addr));
            }
        } else if kind == FaultKind::Minor {
            // In the memfd, final: placed and mapped, or zeros the source no longer
            // holds data in.
            memory::fault::map(&shared.uffd, addr, PAGE_BYTES).map_err(MigrationError::Vm)?;
        } else {
            // Never held by the source (a zero page), or here by now.
            memory::fault::zero(&shared.uffd, addr).map_err(MigrationError::Vm)?;
        }
    }
    if !want.is_empty() {
        conn.send(Kind::Request, &[&want])?;
    }
    Ok(())
}

/// Reads one answer from the fault stream and places it.
fn take_answer(
    shared: &In,
    conn: &mut Conn,
    data: &mut Vec<u8>,
    waiting: &mut HashMap<usize, Instant>,
    latencies: &mut Vec<u32>,
) -> Result<(), MigrationError> {
    let header = conn.recv_header()?;
    if header.kind != Kind::Pages {
        return Err(MigrationError::Protocol(format!(
            "unexpected {:?} message on the fault stream",
            header.kind
        )));
    }
    let (ranges, data) = protocol::read_batch(conn, &header, data)?;
    let pages = shared.check(&ranges)?;
    // The pages that faults wait for go first, each on its own: the kernel wakes a
    // fault only once the whole copy its page lies in is done, and an answer carries
    // up to 31 neighbours. Then the runs around them.
    let mut new = 0;
    let mut around = Vec::new();
    let mut at = 0usize;
    for (&(addr, _), &(first, count)) in ranges.iter().zip(&pages) {
        // Checked by `check`: the range is `count` pages of guest RAM, in the batch.
        let guest = |p: usize| addr + ((p - first) * PAGE_BYTES) as u64;
        let bytes = |from: usize, to: usize| {
            at + (from - first) * PAGE_BYTES..at + (to - first) * PAGE_BYTES
        };
        let mut run = first;
        for p in first..first + count {
            if let Some(since) = waiting.remove(&p) {
                new += shared.place(&[(guest(p), PAGE_SIZE)], &[(p, 1)], &data[bytes(p, p + 1)])?;
                latencies.push(u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX));
                if p > run {
                    around.push((guest(run), run, p, bytes(run, p)));
                }
                run = p + 1;
            }
        }
        if first + count > run {
            around.push((guest(run), run, first + count, bytes(run, first + count)));
        }
        at += count * PAGE_BYTES;
    }
    for (addr, from, to, bytes) in around {
        let len = ((to - from) * PAGE_BYTES) as u64;
        new += shared.place(&[(addr, len)], &[(from, to - from)], &data[bytes])?;
    }
    shared.requested.fetch_add(new, Ordering::Relaxed);
    Ok(())
}

// ---------------------------------------------------------------------------------
// The source.

/// What the source's two post-copy threads share; see the module doc.
pub struct Outgoing {
    ram: GuestRam,
    lacks: DirtyBitmap,
    /// Pages not yet sent.
    pub todo: PageSet,
    /// The page of the latest request.
    pub hint: AtomicUsize,
    /// Pages requested by faults (one per request).
    pub faults: AtomicU64,
    /// Pages sent in answers, neighbours included.
    pub requested: AtomicU64,
    /// Bytes sent in answers.
    pub answered_bytes: AtomicU64,
    /// Set when the answering thread should end.
    pub stop: AtomicBool,
}

impl Outgoing {
    /// The source's side of a post-copy of the pages in `lacks`.
    pub fn new(ram: &GuestRam, lacks: DirtyBitmap) -> Outgoing {
        let total = memory::dirty::total_pages(ram.regions());
        Outgoing {
            ram: ram.clone(),
            todo: PageSet::from_bitmap(&lacks, total),
            lacks,
            hint: AtomicUsize::new(0),
            faults: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            answered_bytes: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }
    }

    /// Answers page requests on `conn` until `stop` is set or the destination closes
    /// the stream.
    pub fn answer(&self, mut conn: Conn) -> Result<(), MigrationError> {
        let mut batch = PageBatch::new();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let ready = poll_readable([conn.raw_fd()], POLL_MS)
                .map_err(|e| MigrationError::io("poll the fault stream", e))?;
            if !ready[0] {
                continue;
            }
            let header = match conn.recv_header() {
                Ok(h) => h,
                // The destination closes the fault stream when it needs no more
                // pages, or when it fails, which the main stream reports.
                Err(MigrationError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            };
            if header.kind != Kind::Request {
                return Err(MigrationError::Protocol(format!(
                    "unexpected {:?} message on the fault stream",
                    header.kind
                )));
            }
            let body = conn.read_payload(&header)?;
            let mut asked = Vec::new();
            for addr in protocol::decode_request(&body)? {
                let page = guest_to_page(self.ram.regions(), GuestAddress(addr))
                    .filter(|p| self.lacks.get(*p))
                    .ok_or_else(|| {
                        MigrationError::Protocol(format!(
                            "the destination asked for the page at {addr:#x}, which it does not lack"
                        ))
                    })?;
                self.faults.fetch_add(1, Ordering::Relaxed);
                self.hint.store(page, Ordering::Release);
                // The page itself even if the pusher took it (module doc).
                self.todo.take(page);
                self.queue(&mut batch, page, 1, &mut conn)?;
                asked.push(page);
            }
            // The asked-for pages go in a batch of their own, ahead of their
            // neighbours: the destination places a page only once its whole batch is
            // in and checked, and the neighbours made that 32 times larger.
            batch.flush(&mut conn)?;
            let mut sent = asked.len();
            for page in asked {
                // Then the next ones nobody sent yet.
                let mut count = 0;
                while count < NEIGHBOURS && self.todo.take(page + 1 + count) {
                    count += 1;
                }
                if count > 0 {
                    self.queue(&mut batch, page + 1, count, &mut conn)?;
                }
                sent += count;
            }
            batch.flush(&mut conn)?;
            self.requested.fetch_add(sent as u64, Ordering::Relaxed);
            self.answered_bytes
                .fetch_add(sent as u64 * PAGE_SIZE, Ordering::Relaxed);
        }
    }

    /// Adds memfd pages `first..first+count` to `batch`, sending it when full.
    fn queue(
        &self,
        batch: &mut PageBatch,
        first: usize,
        count: usize,
        conn: &mut Conn,
    ) -> Result<(), MigrationError> {
        let offset = first as u64 * PAGE_SIZE;
        for (addr, len) in self.ram.guest_ranges(offset, count as u64 * PAGE_SIZE) {
            let len = usize::try_from(len).unwrap_or(PAGE_BYTES);
            if !batch.fits(len) {
                batch.flush(conn)?;
            }
            batch.push(addr.0, len, |buf| {
                super::sender::copy_out(&self.ram, addr, buf)
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Source RAM of 64 MiB whose every third page holds its number (the rest never
    /// touched), and the set of pages that hold data.
    fn source_ram() -> (GuestRam, DirtyBitmap) {
        let ram = GuestRam::new(64, 46).expect("ram");
        let mut lacks = DirtyBitmap::new(ram.regions());
        let pages = memory::dirty::total_pages(ram.regions());
        for p in (0..pages).step_by(3) {
            let mut page = vec![0u8; PAGE_BYTES];
            page[..8].copy_from_slice(&(p as u64 + 1).to_le_bytes());
            page[PAGE_BYTES - 8..].copy_from_slice(&(p as u64 + 1).to_le_bytes());
            let addr = page_to_guest(ram.regions(), p).expect("page");
            ram.fill(&page, addr).expect("fill");
            lacks.set(p);
        }
        (ram, lacks)
    }

    fn conn_pair() -> (Conn, Conn) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let cancel = Arc::new(AtomicBool::new(false));
        (
            Conn::new(super::super::transport::Stream::Unix(a), cancel.clone()).expect("conn"),
            Conn::new(super::super::transport::Stream::Unix(b), cancel).expect("conn"),
        )
    }

    /// The fault-path races, with host threads on the registered mapping:
    /// - two threads read the same pages in the same order, so that both fault on one
    ///   page at once (one request, both woken);
    /// - a third reads from the top down, meeting them;
    /// - a pusher places pages from the other end meanwhile, so that pages arrive in
    ///   the background while their faults wait (EEXIST on the answer, then wake);
    /// - pages the source never held read as zeros without a request.
    ///
    /// Every page reads what the source holds, every page arrives exactly once in the
    /// counts, and the source answered only pages the destination lacked.
    #[test]
    fn test_faults_race_answers_pushes_and_each_other() {
        race(false);
    }

    /// The same races on pages made room for before the pause (minor faults, placed by
    /// a write and `UFFDIO_CONTINUE`), and on two pages made room for that the source
    /// no longer lacks (zeros, mapped at once). A fourth thread writes a mark into every
    /// page as soon as it is there: a copy that lands after it (the answer and the push
    /// of one page) would wipe the mark.
    #[test]
    fn test_faults_race_on_pages_made_room_for() {
        race(true);
    }

    fn race(room: bool) {
        use vm_memory::Bytes;
        let (src, lacks) = source_ram();
        let pages = memory::dirty::total_pages(src.regions());
        let dst = GuestRam::new(64, 46).expect("ram");
        let (src_conn, dst_conn) = conn_pair();
        let out = Outgoing::new(&src, lacks.clone());
        let progress = Progress::new(Default::default());
        let room = room.then(|| {
            let mut listed = lacks.clone();
            listed.set_run(1, 2);
            let body = protocol::encode_ranges(&guest_ranges(&dst, &listed));
            let made = make_room(&dst, &body, &AtomicBool::new(false)).expect("room");
            assert_eq!(made.count(), listed.count(), "room for every listed page");
            made
        });
        let marks = room.is_some();
        let incoming =
            Incoming::start(&dst, lacks.clone(), room, dst_conn, progress.clone()).expect("start");
        let data_pages = lacks.count() as u64;
        // A fault nobody serves waits forever: end the test with a message instead.
        let finished = Arc::new(AtomicBool::new(false));
        let watchdog = finished.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(60));
            if !watchdog.load(Ordering::Acquire) {
                // Not eprintln!: the harness would capture it, and exit drops that.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "a fault was never served: the post-copy race test hangs"
                );
                std::process::exit(1);
            }
        });
        std::thread::scope(|s| {
            let answering = s.spawn(|| out.answer(src_conn));
            // The pusher, from the top, in batches of 8 pages as the main stream would.
            let pusher = s.spawn(|| {
                let mut buf = vec![0u8; 8 * PAGE_BYTES];
                let mut p = pages;
                while p > 0 {
                    p = p.saturating_sub(8);
                    let mut ranges = Vec::new();
                    let mut at = 0;
                    for q in p..p + 8 {
                        if out.todo.take(q) {
                            let addr = page_to_guest(src.regions(), q).expect("page");
                            super::super::sender::copy_out(
                                &src,
                                addr,
                                &mut buf[at..at + PAGE_BYTES],
                            )
                            .expect("read");
                            ranges.push((addr.0, PAGE_SIZE));
                            at += PAGE_BYTES;
                        }
                    }
                    if !ranges.is_empty() {
                        incoming.pushed(&ranges, &buf[..at]).expect("push");
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            });
            let marker = marks.then(|| {
                let dst = &dst;
                s.spawn(move || {
                    // From the top, where the pusher is: pages it pushes are asked for
                    // too, and arrive twice.
                    for p in (0..pages).rev() {
                        let addr = page_to_guest(dst.regions(), p).expect("page");
                        dst.memory()
                            .write_obj(!(p as u64), GuestAddress(addr.0 + MARK))
                            .expect("mark");
                    }
                })
            });
            let readers: Vec<_> = (0..3)
                .map(|t| {
                    let dst = &dst;
                    s.spawn(move || {
                        for i in 0..pages {
                            let p = if t == 2 { pages - 1 - i } else { i };
                            let addr = page_to_guest(dst.regions(), p).expect("page");
                            let want = if p % 3 == 0 { p as u64 + 1 } else { 0 };
                            for off in [0, PAGE_SIZE - 8] {
                                let got: u64 = dst
                                    .memory()
                                    .read_obj(GuestAddress(addr.0 + off))
                                    .expect("read");
                                assert_eq!(got, want, "page {p} at +{off}");
                            }
                        }
                    })
                })
                .collect();
            for r in readers {
                r.join().expect("reader");
            }
            if let Some(m) = marker {
                m.join().expect("marker");
            }
            pusher.join().expect("pusher");
            let deadline = Instant::now() + Duration::from_secs(20);
            while incoming.remaining() > 0 {
                assert!(
                    Instant::now() < deadline,
                    "{} pages never came",
                    incoming.remaining()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            // As the migration ends: the destination stops serving, then the source.
            incoming.complete();
            out.stop.store(true, Ordering::Release);
            answering.join().expect("answering").expect("answers");
        });
        finished.store(true, Ordering::Release);
        incoming.publish(&progress);
        let st = progress.status();
        assert!(incoming.error().is_none(), "{:?}", incoming.error());
        assert_eq!(st.pages_requested + st.pages_pushed, data_pages, "{st:?}");
        assert!(st.postcopy_faults > 0 && st.pages_requested > 0, "{st:?}");
        incoming.finish();
        if marks {
            for p in 0..pages {
                let addr = page_to_guest(dst.regions(), p).expect("page");
                let got: u64 = dst
                    .memory()
                    .read_obj(GuestAddress(addr.0 + MARK))
                    .expect("read");
                assert_eq!(
                    got,
                    !(p as u64),
                    "page {p}: a late copy wiped the guest's write"
                );
            }
        }
    }

    /// Where the race test's fourth thread writes (the readers check the page's ends).
    const MARK: u64 = 2048;

    /// A page made room for that something mapped before the switch (restoring the VM
    /// maps the kvmclock page, as KVM sets its MSR) faults again once post-copy runs,
    /// and reads the source's data, not what was written there meanwhile.
    #[test]
    fn test_a_page_mapped_before_the_switch_waits_for_its_data() {
        use vm_memory::Bytes;
        let room = Room::new(|dst, at| {
            dst.memory().write_obj(0x5555u64, at).expect("write");
        });
        let reader = room.read_page_3();
        assert!(
            !reader.is_finished(),
            "a page mapped before the switch was read before its data came"
        );
        room.incoming
            .pushed(&[(room.at.0, PAGE_SIZE)], &room.page_3())
            .expect("push");
        room.check(reader);
    }

    /// A fault on a page made room for that a placing thread has taken but not yet
    /// written waits for that thread's map: mapped at once, it would read the zeros
    /// made before the pause.
    #[test]
    fn test_a_fault_on_a_page_being_placed_waits_for_its_data() {
        use std::os::unix::fs::FileExt;
        let room = Room::new(|_, _| {});
        let missing = room.incoming.remaining();
        // A placing thread takes page 3 ...
        assert!(room.incoming.shared.take(3));
        assert_eq!(
            room.incoming.remaining(),
            missing,
            "a page being placed still counts as missing"
        );
        let reader = room.read_page_3();
        assert!(
            !reader.is_finished(),
            "the fault was served before the page's data was written"
        );
        // ... and writes and maps it.
        room.dst
            .file()
            .write_all_at(&room.page_3(), 3 * PAGE_SIZE)
            .expect("write");
        let host = room.dst.regions()[0].host_addr + room.at.0;
        memory::fault::map(&room.incoming.shared.uffd, host, PAGE_BYTES).expect("map");
        room.incoming.shared.unmapped.take(3);
        room.incoming.shared.placing.fetch_sub(1, Ordering::AcqRel);
        assert_eq!(room.incoming.remaining(), missing - 1);
        room.check(reader);
    }

    /// A destination that made room for every page the source holds, in post-copy;
    /// its page 3 at `at`.
    struct Room {
        src: GuestRam,
        dst: GuestRam,
        at: GuestAddress,
        incoming: Incoming,
        _src_conn: Conn,
    }

    impl Room {
        /// `before` runs between the room and the switch.
        fn new(before: impl FnOnce(&GuestRam, GuestAddress)) -> Room {
            let (src, lacks) = source_ram();
            let dst = GuestRam::new(64, 46).expect("ram");
            let body = protocol::encode_ranges(&guest_ranges(&dst, &lacks));
            let room = make_room(&dst, &body, &AtomicBool::new(false)).expect("room");
            let at = page_to_guest(dst.regions(), 3).expect("page");
            before(&dst, at);
            let (src_conn, dst_conn) = conn_pair();
            let progress = Progress::new(Default::default());
            let incoming =
                Incoming::start(&dst, lacks, Some(room), dst_conn, progress).expect("start");
            Room {
                src,
                dst,
                at,
                incoming,
                _src_conn: src_conn,
            }
        }

        /// A thread reading page 3, 200 ms on.
        fn read_page_3(&self) -> std::thread::JoinHandle<u64> {
            use vm_memory::Bytes;
            let (dst, at) = (self.dst.clone(), self.at);
            let reader =
                std::thread::spawn(move || dst.memory().read_obj::<u64>(at).expect("read"));
            std::thread::sleep(Duration::from_millis(200));
            reader
        }

        /// The source's page 3.
        fn page_3(&self) -> Vec<u8> {
            use vm_memory::Bytes;
            let mut page = vec![0u8; PAGE_BYTES];
            self.src
                .memory()
                .read_slice(&mut page, self.at)
                .expect("read");
            page
        }

        /// The reader ends, having read the source's data.
        fn check(self, reader: std::thread::JoinHandle<u64>) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !reader.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "the page's map did not wake the fault"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(
                reader.join().expect("reader"),
                4,
                "page 3 holds the source's data"
            );
            self.incoming.finish();
        }
    }

    /// A destination that holds older contents of pages it lacks (a pre-copy sent them
    /// before they were written again) gets the source's: they are emptied before
    /// registration, or the kernel would never fault on them. Pages it holds and does
    /// not lack keep what they hold.
    #[test]
    fn test_older_copies_of_missing_pages_are_emptied() {
        use vm_memory::Bytes;
        let (src, lacks) = source_ram();
        let dst = GuestRam::new(64, 46).expect("ram");
        let at = |p: usize| page_to_guest(dst.regions(), p).expect("page");
        // Page 3 is missing (a multiple of 3); page 4 is not.
        for (p, v) in [(3usize, 0xdeadu64), (4, 0x4444)] {
            dst.memory().write_obj(v, at(p)).expect("write");
        }
        let (_src_conn, dst_conn) = conn_pair();
        let incoming = Incoming::start(
            &dst,
            lacks,
            None,
            dst_conn,
            Progress::new(Default::default()),
        )
        .expect("start");
        let mut page = vec![0u8; PAGE_BYTES];
        src.memory().read_slice(&mut page, at(3)).expect("read");
        incoming
            .pushed(&[(at(3).0, PAGE_SIZE)], &page)
            .expect("push page 3");
        let read = |p: usize| -> u64 { dst.memory().read_obj(at(p)).expect("read") };
        assert_eq!(read(3), 4, "page 3 holds the source's contents");
        assert_eq!(read(4), 0x4444, "page 4 keeps what it held");
        incoming.finish();
    }

    /// A page the destination did not lack is a protocol error on either side.
    #[test]
    fn test_pages_nobody_lacks_are_refused() {
        let (src, lacks) = source_ram();
        let dst = GuestRam::new(64, 46).expect("ram");
        let (src_conn, dst_conn) = conn_pair();
        let progress = Progress::new(Default::default());
        let incoming =
            Incoming::start(&dst, lacks.clone(), None, dst_conn, progress).expect("start");
        // Page 1 never held data on the source.
        let e = incoming
            .pushed(&[(PAGE_SIZE, PAGE_SIZE)], &[0u8; PAGE_BYTES])
            .expect_err("page 1 was not missing");
        assert!(e.to_string().contains("did not lack"), "{e}");
        drop(incoming);
        // The source refuses a request for it.
        let (a, mut b) = conn_pair();
        b.send(Kind::Request, &[&PAGE_SIZE.to_le_bytes()])
            .expect("send");
        let out = Outgoing::new(&src, lacks);
        let e = out.answer(a).expect_err("page 1 was not missing");
        assert!(e.to_string().contains("does not lack"), "{e}");
        src_conn.shutdown();
    }

    /// A list of missing pages, or of pages to make room for, is checked against the
    /// memory map before anything is registered or written: ranges outside RAM, across
    /// the MMIO hole, not whole pages, or a count that does not match the length are
    /// refused with what is wrong.
    #[test]
    fn test_bad_missing_lists_are_refused() {
        let ram = GuestRam::new(64, 46).expect("ram");
        let good = protocol::encode_ranges(&[(0, PAGE_SIZE), (8 * PAGE_SIZE, 2 * PAGE_SIZE)]);
        assert_eq!(decode_missing(&ram, &good).expect("good").count(), 3);
        for (body, expected) in [
            (
                protocol::encode_ranges(&[(64 << 20, PAGE_SIZE)]),
                "not all guest RAM here",
            ),
            (
                protocol::encode_ranges(&[((64 << 20) - PAGE_SIZE, 2 * PAGE_SIZE)]),
                "not all guest RAM here",
            ),
            (protocol::encode_ranges(&[(100, PAGE_SIZE)]), "whole pages"),
            (protocol::encode_ranges(&[(0, 0)]), "whole pages"),
            (
                // A good range before a bad one: nothing is written for either.
                protocol::encode_ranges(&[(0, PAGE_SIZE), (64 << 20, PAGE_SIZE)]),
                "not all guest RAM here",
            ),
            (good[..good.len() - 1].to_vec(), "says it holds 2 ranges"),
            (vec![1, 2, 3], "shorter than its count"),
        ] {
            let e = decode_missing(&ram, &body).expect_err(expected).to_string();
            assert!(e.contains(expected), "{e}");
            // A Prepare's list of pages to make room for is the same list, checked
            // before a byte is written.
            let e = make_room(&ram, &body, &AtomicBool::new(false))
                .expect_err(expected)
                .to_string();
            assert!(e.contains(expected), "{e}");
        }
        assert_eq!(
            ram.data_extents().expect("extents"),
            vec![],
            "nothing written for a bad list"
        );
        for (body, expected) in [
            (vec![], "1 to 512"),
            (vec![0u8; 8 * 513], "1 to 512"),
            (vec![0u8; 7], "1 to 512"),
            (100u64.to_le_bytes().to_vec(), "not a page's start"),
        ] {
            let e = protocol::decode_request(&body)
                .expect_err(expected)
                .to_string();
            assert!(e.contains(expected), "{e}");
        }
    }
}
