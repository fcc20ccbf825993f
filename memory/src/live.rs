//! Live snapshots of guest RAM: memory saved exactly as it was at one instant while the
//! guest runs on, by copy-before-write with userfaultfd write-protect in synchronous
//! mode.
//!
//! `LiveSave::prepare`, while the guest still runs, lists the pages of the memfd that
//! hold data, registers guest RAM for write-protect, starts the fault handler and
//! protects those pages. Until the instant of the snapshot the handler only notes a
//! page the guest writes and un-protects it (its contents then are not the
//! snapshot's). `LiveSave::protect`, the instant, with the VM paused, protects just
//! the pages noted (again) and those that gained data since (for the first time):
//! protecting all of them there took 5-11 ms of the pause for 128 MiB (README, live
//! snapshots). `LiveSave::start_writer`, once the guest runs again, starts the writer:
//! - the *writer* saves the listed pages in order, a run at a time, from guest RAM's
//!   mapping to the memory file, and leaves them protected: un-protecting a page is
//!   not enough to let the guest write it cheaply (`Shared::open` says why), and making
//!   every saved page writable took about as long as saving it;
//! - the *fault handler* takes each write fault on a protected page. It saves the pages
//!   of the fault's block (`BLOCK_PAGES`) that nobody took yet (copy-before-write),
//!   then un-protects the block's saved pages, makes them writable, and wakes the
//!   writes; a fault on a page the writer is saving is served once the writer has
//!   saved it, and the handler reads other faults meanwhile. Between faults it opens
//!   the blocks after the last one faulted on (`AHEAD_BLOCKS`), saving those of the
//!   nearest (`AHEAD_SAVED_BLOCKS`) that the writer has not reached: a guest writing
//!   through memory as fast as the writer saves it found nothing opened ahead, and
//!   faulted on every block. So
//!   only the blocks the guest writes while the save runs pay for being made writable,
//!   once each. ferry's own writes into guest RAM (block reads, the virtio rings) go
//!   through the same registered mapping, so they fault and are served the same way as
//!   the guest's. It runs at the lowest real-time priority (`sys::serve_first`): a
//!   write waits for it, and the writer would otherwise hold the core it needs. Its
//!   work per fault stays bounded: one block, and after it `AHEAD_SAVED_BLOCKS` saved
//!   and `AHEAD_BLOCKS` opened, reading faults between blocks.
//!
//! Pages that held nothing at the instant are never protected and never saved: they stay
//! holes in the file, which is what they were. The end unregisters guest RAM, which
//! removes every protection left, then wakes every write still waiting (unregistering
//! wakes none that wait on write-protect).
//!
//! Shared state, who writes it and who reads it:
//! - `early` (pages noted before the instant): the handler, for a fault it reads
//!   while `early` is `Some`, un-protects the page and adds it, both under the lock;
//!   `protect` takes the list out (leaving `None`) under the same lock, and that is
//!   the instant. A page is therefore either un-protected and in the list `protect`
//!   took, which protects it again while the VM is paused, or handled after the
//!   instant. A fault read after the instant and before `instant` is set (no guest
//!   runs then: only a message queued before the pause) waits for `instant`.
//! - `instant.todo` (pages not yet taken): the writer and the handler each take a page
//!   by clearing its bit (an atomic fetch-and), so exactly one of them saves it.
//! - `instant.unsaved` (pages not yet in the file): whoever took a page clears its bit
//!   once its bytes are in the file (release; the handler reads it with acquire). Only
//!   a page out of `unsaved` is ever un-protected after the instant, and only by the
//!   handler, so every write to a page waits until the file holds the page as it was
//!   at the instant. A fault on a page the writer took and has not saved is deferred
//!   by the handler until the writer clears its bit (or the save fails, and the end
//!   wakes it).
//! - `awaited` and `writer_saved`: the handler, with deferred faults, sets `awaited`,
//!   then (after a SeqCst fence) looks at their pages in `unsaved`; the writer, after
//!   each run, clears its bits, then (after a SeqCst fence) swaps `awaited` to false
//!   and, if it was set, signals `writer_saved`, which wakes the handler's poll.
//!   With a fence on each side, either the handler sees the page saved or the writer
//!   sees `awaited`, so a deferred fault is never left waiting for a signal that does
//!   not come.
//! - `registered`: the handler un-protects and wakes only under this lock while it is
//!   true; the end sets it false, unregisters and wakes under it, so an un-protect
//!   never meets an unregistered range.
//! - The handler's own `opened` (pages it opened) and deferred list: that thread only.
//! - `saved`, `faults`, `error`: atomics and a mutex, any thread; `error` keeps the
//!   first. The end is when `saved` reaches the page count (a block the handler took
//!   may still be on its way when the writer has taken its last).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd};
use vmm_sys_util::eventfd::EventFd;

use crate::dirty::uffd::{self, features};
use crate::dirty::{total_pages, Claim, DirtyBitmap, DirtyError, Mechanism, TrackedRam};
use crate::{GuestRam, PageSet};

/// Pages the writer saves at a time: large enough for efficient file writes, small
/// enough that a write fault on a page of the run waits briefly.
const RUN_PAGES: usize = 64;

/// Pages the fault handler saves (those nobody took yet) and opens to writes, around
/// and with the page a write faulted on: a guest that writes one page of a block
/// mostly writes its neighbours next, and each fault costs a round trip.
const BLOCK_PAGES: usize = 64;

/// Blocks the fault handler opens after the last one a write faulted on, while no
/// other fault waits.
const AHEAD_BLOCKS: usize = 32;

/// Of those, the first ones it also saves where nobody took their pages yet: a guest
/// that writes through memory about as fast as the writer saves it finds them open,
/// and the handler, at real-time priority, saves at most this many blocks (2 MiB,
/// about 1 ms here) per fault it serves.
const AHEAD_SAVED_BLOCKS: usize = 8;

/// Why a live save failed.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// Tracking or protection could not be set up.
    #[error(transparent)]
    Setup(#[from] DirtyError),
    /// The memory file could not be written (a full disk, for one).
    #[error("cannot write the memory file: {0}")]
    Write(String),
    /// Guest RAM could not be read.
    #[error("cannot read guest RAM: {0}")]
    Read(String),
    /// The save failed on one of its threads; the message says why.
    #[error("{0}")]
    Failed(String),
}

/// Counters of a running live save, for progress reports.
#[derive(Debug, Default)]
pub struct LiveProgress {
    /// Pages to save, known once protected.
    pub total: AtomicU64,
    /// Pages in the file.
    pub saved: AtomicU64,
    /// Write faults on pages not yet saved, each saved before its write went on
    /// (copy-before-write).
    pub faults: AtomicU64,
    /// How long each copy-before-write took, from reading the fault to waking the
    /// write (µs).
    latencies: Mutex<Vec<u32>>,
}

impl LiveProgress {
    /// p50, p99 and max of the copy-before-write times, in µs.
    pub fn fault_latency_us(&self) -> Option<(u32, u32, u32)> {
        let mut s = self.latencies.lock().expect("poisoned").clone();
        if s.is_empty() {
            return None;
        }
        s.sort_unstable();
        let at = |per_mille: usize| s[((s.len() - 1) * per_mille + 500) / 1000];
        Some((at(500), at(990), at(1000)))
    }
}

/// The pages of the instant, set by `protect`.
struct AtInstant {
    /// Pages nobody has taken to save yet.
    todo: PageSet,
    /// Pages not yet in the file.
    unsaved: PageSet,
    /// Pages that held data.
    data: DirtyBitmap,
    /// Pages in all, saved or not.
    pages: usize,
}

impl AtInstant {
    /// The first page of fault-handling block `block`, and its pages.
    fn block(&self, block: usize) -> (usize, usize) {
        let first = block * BLOCK_PAGES;
        (first, BLOCK_PAGES.min(self.pages.saturating_sub(first)))
    }

    /// Whether `page` held data and is in the file now.
    fn saved(&self, page: usize) -> bool {
        self.data.get(page) && !self.unsaved.contains(page)
    }
}

struct Shared {
    uffd: Uffd,
    ram: TrackedRam,
    file: File,
    instant: OnceLock<AtInstant>,
    /// Pages written and un-protected before the instant; `None` from the instant on.
    early: Mutex<Option<Vec<usize>>>,
    /// True until the end unregisters guest RAM (module doc).
    registered: Mutex<bool>,
    /// Set by the handler while a fault waits for a page the writer is saving; the
    /// writer then signals `writer_saved` after its next run (module doc).
    awaited: AtomicBool,
    writer_saved: EventFd,
    /// Tests: while set, the writer holds each run between saving it and marking it
    /// saved, so that a write meets a page in flight; until cleared or the save ends.
    #[cfg(test)]
    writer_gate: AtomicBool,
    /// Tests: write faults served after the instant, and ahead blocks opened.
    #[cfg(test)]
    served: AtomicU64,
    #[cfg(test)]
    opened_ahead: AtomicU64,
    progress: Arc<LiveProgress>,
    error: Mutex<Option<String>>,
    failed: AtomicBool,
    /// Said once: `MADV_POPULATE_WRITE` failed (a kernel before 5.14, say).
    populate_failed: AtomicBool,
}

impl Shared {
    fn fail(&self, msg: String) {
        tracing::error!("live snapshot: {msg}");
        self.error.lock().expect("poisoned").get_or_insert(msg);
        self.failed.store(true, Ordering::Release);
    }

    /// Copies memfd pages `first..first+count` to the file at the same offset, from
    /// guest RAM's mapping: reading a page never waits on write-protect (registered for
    /// that alone), and the pages stay as they were at the instant while their writes
    /// wait (module doc). One copy, not two through a buffer: `pread` into a buffer
    /// took 0.6-0.8 µs a page here, of about 1.8 for the whole save. The caller marks
    /// them saved (`done`).
    fn save(&self, first: usize, count: usize) -> Result<(), LiveError> {
        for (addr, len, offset) in self.ram.host_ranges_at(first, count) {
            crate::sys::pwrite_from(&self.file, addr, len, offset)
                .map_err(|e| LiveError::Write(format!("from guest RAM at {addr:p}: {e}")))?;
        }
        Ok(())
    }

    /// Takes the pages of `first..first+count` that nobody took yet and saves them;
    /// returns their runs.
    fn save_untaken(
        &self,
        at: &AtInstant,
        first: usize,
        count: usize,
    ) -> Result<Vec<(usize, usize)>, LiveError> {
        // `take` in the predicate: each page is taken once, here or by the writer.
        let taken: Vec<(usize, usize)> = runs_where(first, count, |p| at.todo.take(p)).collect();
        for &(run, n) in &taken {
            self.save(run, n)?;
            self.done(at, run, n);
        }
        Ok(taken)
    }

    /// Marks pages `first..first+count`, now in the file, saved.
    fn done(&self, at: &AtInstant, first: usize, count: usize) {
        for page in first..first + count {
            at.unsaved.take(page);
        }
        self.progress
            .saved
            .fetch_add(count as u64, Ordering::AcqRel);
    }

    /// Runs `op` on the host ranges of memfd pages `first..first+count`, one per region
    /// the run crosses.
    fn each_host_range(
        &self,
        first: usize,
        count: usize,
        op: impl Fn(*mut libc::c_void, usize) -> userfaultfd::Result<()>,
    ) -> Result<(), LiveError> {
        for (addr, len) in self.ram.host_ranges(first, count) {
            op(addr, len).map_err(|source| {
                LiveError::Setup(DirtyError::Uffd {
                    what: "UFFDIO_WRITEPROTECT",
                    source,
                })
            })?;
        }
        Ok(())
    }

    /// Opens the saved pages of `first..first+count` that `opened` does not hold yet to
    /// writes: un-protects them, makes their page-table entries writable, and adds them
    /// to `opened`; then, if `wake` or it opened any, wakes the writes waiting in the
    /// range.
    ///
    /// Un-protecting leaves the entries read-only while guest RAM stays registered, so
    /// each page's next guest write went through KVM's slow path, the kernel's write
    /// fault (`do_wp_page`, seen in a profile of the vCPU thread): a guest rewriting
    /// 32 MiB kept 0.04-0.13 of its pace during a 1 GiB live snapshot here, and about
    /// 0.5-0.7 with the entries made writable ahead of it (`MADV_POPULATE_WRITE`, about
    /// 0.7-1 µs a page; README, live snapshots). The entries are made writable between
    /// the un-protect and the wake: populating a page still protected would wait for
    /// this very thread. A page opened once is not un-protected again: each un-protect
    /// also drops KVM's mappings of the range.
    fn open(
        &self,
        at: &AtInstant,
        first: usize,
        count: usize,
        opened: &mut DirtyBitmap,
        wake: bool,
    ) -> Result<(), LiveError> {
        let registered = self.registered.lock().expect("poisoned");
        if !*registered {
            // The end removed every protection and woke every write.
            return Ok(());
        }
        let runs: Vec<_> = runs_where(first, count, |p| at.saved(p) && !opened.get(p)).collect();
        for &(run, n) in &runs {
            self.each_host_range(run, n, |addr, len| {
                self.uffd.remove_write_protection(addr, len, false)?;
                // Only a hint: the pages are saved and writable whether or not it took.
                if let Err(e) = crate::sys::populate_writable(addr, len) {
                    if !self.populate_failed.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "live snapshot: cannot make saved pages writable ({e}): the guest's writes take the kernel's slow path until the save ends"
                        );
                    }
                }
                Ok(())
            })?;
            opened.set_run(run, n);
        }
        if wake || !runs.is_empty() {
            self.each_host_range(first, count, |addr, len| self.uffd.wake(addr, len))?;
        }
        Ok(())
    }

    /// Un-protects `page` and wakes its writes, unless the end did (before the instant:
    /// the handler lets every write go on).
    fn let_through(&self, page: usize) -> Result<(), LiveError> {
        let registered = self.registered.lock().expect("poisoned");
        if !*registered {
            return Ok(());
        }
        self.each_host_range(page, 1, |addr, len| {
            self.uffd.remove_write_protection(addr, len, true)
        })
    }
}

/// The runs of consecutive pages of `first..first+count` for which `keep` holds,
/// calling `keep` once per page, in order (it may take the page).
fn runs_where(
    first: usize,
    count: usize,
    mut keep: impl FnMut(usize) -> bool,
) -> impl Iterator<Item = (usize, usize)> {
    let end = first + count;
    let mut page = first;
    std::iter::from_fn(move || {
        let mut start = None;
        while page < end {
            let kept = keep(page);
            page += 1;
            match (kept, start) {
                (true, None) => start = Some(page - 1),
                (false, Some(s)) => return Some((s, page - 1 - s)),
                _ => {}
            }
        }
        start.map(|s| (s, end - s))
    })
}

/// A live save in progress; see the module doc.
pub struct LiveSave {
    shared: Arc<Shared>,
    stop: EventFd,
    handler: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
    /// The data runs at `prepare`.
    earlier: Vec<(usize, usize)>,
    claim: Claim,
}

impl LiveSave {
    /// Everything that may happen while the guest still runs: claims guest RAM's
    /// userfaultfd, lists the pages that hold data now, registers guest RAM for
    /// write-protect, starts the fault handler, and protects those pages (a write to
    /// one is only noted until `protect`). `protect` follows, with the VM paused.
    /// `file` is sized by the caller to the memfd's size.
    pub fn prepare(ram: &GuestRam, file: File) -> Result<LiveSave, LiveError> {
        let tracked = ram.tracked();
        let claim = tracked.writes.claim(Mechanism::Userfaultfd)?;
        let earlier = tracked
            .data_pages()
            .map_err(|e| LiveError::Read(e.to_string()))?;
        let uffd = uffd::open(&[features::WP, features::WP_SHMEM], "live snapshot")?;
        uffd::register(&uffd, &tracked)?;
        let shared = Arc::new(Shared {
            uffd,
            ram: tracked,
            file,
            instant: OnceLock::new(),
            early: Mutex::new(Some(Vec::new())),
            registered: Mutex::new(true),
            awaited: AtomicBool::new(false),
            #[cfg(test)]
            writer_gate: AtomicBool::new(false),
            #[cfg(test)]
            served: AtomicU64::new(0),
            #[cfg(test)]
            opened_ahead: AtomicU64::new(0),
            writer_saved: EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
                LiveError::Setup(DirtyError::Sys {
                    what: "eventfd",
                    source,
                })
            })?,
            progress: Arc::default(),
            error: Mutex::new(None),
            failed: AtomicBool::new(false),
            populate_failed: AtomicBool::new(false),
        });
        let failed = |what: &'static str, source: std::io::Error| {
            let _ = uffd::unregister(&shared.uffd, &shared.ram);
            LiveError::Setup(DirtyError::Sys { what, source })
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| failed("eventfd", e))?;
        let thread_stop = stop.try_clone().map_err(|e| failed("eventfd", e))?;
        // The handler runs before the first page is protected: a write to a protected
        // page with nobody to serve it would wait forever.
        let s = shared.clone();
        let handler = std::thread::Builder::new()
            .name("snapshot-cbw".into())
            .spawn(move || {
                // Ahead of the writer: a write waits for this thread (module doc).
                if let Err(e) = crate::sys::serve_first() {
                    tracing::debug!("live snapshot: copy-before-write keeps normal priority: {e}");
                }
                seccomp::apply(seccomp::Thread::Memory);
                handle_faults(&s, &thread_stop)
            })
            .map_err(|e| failed("spawn the copy-before-write thread", e))?;
        let live = LiveSave {
            shared,
            stop,
            handler: Some(handler),
            writer: None,
            earlier,
            claim,
        };
        // Protected while the guest runs; the pages it writes before the instant are
        // noted and protected again then. (Dropping `live` on failure unregisters.)
        for &(first, count) in &live.earlier {
            uffd::protect_run(&live.shared.uffd, &live.shared.ram, first, count, true)?;
        }
        Ok(live)
    }

    /// The instant of the snapshot, with the VM paused (guest RAM must not change during
    /// this call): lists the pages that hold data (walking only what held none at
    /// `prepare`), protects those the guest wrote since `prepare` protected them and
    /// those that gained data since. `start_writer` follows.
    pub fn protect(&mut self) -> Result<(), LiveError> {
        let shared = self.shared.clone();
        if let Some(e) = shared.error.lock().expect("poisoned").clone() {
            return Err(LiveError::Failed(e));
        }
        let runs = shared
            .ram
            .data_pages_since(&self.earlier)
            .map_err(|e| LiveError::Read(e.to_string()))?;
        let Some(noted) = shared.early.lock().expect("poisoned").take() else {
            return Err(LiveError::Failed("protect was called twice".into()));
        };
        let mut data = DirtyBitmap::new(&shared.ram.regions);
        for &(first, count) in &runs {
            data.set_run(first, count);
        }
        // Protected now: the pages that gained data since `prepare` and those written
        // since (noted). Every other page that holds data is still protected from then.
        let mut held = DirtyBitmap::new(&shared.ram.regions);
        for &(first, count) in &self.earlier {
            held.set_run(first, count);
        }
        let mut again = data.clone();
        again.remove(&held);
        for page in noted {
            again.set(page);
        }
        shared
            .progress
            .total
            .store(data.count() as u64, Ordering::Release);
        // Before `instant` is set (module doc). A failure here fails the save: `finish`
        // must not wait for pages nobody will save.
        for (first, count) in again.runs() {
            if let Err(e) = uffd::protect_run(&shared.uffd, &shared.ram, first, count, true) {
                let e = LiveError::Setup(e);
                shared.fail(e.to_string());
                return Err(e);
            }
        }
        let pages = total_pages(&shared.ram.regions);
        // Cannot fail: `early` was taken above, once.
        let _ = shared.instant.set(AtInstant {
            todo: PageSet::from_bitmap(&data, pages),
            unsaved: PageSet::from_bitmap(&data, pages),
            data,
            pages,
        });
        Ok(())
    }

    /// Starts the writer, after `protect` (`finish` starts it if nobody did). A caller
    /// that paused the guest for `protect` starts it once the guest runs again: on two
    /// cores a writer started inside the pause kept the resume waiting for a vCPU
    /// thread's wake-up, up to 3 ms.
    pub fn start_writer(&mut self) -> Result<(), LiveError> {
        if self.writer.is_some() {
            return Ok(());
        }
        let s = self.shared.clone();
        let writer = std::thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(move || {
                seccomp::apply(seccomp::Thread::Memory);
                write_all(&s)
            })
            .map_err(|source| {
                LiveError::Setup(DirtyError::Sys {
                    what: "spawn the snapshot writer",
                    source,
                })
            })?;
        self.writer = Some(writer);
        Ok(())
    }

    /// `prepare` and `protect` at once, then the writer, for a caller whose guest RAM
    /// does not change meanwhile.
    pub fn start(ram: &GuestRam, file: File) -> Result<LiveSave, LiveError> {
        let mut live = LiveSave::prepare(ram, file)?;
        live.protect()?;
        live.start_writer()?;
        Ok(live)
    }

    /// Counters for progress reports.
    pub fn progress(&self) -> Arc<LiveProgress> {
        self.shared.progress.clone()
    }

    /// `complete`, then removes all protection (the guest writes freely again) and
    /// stops the threads.
    pub fn finish(mut self) -> Result<(), LiveError> {
        let result = self.complete();
        drop(self);
        result
    }

    /// Waits until every page is in the file, or the save failed. Without a successful
    /// `protect` the save fails. A failed save removes all protection at once. A
    /// complete one leaves that to its drop, which unregisters guest RAM (about 4 ms
    /// for 128 MiB of data here), so that its caller can answer first: a claim of guest
    /// RAM's userfaultfd meanwhile waits for the drop instead of failing.
    pub fn complete(&mut self) -> Result<(), LiveError> {
        if self.shared.instant.get().is_none() {
            self.shared
                .fail("the save ended before the instant of the snapshot".into());
        } else if let Err(e) = self.start_writer() {
            self.shared.fail(e.to_string());
        }
        if let Some(w) = self.writer.take() {
            if w.join().is_err() {
                self.shared.fail("the writer thread panicked".into());
            }
        }
        // Pages the handler took may still be on their way.
        let progress = &self.shared.progress;
        while !self.shared.failed.load(Ordering::Acquire)
            && progress.saved.load(Ordering::Acquire) < progress.total.load(Ordering::Acquire)
        {
            if self.handler.as_ref().is_none_or(|h| h.is_finished()) {
                self.shared
                    .fail("the copy-before-write thread ended early".into());
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let error = self.shared.error.lock().expect("poisoned").take();
        // Either way only the drop is left: a claim meanwhile waits for it.
        self.claim.releasing();
        if let Some(e) = error {
            self.finish_threads();
            return Err(LiveError::Failed(e));
        }
        Ok(())
    }

    /// Unregisters guest RAM, which drops every protection and wakes every waiting
    /// write, then stops the handler.
    fn finish_threads(&mut self) {
        {
            let mut registered = self.shared.registered.lock().expect("poisoned");
            *registered = false;
            if let Err(e) = uffd::unregister(&self.shared.uffd, &self.shared.ram) {
                tracing::error!("live snapshot: cannot unregister guest RAM: {e}");
            }
            // Unregistering does not wake writes that wait on write-protect: a fault
            // read and left (the save failed) or not read yet.
            let pages = total_pages(&self.shared.ram.regions);
            for (addr, len) in self.shared.ram.host_ranges(0, pages) {
                let _ = self.shared.uffd.wake(addr, len);
            }
        }
        let _ = self.stop.write(1);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

impl Drop for LiveSave {
    fn drop(&mut self) {
        self.shared.failed.store(true, Ordering::Release);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if self.handler.is_some() {
            self.finish_threads();
        }
    }
}

/// The writer: every page still to take, in order, a run at a time.
fn write_all(shared: &Shared) {
    let Some(at) = shared.instant.get() else {
        return;
    };
    let mut from = 0;
    while let Some(first) = at.todo.next(from) {
        if first < from || shared.failed.load(Ordering::Acquire) {
            // Wrapped around: every page is taken.
            return;
        }
        // Take a run of consecutive pages, stopping at one the handler took.
        let mut count = 0;
        while count < RUN_PAGES && at.todo.take(first + count) {
            count += 1;
        }
        from = first + count.max(1);
        if count == 0 {
            continue;
        }
        // A failure ends the save; the end's unregister lets every write go on.
        if let Err(e) = shared.save(first, count) {
            shared.fail(e.to_string());
            return;
        }
        // A failing test's drop sets `failed`, and must not wait on the gate.
        #[cfg(test)]
        while shared.writer_gate.load(Ordering::Acquire) && !shared.failed.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        shared.done(at, first, count);
        // Pairs with the handler's fence in `Handler::serve_deferred` (module doc).
        std::sync::atomic::fence(Ordering::SeqCst);
        if shared.awaited.swap(false, Ordering::SeqCst) {
            let _ = shared.writer_saved.write(1);
        }
    }
}

/// The fault handler's own state.
struct Handler {
    /// Pages it opened to writes.
    opened: DirtyBitmap,
    /// Faults on pages the writer was saving, served once it has.
    deferred: Vec<usize>,
    /// The next block to open ahead of the last fault, and how many more.
    next: usize,
    left: usize,
}

/// The copy-before-write handler. Between faults it serves the faults that waited for
/// the writer, then opens the blocks after the last one faulted on (saving what nobody
/// took yet of the nearest), a block at a time, so that a guest writing through memory
/// in order finds them open (each fault costs the guest a round trip to this thread).
fn handle_faults(shared: &Shared, stop: &EventFd) {
    let mut h = Handler {
        opened: DirtyBitmap::new(&shared.ram.regions),
        deferred: Vec::new(),
        next: 0,
        left: 0,
    };
    loop {
        match shared.uffd.read_event() {
            Ok(Some(Event::Pagefault { addr, .. })) => {
                let Some((page, _)) = shared.ram.page_at(addr as u64) else {
                    continue;
                };
                {
                    let mut early = shared.early.lock().expect("poisoned");
                    if let Some(noted) = early.as_mut() {
                        // Before the instant: the write goes on, and `protect`
                        // protects the page again (module doc).
                        if let Err(e) = shared.let_through(page) {
                            shared.fail(e.to_string());
                        }
                        noted.push(page);
                        continue;
                    }
                }
                if let Err(e) = h.serve(shared, page) {
                    shared.fail(e.to_string());
                }
                continue;
            }
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(e) => {
                // The end finds this thread gone and fails the save.
                return shared.fail(format!("reading faults: {e}"));
            }
        }
        // No fault waits.
        if let Some(at) = shared.instant.get() {
            if !shared.failed.load(Ordering::Acquire) {
                match h.serve_deferred(shared, at) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => shared.fail(e.to_string()),
                }
                if h.left > 0 {
                    let nth = AHEAD_BLOCKS - h.left;
                    h.left -= 1;
                    let (first, count) = at.block(h.next);
                    h.next += 1;
                    // The nearest saved here if the writer has not got there: a guest
                    // writing through memory as fast as the writer saves it otherwise
                    // found nothing opened ahead, and faulted on every block.
                    let saved = if nth < AHEAD_SAVED_BLOCKS {
                        shared.save_untaken(at, first, count).map(|_| ())
                    } else {
                        Ok(())
                    };
                    let opened =
                        saved.and_then(|()| shared.open(at, first, count, &mut h.opened, false));
                    if let Err(e) = opened {
                        shared.fail(e.to_string());
                    }
                    #[cfg(test)]
                    shared.opened_ahead.fetch_add(1, Ordering::Release);
                    continue;
                }
            }
        }
        let fds = [
            shared.uffd.as_raw_fd(),
            shared.writer_saved.as_raw_fd(),
            stop.as_raw_fd(),
        ];
        match crate::sys::wait_any_readable(&fds) {
            Ok(ready) if ready & 0b100 != 0 => return,
            Ok(ready) => {
                if ready & 0b10 != 0 {
                    let _ = shared.writer_saved.read();
                }
            }
            Err(e) => return shared.fail(format!("poll: {e}")),
        }
    }
}

impl Handler {
    /// Serves a write fault on `page` after the instant: saves the pages of its block
    /// that nobody took yet (copy-before-write), then opens the block's saved pages and
    /// wakes the write, and arms the blocks after it. A page the writer is saving is
    /// deferred until it has. Once the save failed, only wakes the write.
    fn serve(&mut self, shared: &Shared, page: usize) -> Result<(), LiveError> {
        let since = Instant::now();
        #[cfg(test)]
        shared.served.fetch_add(1, Ordering::Relaxed);
        // A fault read between the instant and `instant` being set: `protect` sets it
        // while the VM is still paused.
        while shared.instant.get().is_none() && !shared.failed.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(20));
        }
        let Some(at) = shared.instant.get() else {
            return Ok(());
        };
        if shared.failed.load(Ordering::Acquire) {
            // The end wakes every write.
            return Ok(());
        }
        let block = page / BLOCK_PAGES;
        let (first, count) = at.block(block);
        let copied = shared
            .save_untaken(at, first, count)?
            .iter()
            .any(|&(run, n)| (run..run + n).contains(&page));
        if at.unsaved.contains(page) {
            // The writer has it: served when the writer says it saved a run.
            self.deferred.push(page);
            return Ok(());
        }
        shared.open(at, first, count, &mut self.opened, true)?;
        self.next = block + 1;
        self.left = AHEAD_BLOCKS;
        if copied {
            shared.progress.faults.fetch_add(1, Ordering::Relaxed);
            let us = u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX);
            shared.progress.latencies.lock().expect("poisoned").push(us);
        }
        Ok(())
    }

    /// Serves the deferred faults whose pages the writer has saved since; true if it
    /// served any. While some still wait, asks the writer to signal its next run.
    fn serve_deferred(&mut self, shared: &Shared, at: &AtInstant) -> Result<bool, LiveError> {
        if self.deferred.is_empty() {
            return Ok(false);
        }
        // Set before the check, with the writer's fence between its `done` and its
        // look at `awaited`: either this check sees the page saved, or the writer sees
        // `awaited` and signals.
        shared.awaited.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let ready: Vec<usize> = self
            .deferred
            .extract_if(.., |p| !at.unsaved.contains(*p))
            .collect();
        for &page in &ready {
            let (first, count) = at.block(page / BLOCK_PAGES);
            shared.open(at, first, count, &mut self.opened, true)?;
        }
        Ok(!ready.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PAGE_BYTES, PAGE_SIZE};
    use vm_memory::{Bytes, GuestAddress};

    /// A memory file of `size` bytes (a hole), new.
    fn temp_file(name: &str, size: u64) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("ferry-live-{}-{name}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        file.set_len(size).expect("size");
        (path, file)
    }

    /// Guest RAM whose pages `pages` each hold their number plus one; the rest hold
    /// nothing.
    fn numbered_ram(pages: std::ops::Range<u64>) -> GuestRam {
        let ram = GuestRam::new(64, 46).expect("ram");
        for p in pages {
            ram.memory()
                .write_obj(p + 1, GuestAddress(p * PAGE_SIZE))
                .expect("fill");
        }
        ram
    }

    /// The first word of `page` in a memory file's bytes.
    fn word_at(file: &[u8], page: usize) -> u64 {
        u64::from_le_bytes(file[page * PAGE_BYTES..][..8].try_into().expect("8"))
    }

    /// Host threads rewrite every page while the save runs, from the top down and in
    /// the writer's own order, through the registered mapping as a device would: the
    /// file holds every page as it was at the start, pages that held nothing stay
    /// holes, and RAM holds the new values.
    #[test]
    fn test_the_file_holds_memory_as_it_was_while_writes_race_the_save() {
        let ram = GuestRam::new(64, 46).expect("ram");
        let pages = total_pages(ram.regions());
        let at = |p: usize| crate::dirty::page_to_guest(ram.regions(), p).expect("page");
        // Two of every three pages hold their number; the third never held anything.
        let held = |p: usize| p % 3 != 2;
        for p in (0..pages).filter(|p| held(*p)) {
            ram.memory().write_obj(p as u64 + 1, at(p)).expect("fill");
        }
        let (path, file) = temp_file("race", ram.size());
        let live = LiveSave::start(&ram, file).expect("start");
        let progress = live.progress();
        assert_eq!(
            progress.total.load(Ordering::Acquire),
            (0..pages).filter(|p| held(*p)).count() as u64
        );
        std::thread::scope(|s| {
            for t in 0..2 {
                let ram = &ram;
                s.spawn(move || {
                    for i in 0..pages {
                        let p = if t == 0 { pages - 1 - i } else { i };
                        ram.memory()
                            .write_obj(0xdead_0000_0000 + p as u64, at(p))
                            .expect("write");
                    }
                });
            }
        });
        live.finish().expect("finish");
        let saved = std::fs::read(&path).expect("read the file");
        assert_eq!(saved.len() as u64, ram.size());
        for p in 0..pages {
            let word = word_at(&saved, p);
            let want = if held(p) { p as u64 + 1 } else { 0 };
            assert_eq!(word, want, "page {p} in the file");
            let now: u64 = ram.memory().read_obj(at(p)).expect("read");
            assert_eq!(now, 0xdead_0000_0000 + p as u64, "page {p} in RAM");
        }
        assert_eq!(
            progress.saved.load(Ordering::Acquire),
            progress.total.load(Ordering::Acquire)
        );
        assert!(
            progress.faults.load(Ordering::Acquire) > 0,
            "some writes came before the writer"
        );
        // Never-held pages stay holes in the file.
        let file = File::open(&path).expect("open");
        let extents = crate::sys::data_extents(&file, ram.size()).expect("extents");
        let in_file: u64 = extents.iter().map(|e| e.1).sum();
        assert!(in_file < ram.size(), "{extents:?}");
        // Nothing stays protected: a write after the end goes straight through.
        ram.memory()
            .write_obj(7u64, GuestAddress(0))
            .expect("write after");
        let _ = std::fs::remove_file(&path);
    }

    /// Pages that hold data but were never mapped in this process (written with
    /// `pwrite`, as an incoming migration or a memfd handed over by another process
    /// leaves them): protection still catches the first write through the mapping.
    #[test]
    fn test_pages_never_mapped_here_are_protected_too() {
        const PAGES: usize = 4096;
        let mark = |p: usize| u8::try_from(p % 251).unwrap_or(0) + 1;
        let ram = GuestRam::new(64, 46).expect("ram");
        let mut data = vec![0u8; PAGES * PAGE_BYTES];
        data.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = mark(i / PAGE_BYTES));
        ram.fill(&data, GuestAddress(0))
            .expect("pwrite, no mapping touched");
        let (path, file) = temp_file("unmapped", ram.size());
        let live = LiveSave::start(&ram, file).expect("start");
        let progress = live.progress();
        // From the top, where the writer (from the bottom) is not yet.
        for p in (0..PAGES as u64).rev() {
            ram.memory()
                .write_obj(0xffu8, GuestAddress(p * PAGE_SIZE))
                .expect("write");
        }
        live.finish().expect("finish");
        assert!(
            progress.faults.load(Ordering::Acquire) > 0,
            "writes came first"
        );
        let saved = std::fs::read(&path).expect("read the file");
        for p in 0..PAGES {
            assert_eq!(saved[p * PAGE_BYTES], mark(p), "page {p} in the file");
        }
        let _ = std::fs::remove_file(&path);
    }

    /// A page that gains data between `prepare` (the guest still running) and `protect`
    /// (the instant of the snapshot) is saved as it was at `protect`.
    #[test]
    fn test_pages_written_before_the_instant_are_saved() {
        let ram = GuestRam::new(64, 46).expect("ram");
        ram.memory().write_obj(1u64, GuestAddress(0)).expect("fill");
        let (path, file) = temp_file("instant", ram.size());
        let mut live = LiveSave::prepare(&ram, file).expect("prepare");
        // A page that held nothing at `prepare`, written before the instant.
        let late = GuestAddress(40 * PAGE_SIZE);
        ram.memory().write_obj(2u64, late).expect("write before");
        live.protect().expect("protect");
        ram.memory().write_obj(3u64, late).expect("write after");
        live.finish().expect("finish");
        let saved = std::fs::read(&path).expect("read the file");
        let word = word_at(&saved, 40);
        assert_eq!(word, 2, "the page as it was at the instant");
        let _ = std::fs::remove_file(&path);
    }

    /// Pages written while `prepare`'s protection stands, before the instant (the guest
    /// still running), by two threads: the file holds them as they were at `protect`,
    /// not as written before or after it.
    #[test]
    fn test_pages_written_between_prepare_and_the_instant_are_saved_as_at_the_instant() {
        const PAGES: usize = 2048;
        let ram = GuestRam::new(64, 46).expect("ram");
        let at = |p: usize| GuestAddress(p as u64 * PAGE_SIZE);
        for p in 0..PAGES {
            ram.memory().write_obj(1u64, at(p)).expect("fill");
        }
        let (path, file) = temp_file("early", ram.size());
        let mut live = LiveSave::prepare(&ram, file).expect("prepare");
        // Each thread writes its half of the pages over and over; they stop for the
        // instant, as vCPUs pause.
        let sweep = |value: u64, passes: usize| {
            std::thread::scope(|s| {
                for t in 0..2 {
                    let ram = &ram;
                    s.spawn(move || {
                        for pass in 0..passes {
                            for p in (t..PAGES).step_by(2) {
                                ram.memory()
                                    .write_obj(value + pass as u64, at(p))
                                    .expect("write");
                            }
                        }
                    });
                }
            });
        };
        sweep(100, 3);
        let noted = live
            .shared
            .early
            .lock()
            .expect("poisoned")
            .as_ref()
            .map(Vec::len);
        assert!(
            noted.is_some_and(|n| n >= PAGES),
            "every page faulted once before the instant: {noted:?}"
        );
        live.protect().expect("protect");
        live.start_writer().expect("writer");
        // The instant holds 102 in every page; later writes race the writer.
        sweep(200, 2);
        live.finish().expect("finish");
        let saved = std::fs::read(&path).expect("read the file");
        for p in 0..PAGES {
            let word = word_at(&saved, p);
            assert_eq!(word, 102, "page {p} in the file");
        }
        let _ = std::fs::remove_file(&path);
    }

    /// A write to a page the writer has saved goes on while the save still runs (the
    /// handler opens its block), not only when the end unregisters guest RAM; the file
    /// keeps the page as it was.
    #[test]
    fn test_a_write_to_a_saved_page_goes_on_before_the_end() {
        const PAGES: u64 = 512;
        let ram = numbered_ram(0..PAGES);
        let (path, file) = temp_file("saved", ram.size());
        let live = LiveSave::start(&ram, file).expect("start");
        let progress = live.progress();
        let deadline = Instant::now() + Duration::from_secs(5);
        while progress.saved.load(Ordering::Acquire) < PAGES {
            assert!(Instant::now() < deadline, "the writer saves every page");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (sent, wrote) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let ram = &ram;
            s.spawn(move || {
                for p in [100, 101, 300] {
                    ram.memory()
                        .write_obj(0xabcd_u64, GuestAddress(p * PAGE_SIZE))
                        .expect("write");
                }
                let _ = sent.send(());
            });
            let went_on = wrote.recv_timeout(Duration::from_secs(5));
            // Let the write go on either way before the scope joins it.
            live.finish().expect("finish");
            assert!(went_on.is_ok(), "the writes waited for the end");
        });
        assert_eq!(
            progress.faults.load(Ordering::Acquire),
            0,
            "no copy-before-write: the pages were saved"
        );
        let saved = std::fs::read(&path).expect("read the file");
        for p in [100usize, 101, 300] {
            let word = word_at(&saved, p);
            assert_eq!(word, p as u64 + 1, "page {p} in the file");
        }
        let _ = std::fs::remove_file(&path);
    }

    /// A live save of `ram` (data from page 32) past its instant, its writer holding its
    /// first run (from page 32) until `writer_gate` is cleared.
    fn with_the_writer_held(ram: &GuestRam, name: &str) -> (std::path::PathBuf, LiveSave) {
        let (path, file) = temp_file(name, ram.size());
        let mut live = LiveSave::prepare(ram, file).expect("prepare");
        live.shared.writer_gate.store(true, Ordering::Release);
        live.protect().expect("protect");
        live.start_writer().expect("writer");
        let at = live.shared.instant.get().expect("instant");
        let deadline = Instant::now() + Duration::from_secs(5);
        while at.todo.contains(32) {
            assert!(Instant::now() < deadline, "the writer takes the first run");
            std::thread::sleep(Duration::from_millis(1));
        }
        (path, live)
    }

    /// A write to a page the writer is saving waits until the writer has saved it, and
    /// no longer: the writer tells the handler, which lets it go on, while the save
    /// still runs. Opening a block for a write elsewhere in it leaves such a page
    /// protected. The file keeps the pages as they were.
    #[test]
    fn test_a_write_to_a_page_the_writer_is_saving_goes_on_once_it_is_saved() {
        // Pages 32..160 hold data: the writer's first run, 32..96, ends halfway through
        // the second block, 64..128.
        let ram = numbered_ram(32..160);
        let (path, live) = with_the_writer_held(&ram, "in-flight");
        let shared = live.shared.clone();
        let at = shared.instant.get().expect("instant");
        let (sent, wrote) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let ram = &ram;
            s.spawn(move || {
                // Nobody took 100: saved here, and its block opened.
                for p in [100usize, 70] {
                    ram.memory()
                        .write_obj(0xabcd_u64, GuestAddress(p as u64 * PAGE_SIZE))
                        .expect("write");
                    // Whether the page was in the file when the write went on.
                    let _ = sent.send((p, !at.unsaved.contains(p)));
                }
            });
            // Before `finish`: the end would let the writes go on in any case. 100's
            // goes on while the writer still holds its run, 70's once it has saved it.
            let mut went_on = vec![wrote.recv_timeout(Duration::from_secs(3))];
            live.shared.writer_gate.store(false, Ordering::Release);
            went_on.push(wrote.recv_timeout(Duration::from_secs(3)));
            live.finish().expect("finish");
            for w in went_on {
                let (page, saved_first) = w.expect("a write waited for the end");
                assert!(saved_first, "page {page} was written before it was saved");
            }
        });
        let saved = std::fs::read(&path).expect("read the file");
        for p in [70, 100] {
            assert_eq!(word_at(&saved, p), p as u64 + 1, "page {p} as it was");
        }
        let _ = std::fs::remove_file(&path);
    }

    /// A guest writing through memory ahead of the writer finds the blocks after its
    /// first fault saved and opened by the handler: its next write there is no fault.
    #[test]
    fn test_blocks_ahead_of_a_fault_are_opened_where_the_writer_has_not_been() {
        // Pages 32..1024 hold data; the writer holds its first run, 32..96.
        let ram = numbered_ram(32..1024);
        let (path, live) = with_the_writer_held(&ram, "ahead");
        let shared = live.shared.clone();
        let at = shared.instant.get().expect("instant");
        let write = |page: u64| {
            ram.memory()
                .write_obj(0xabcd_u64, GuestAddress(page * PAGE_SIZE))
                .expect("write");
        };
        // Block 3: a fault, saved by the handler (copy-before-write).
        write(200);
        // Block 4, the first after it, is saved and opened then.
        let deadline = Instant::now() + Duration::from_secs(5);
        while shared.opened_ahead.load(Ordering::Acquire) == 0 {
            assert!(Instant::now() < deadline, "block 4 is opened");
            std::thread::sleep(Duration::from_millis(1));
        }
        let saved_ahead = !at.unsaved.contains(300);
        write(300);
        let served = shared.served.load(Ordering::Relaxed);
        live.shared.writer_gate.store(false, Ordering::Release);
        live.finish().expect("finish");
        assert!(saved_ahead, "block 4 was saved before the writer got there");
        assert_eq!(served, 1, "faults served: the write to block 4 was one");
        let saved = std::fs::read(&path).expect("read the file");
        for p in [200, 300] {
            assert_eq!(word_at(&saved, p), p as u64 + 1, "page {p} as it was");
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn test_runs_where_asks_once_per_page() {
        let asked = std::cell::RefCell::new(Vec::new());
        let runs: Vec<_> = runs_where(10, 10, |p| {
            asked.borrow_mut().push(p);
            !(13..15).contains(&p) && p != 17
        })
        .collect();
        assert_eq!(runs, [(10, 3), (15, 2), (18, 2)]);
        assert_eq!(*asked.borrow(), (10..20).collect::<Vec<_>>());
        assert_eq!(runs_where(0, 4, |_| false).count(), 0);
        assert_eq!(runs_where(0, 4, |_| true).collect::<Vec<_>>(), [(0, 4)]);
    }

    /// A save ended without its instant (no `protect`) fails rather than report a file
    /// that holds nothing, and protects nothing after: writes go on.
    #[test]
    fn test_a_save_finished_before_its_instant_fails() {
        let ram = GuestRam::new(64, 46).expect("ram");
        ram.memory().write_obj(1u64, GuestAddress(0)).expect("fill");
        let (path, file) = temp_file("no-instant", ram.size());
        let live = LiveSave::prepare(&ram, file).expect("prepare");
        let e = live.finish().expect_err("no instant");
        assert!(e.to_string().contains("before the instant"), "{e}");
        ram.memory()
            .write_obj(2u64, GuestAddress(0))
            .expect("write after");
        let _ = std::fs::remove_file(&path);
    }

    /// A file that cannot take the pages fails the save with the reason, and removes
    /// every protection: writes go on.
    #[test]
    fn test_a_write_error_fails_the_save_and_unprotects_everything() {
        let ram = GuestRam::new(64, 46).expect("ram");
        for p in 0..1024u64 {
            ram.memory()
                .write_obj(p, GuestAddress(p * PAGE_SIZE))
                .expect("fill");
        }
        // Read-only: every write fails (EBADF), as a full disk would (ENOSPC).
        let (path, file) = temp_file("ro", 0);
        drop(file);
        let ro = File::open(&path).expect("open read-only");
        let live = LiveSave::start(&ram, ro).expect("start");
        let e = live.finish().expect_err("the file takes nothing");
        assert!(
            e.to_string().contains("cannot write the memory file"),
            "{e}"
        );
        for p in 0..1024u64 {
            ram.memory()
                .write_obj(p + 1, GuestAddress(p * PAGE_SIZE))
                .expect("write after the failure");
        }
        let _ = std::fs::remove_file(&path);
    }
}
