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
//!   mapping to the memory file, un-protects each run once it is saved, and makes its
//!   page-table entries writable (`Shared::unprotect` says why);
//! - the *fault handler* takes each write fault on a protected page, saves that page
//!   first, then un-protects it, which lets the writer go on (copy-before-write).
//!   ferry's own writes into guest RAM (block reads, the virtio rings) go through the
//!   same registered mapping, so they fault and are served the same way as the
//!   guest's.
//!
//! Pages that held nothing at the instant are never protected and never saved: they stay
//! holes in the file, which is what they were.
//!
//! Shared state, who writes it and who reads it:
//! - `early` (pages noted before the instant): the handler, for a fault it reads
//!   while `early` is `Some`, un-protects the page and adds it, both under the lock;
//!   `protect` takes the list out (leaving `None`) under the same lock, and that is
//!   the instant. A page is therefore either un-protected and in the list `protect`
//!   took, which protects it again while the VM is paused, or handled after the
//!   instant, by copy-before-write; no page is un-protected after the instant without
//!   being saved first. `protect` protects the pages before it sets `todo`: a fault
//!   read after the instant and before `todo` is set (no guest runs then: only a
//!   message queued before the pause) is left to the writer, which saves and
//!   un-protects the page later; one read after `todo` is set takes the page and
//!   un-protects it after saving it, and nothing protects it again.
//! - `todo` (pages not yet taken): the writer and the handler each take a page by
//!   clearing its bit (an atomic fetch-and), so exactly one of them saves it. Whoever
//!   took a page un-protects it only after its bytes are in the file; until then every
//!   write to it waits, so the file holds the page as it was at the instant. A fault on a
//!   page the writer took is left to the writer, whose un-protect wakes the waiting
//!   thread.
//! - `saved`, `faults`, `error`: atomics and a mutex, any thread; `error` keeps the
//!   first. The end is when `saved` reaches the page count (a page taken by the
//!   handler may still be on its way when the writer has taken its last). A page
//!   counts once it is in the file and un-protected: the end unregisters guest RAM,
//!   after which an un-protect still to come would fail.

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
use crate::{GuestRam, PageSet, PAGE_BYTES};

/// Pages the writer saves and un-protects at a time: large enough for efficient file
/// writes, small enough that a write fault on a page of the run waits briefly.
const RUN_PAGES: usize = 64;

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
    /// Pages in the file (and un-protected).
    pub saved: AtomicU64,
    /// Pages saved by the fault handler, before a write.
    pub faults: AtomicU64,
    /// How long each copy-before-write took, from reading the fault to un-protecting
    /// the page (µs).
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

struct Shared {
    uffd: Uffd,
    ram: TrackedRam,
    file: File,
    /// Set by `protect`: the instant's pages.
    todo: OnceLock<PageSet>,
    /// Pages written and un-protected before the instant; `None` from the instant on.
    early: Mutex<Option<Vec<usize>>>,
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
    /// took 0.6-0.8 µs a page here, of about 1.8 for the whole save. The caller counts
    /// the pages saved once they are also un-protected (`done`).
    fn save(&self, first: usize, count: usize) -> Result<(), LiveError> {
        for (addr, len, offset) in self.ram.host_ranges_at(first, count) {
            crate::sys::pwrite_from(&self.file, addr, len, offset)
                .map_err(|e| LiveError::Write(format!("from guest RAM at {addr:p}: {e}")))?;
        }
        Ok(())
    }

    /// Counts pages saved and un-protected. Only then: `finish` unregisters guest RAM
    /// once the count is complete, and an un-protect after that fails.
    fn done(&self, count: usize) {
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

    /// Lets writes to pages `first..first+count` go on, waking those that wait, and
    /// makes their page-table entries writable again.
    ///
    /// Un-protecting leaves the entries read-only while guest RAM stays registered, so
    /// each page's next guest write went through KVM's slow path, the kernel's write
    /// fault (`do_wp_page`, seen in a profile of the vCPU thread): a guest rewriting
    /// 32 MiB kept 0.04-0.13 of its pace during a 1 GiB live snapshot here, and about
    /// 0.5-0.7 with the entries made writable ahead of it, for about 0.8 µs a page on
    /// the writer's thread (README, live snapshots). Only the writer calls this: every
    /// page of its run held data at the instant and is un-protected for good (a page
    /// the guest discarded since is allocated again, as zeros).
    fn unprotect(&self, first: usize, count: usize) -> Result<(), LiveError> {
        self.each_host_range(first, count, |addr, len| {
            self.uffd.remove_write_protection(addr, len, true)?;
            // Only a hint: the pages are saved and writable whether or not it took.
            if let Err(e) = crate::sys::populate_writable(addr, len) {
                if !self.populate_failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "live snapshot: cannot make saved pages writable ({e}): the guest's writes take the kernel's slow path until the save ends"
                    );
                }
            }
            Ok(())
        })
    }
}

/// A live save in progress; see the module doc.
pub struct LiveSave {
    shared: Arc<Shared>,
    stop: EventFd,
    handler: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
    /// The data runs at `prepare`.
    earlier: Vec<(usize, usize)>,
    _claim: Claim,
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
            todo: OnceLock::new(),
            early: Mutex::new(Some(Vec::new())),
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
            _claim: claim,
        };
        // Protected while the guest runs; the pages it writes before the instant are
        // noted and protected again then. (Dropping `live` on failure unregisters.)
        for &(first, count) in &live.earlier {
            live.shared.each_host_range(first, count, |addr, len| {
                live.shared.uffd.write_protect(addr, len)
            })?;
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
        // Before `todo` is set (module doc). A failure here fails the save: `finish`
        // must not wait for pages nobody will save.
        for (first, count) in again.runs() {
            if let Err(e) = shared.each_host_range(first, count, |addr, len| {
                shared.uffd.write_protect(addr, len)
            }) {
                shared.fail(e.to_string());
                return Err(e);
            }
        }
        let pages = total_pages(&shared.ram.regions);
        // Cannot fail: `early` was taken above, once.
        let _ = shared.todo.set(PageSet::from_bitmap(&data, pages));
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

    /// Waits until every page is in the file, or the save failed; then removes all
    /// protection (the guest writes freely again) and stops the threads. Without a
    /// successful `protect` the save fails.
    pub fn finish(mut self) -> Result<(), LiveError> {
        if self.shared.todo.get().is_none() {
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
        self.finish_threads();
        match self.shared.error.lock().expect("poisoned").take() {
            Some(e) => Err(LiveError::Failed(e)),
            None => Ok(()),
        }
    }

    /// Unregisters guest RAM, which drops every protection and wakes every waiting
    /// write, then stops the handler.
    fn finish_threads(&mut self) {
        if let Err(e) = uffd::unregister(&self.shared.uffd, &self.shared.ram) {
            tracing::error!("live snapshot: cannot unregister guest RAM: {e}");
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
    let Some(todo) = shared.todo.get() else {
        return;
    };
    let mut from = 0;
    while let Some(first) = todo.next(from) {
        if first < from || shared.failed.load(Ordering::Acquire) {
            // Wrapped around: every page is taken.
            return;
        }
        // Take a run of consecutive pages, stopping at one the handler took.
        let mut count = 0;
        while count < RUN_PAGES && todo.take(first + count) {
            count += 1;
        }
        from = first + count.max(1);
        if count == 0 {
            continue;
        }
        let saved = shared.save(first, count);
        // Protection comes off whatever happened: a failed save must not leave the
        // guest waiting. The failure ends the save.
        let unprotected = shared.unprotect(first, count);
        if let Err(e) = saved.and(unprotected) {
            shared.fail(e.to_string());
            return;
        }
        shared.done(count);
    }
}

/// The copy-before-write handler.
fn handle_faults(shared: &Shared, stop: &EventFd) {
    loop {
        match crate::sys::wait_readable(shared.uffd.as_raw_fd(), stop.as_raw_fd()) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return shared.fail(format!("poll: {e}")),
        }
        loop {
            match shared.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    let since = Instant::now();
                    let Some((page, page_addr)) = shared.ram.page_at(addr as u64) else {
                        continue;
                    };
                    {
                        let mut early = shared.early.lock().expect("poisoned");
                        if let Some(noted) = early.as_mut() {
                            // Before the instant: the write goes on, and `protect`
                            // protects the page again (module doc).
                            if let Err(e) = shared.uffd.remove_write_protection(
                                page_addr as *mut libc::c_void,
                                PAGE_BYTES,
                                true,
                            ) {
                                shared.fail(format!("cannot un-protect {page_addr:#x}: {e}"));
                            }
                            noted.push(page);
                            continue;
                        }
                    }
                    // After the instant. A fault read before `todo` is set waits for
                    // the writer, whose un-protect wakes it.
                    if !shared.todo.get().is_some_and(|t| t.take(page)) {
                        // Saved already, or being saved by the writer, whose
                        // un-protect wakes this write.
                        continue;
                    }
                    let saved = shared.save(page, 1);
                    let unprotected = shared.uffd.remove_write_protection(
                        page_addr as *mut libc::c_void,
                        PAGE_BYTES,
                        true,
                    );
                    shared.progress.faults.fetch_add(1, Ordering::Relaxed);
                    let us = u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX);
                    shared.progress.latencies.lock().expect("poisoned").push(us);
                    match (saved, unprotected) {
                        (Ok(()), Ok(())) => shared.done(1),
                        (Err(e), _) => shared.fail(e.to_string()),
                        (_, Err(e)) => {
                            shared.fail(format!("cannot un-protect {page_addr:#x}: {e}"))
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    shared.fail(format!("reading faults: {e}"));
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;
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
            let word = u64::from_le_bytes(saved[p * PAGE_BYTES..][..8].try_into().expect("8"));
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
        let word = u64::from_le_bytes(saved[40 * PAGE_BYTES..][..8].try_into().expect("8"));
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
            let word = u64::from_le_bytes(saved[p * PAGE_BYTES..][..8].try_into().expect("8"));
            assert_eq!(word, 102, "page {p} in the file");
        }
        let _ = std::fs::remove_file(&path);
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
