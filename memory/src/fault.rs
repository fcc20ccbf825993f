//! Guest RAM filled on first touch: every region is registered with a userfaultfd for
//! missing pages, a handler thread serves each fault from a `PageSource` with
//! `UFFDIO_COPY`, and a prefetch thread copies every page that holds data in the
//! meantime, so that all of memory arrives soon whether the guest touches it or not.
//! Once the prefetch is through, the userfaultfd lets go of guest RAM: pages still
//! missing are holes, which the kernel fills with zeros by itself.
//!
//! Snapshots load their memory file this way (the File backend), so that a load does
//! not wait for the whole file.
//!
//! Who writes what: the handler and the prefetcher both place pages, and the kernel
//! makes each placement atomic: a page placed by one makes the other's `UFFDIO_COPY`
//! fail with `EEXIST`, which each takes as done (the handler then wakes the faulting
//! thread, in case the prefetcher's copy came before the fault was queued). Neither
//! touches guest RAM through the mapping, which would fault on itself.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use userfaultfd::{Event, FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vmm_sys_util::eventfd::EventFd;

use crate::dirty::{Claim, Mechanism, TrackedRam};
use crate::{GuestRam, RamRegion, PAGE_BYTES, PAGE_SIZE};

/// Where the pages come from.
pub trait PageSource: Send + Sync {
    /// Fills `buf` with guest RAM's bytes at memfd offset `offset` (holes are zero).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// The memfd ranges that hold data, as (offset, length), in order.
    fn extents(&self) -> std::io::Result<Vec<(u64, u64)>>;
}

/// A snapshot's memory file: guest RAM laid out as the memfd is.
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    /// `file`, which must be `size` bytes.
    pub fn new(file: File, size: u64) -> FileSource {
        FileSource { file, size }
    }
}

impl PageSource for FileSource {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn extents(&self) -> std::io::Result<Vec<(u64, u64)>> {
        crate::sys::data_extents(&self.file, self.size)
    }
}

/// Why lazy loading could not start.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// A userfaultfd call failed.
    #[error("userfaultfd {what} failed: {reason}")]
    Uffd {
        /// Which call.
        what: &'static str,
        /// The error.
        reason: String,
    },
    /// Another userfaultfd holds guest RAM.
    #[error(transparent)]
    Busy(#[from] crate::dirty::DirtyError),
    /// A thread or an eventfd could not be made.
    #[error("cannot start the page-fault service: {0}")]
    Setup(#[source] std::io::Error),
}

struct Shared {
    uffd: Uffd,
    ram: TrackedRam,
    source: Box<dyn PageSource>,
    /// Set once the prefetch is through and guest RAM is unregistered.
    done: AtomicBool,
    /// Faults served by reading the source.
    faults: AtomicU64,
    /// The first error reading the source or placing a page.
    error: Mutex<Option<String>>,
    /// Holds the userfaultfd mechanism while guest RAM is registered.
    claim: Mutex<Option<Claim>>,
    /// Set just before guest RAM is unregistered: a copy that fails after it failed
    /// because the kernel took the range back, and the fault is the kernel's again.
    released: AtomicBool,
}

/// What lazy loading did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Every page holding data is in guest RAM.
    pub done: bool,
    /// Faults served on demand.
    pub faults: u64,
    /// The first error, if any.
    pub error: Option<String>,
}

/// Guest RAM being filled on first touch; see the module doc.
pub struct LazyLoad {
    shared: Arc<Shared>,
    stop: EventFd,
    threads: Vec<JoinHandle<()>>,
}

fn uffd_err(what: &'static str) -> impl Fn(userfaultfd::Error) -> FaultError {
    move |e| FaultError::Uffd {
        what,
        reason: e.to_string(),
    }
}

/// Pages read around a fault, in one `UFFDIO_COPY`: neighbours are likely next.
const FAULT_CLUSTER: usize = 16;
/// Bytes the prefetcher places per `UFFDIO_COPY`.
const PREFETCH_CHUNK: usize = 1 << 20;

/// Registers every region of `ram` with a new userfaultfd for missing pages, holding
/// guest RAM's userfaultfd mechanism (no tracker can take it meanwhile). Faults then
/// wait until a page is placed (`place`, `zero`) or the range is unregistered.
pub fn register_missing(ram: &TrackedRam) -> Result<(Uffd, Claim), FaultError> {
    register(ram, false)
}

/// As `register_missing`, and for minor faults too (`minor`): an access to a page that
/// is in the memfd but not mapped here waits until `map` maps it. Shmem minor faults
/// need Linux 5.14 (`UFFD_FEATURE_MINOR_SHMEM`); see `minor_faults_work`.
pub fn register(ram: &TrackedRam, minor: bool) -> Result<(Uffd, Claim), FaultError> {
    let claim = ram.writes.claim(Mechanism::Userfaultfd)?;
    let uffd = builder(if minor { MINOR_SHMEM } else { 0 })
        .create()
        .map_err(uffd_err("UFFDIO_API"))?;
    let mode = if minor {
        RegisterMode::MISSING | RegisterMode::MINOR
    } else {
        RegisterMode::MISSING
    };
    for r in &ram.regions {
        let len = usize::try_from(r.size).map_err(|_| FaultError::Uffd {
            what: "UFFDIO_REGISTER",
            reason: "region too large".into(),
        })?;
        uffd.register_with_mode(r.host_addr as *mut libc::c_void, len, mode)
            .map_err(uffd_err("UFFDIO_REGISTER"))?;
    }
    Ok((uffd, claim))
}

/// `UFFD_FEATURE_MINOR_SHMEM`: minor faults on shmem, which guest RAM is.
const MINOR_SHMEM: u64 = linux_raw_sys::general::UFFD_FEATURE_MINOR_SHMEM as u64;

fn builder(features: u64) -> UffdBuilder {
    let mut b = UffdBuilder::new();
    b.close_on_exec(true)
        .non_blocking(true)
        // KVM's faults come from kernel mode (ENVIRONMENT.md).
        .user_mode_only(false)
        .require_features(FeatureFlags::from_bits_retain(features));
    b
}

/// Whether this kernel reports minor faults on shmem (probed, never assumed).
pub fn minor_faults_work() -> bool {
    builder(MINOR_SHMEM).create().is_ok()
}

/// Unregisters what `register_missing` registered: faults still waiting retry, and the
/// kernel serves them (holes read as zeros).
///
/// The kernel wakes the faults queued on a range registered for missing pages when it
/// unregisters it, holding the mmap lock but before it write-locks the VMA: a fault
/// taken under the VMA's own lock (a thread of ours reading guest RAM) that found the
/// range registered and queues itself just after that wake sleeps until someone wakes
/// it, and the handler's copy for it then fails on a range no longer registered. Seen
/// here as a thread asleep in `handle_userfault` with the range unregistered and its
/// page present, one run in 7-48 of `test_pages_arrive_on_touch_and_in_the_background`.
/// Unregistering returns only once it has write-locked the VMA, which waits for the
/// faults holding it, and a fault queues itself before it lets that lock go: a wake
/// after it finds every such fault.
pub fn unregister_missing(uffd: &Uffd, ram: &TrackedRam) {
    for r in &ram.regions {
        if let Ok(len) = usize::try_from(r.size) {
            let addr = r.host_addr as *mut libc::c_void;
            let _ = uffd.unregister(addr, len);
            let _ = uffd.wake(addr, len);
        }
    }
}

impl LazyLoad {
    /// Registers all of `ram` for missing faults and starts serving them from
    /// `source`. Guest RAM must be untouched (a fresh memfd).
    pub fn start(ram: &GuestRam, source: Box<dyn PageSource>) -> Result<LazyLoad, FaultError> {
        let tracked = ram.tracked();
        let (uffd, claim) = register_missing(&tracked)?;
        let shared = Arc::new(Shared {
            uffd,
            ram: tracked,
            source,
            done: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            error: Mutex::new(None),
            claim: Mutex::new(Some(claim)),
            released: AtomicBool::new(false),
        });
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(FaultError::Setup)?;
        let mut load = LazyLoad {
            shared: shared.clone(),
            stop,
            threads: Vec::new(),
        };
        let handler_stop = load.stop.try_clone().map_err(FaultError::Setup)?;
        let s = shared.clone();
        load.threads.push(
            std::thread::Builder::new()
                .name("page-faults".into())
                .spawn(move || {
                    seccomp::apply(seccomp::Thread::Memory);
                    serve_faults(&s, &handler_stop)
                })
                .map_err(FaultError::Setup)?,
        );
        let s = shared;
        load.threads.push(
            std::thread::Builder::new()
                .name("page-prefetch".into())
                .spawn(move || {
                    seccomp::apply(seccomp::Thread::Memory);
                    prefetch(&s)
                })
                .map_err(FaultError::Setup)?,
        );
        Ok(load)
    }

    /// How far it got.
    pub fn stats(&self) -> FaultStats {
        FaultStats {
            done: self.shared.done.load(Ordering::Acquire),
            faults: self.shared.faults.load(Ordering::Relaxed),
            error: self.shared.error.lock().expect("poisoned").clone(),
        }
    }

    /// Waits until every page holding data is in guest RAM (for tests and
    /// benchmarks), at most `timeout`. Returns whether it is.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while !self.shared.done.load(Ordering::Acquire) {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }
}

impl Drop for LazyLoad {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        self.shared.done.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        release(&self.shared);
    }
}

impl Shared {
    fn fail(&self, msg: String) {
        if self.released.load(Ordering::Acquire) {
            return;
        }
        tracing::error!("lazy load: {msg}");
        self.error.lock().expect("poisoned").get_or_insert(msg);
    }

    /// The region holding host address `addr`.
    fn region_of(&self, addr: u64) -> Option<&RamRegion> {
        self.ram
            .regions
            .iter()
            .find(|r| addr >= r.host_addr && addr < r.host_addr + r.size)
    }

    /// Places `buf` at host address `dst` (see `place`); false when the kernel
    /// refused (recorded).
    fn place(&self, buf: &[u8], dst: u64, wake: bool) -> bool {
        match place(&self.uffd, buf, dst, wake) {
            Ok(()) => true,
            Err(msg) => {
                self.fail(msg);
                false
            }
        }
    }
}

/// Places `buf` at host address `dst`, in guest RAM registered with `uffd` for missing
/// pages, and wakes the threads waiting on it (`wake`). Pages already there are skipped:
/// placed by another thread, whose copy is the same. Fails when the kernel refuses for
/// another reason.
pub fn place(uffd: &Uffd, buf: &[u8], dst: u64, wake: bool) -> Result<(), String> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &buf[done..];
        let at = dst + done as u64;
        // SAFETY: `rest` is a live buffer of `rest.len()` bytes; `at` lies in guest RAM
        // registered with this userfaultfd, where the kernel places the copy.
        let copied = unsafe {
            uffd.copy(
                rest.as_ptr().cast(),
                at as *mut libc::c_void,
                rest.len(),
                wake,
            )
        };
        match copied {
            Ok(n) if n > 0 => done += n,
            // Stopped at a page that is there already (the kernel copies up to it).
            Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 => done += n,
            // This page is there already: placed by another thread, or the guest's own
            // since. Wake whoever waits on it, and go on after it.
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                if wake {
                    let _ = uffd.wake(at as *mut libc::c_void, PAGE_BYTES);
                }
                done += PAGE_BYTES;
            }
            Ok(_) | Err(userfaultfd::Error::PartiallyCopied(_)) => {
                // Nothing placed and no reason given (the mapping is changing): one
                // page at a time decides.
                let one = &rest[..PAGE_BYTES.min(rest.len())];
                // SAFETY: as above, for one page of `buf`.
                let r = unsafe {
                    uffd.copy(
                        one.as_ptr().cast(),
                        at as *mut libc::c_void,
                        one.len(),
                        wake,
                    )
                };
                match r {
                    Ok(_) => {}
                    Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                        if wake {
                            let _ = uffd.wake(at as *mut libc::c_void, PAGE_BYTES);
                        }
                    }
                    Err(e) => return Err(format!("cannot place the page at {at:#x}: {e:?}")),
                }
                done += one.len();
            }
            Err(e) => {
                return Err(format!(
                    "cannot place {} bytes at {at:#x}: {e:?}",
                    rest.len()
                ))
            }
        }
    }
    Ok(())
}

/// Maps the `len` bytes at host address `dst` (page-aligned), whose pages are in the
/// memfd already, in guest RAM registered for minor faults with `uffd`, and wakes the
/// threads waiting on them. A page mapped already is only woken; returns how many were.
pub fn map(uffd: &Uffd, dst: u64, len: usize) -> Result<usize, String> {
    let (mut done, mut there) = (0usize, 0usize);
    while done < len {
        let at = dst + done as u64;
        // The kernel maps the memfd's own pages there: no buffer of ours is read.
        match uffd.r#continue(at as *mut libc::c_void, len - done, true) {
            Ok(n) if n > 0 => done += usize::try_from(n).unwrap_or(len - done),
            Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EEXIST => {
                let _ = uffd.wake(at as *mut libc::c_void, PAGE_BYTES);
                done += PAGE_BYTES;
                there += 1;
            }
            Ok(_) => {
                return Err(format!(
                    "cannot map the page at {at:#x}: the kernel mapped nothing"
                ))
            }
            Err(e) => return Err(format!("cannot map {} bytes at {at:#x}: {e:?}", len - done)),
        }
    }
    Ok(there)
}

/// Places a zero page at host address `dst` (page-aligned) and wakes its waiters; a
/// page already there is only woken.
pub fn zero(uffd: &Uffd, dst: u64) -> Result<(), String> {
    // SAFETY: `dst` is one page of guest RAM registered with this userfaultfd; the
    // kernel fills it with zeros, or fails with EEXIST when a page is there.
    match unsafe { uffd.zeropage(dst as *mut libc::c_void, PAGE_BYTES, true) } {
        Ok(_) => Ok(()),
        Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => uffd
            .wake(dst as *mut libc::c_void, PAGE_BYTES)
            .map_err(|e| format!("cannot wake the fault at {dst:#x}: {e:?}")),
        Err(e) => Err(format!("cannot place a zero page at {dst:#x}: {e:?}")),
    }
}

/// Gives guest RAM back to the kernel: faults still waiting retry and find zeros.
fn release(shared: &Shared) {
    let mut claim = shared.claim.lock().expect("poisoned");
    if claim.is_none() {
        return;
    }
    shared.released.store(true, Ordering::Release);
    unregister_missing(&shared.uffd, &shared.ram);
    // Only now may another userfaultfd take guest RAM.
    claim.take();
}

fn serve_faults(shared: &Shared, stop: &EventFd) {
    let mut buf = vec![0u8; PAGE_BYTES * FAULT_CLUSTER];
    loop {
        match crate::sys::wait_readable(shared.uffd.as_raw_fd(), stop.as_raw_fd()) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                shared.fail(format!("poll: {e}"));
                return;
            }
        }
        loop {
            match shared.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => serve_one(shared, addr as u64, &mut buf),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    shared.fail(format!("reading faults: {e}"));
                    return;
                }
            }
        }
    }
}

/// Serves the fault at host address `addr`, with the pages after it in its region.
fn serve_one(shared: &Shared, addr: u64, buf: &mut [u8]) {
    let Some(r) = shared.region_of(addr) else {
        return;
    };
    let page = addr & !(PAGE_SIZE - 1);
    let in_region = page - r.host_addr;
    let left = usize::try_from((r.size - in_region) / PAGE_SIZE).unwrap_or(usize::MAX);
    let len = FAULT_CLUSTER.min(left) * PAGE_BYTES;
    let offset = r.file_offset + in_region;
    if let Err(e) = shared.source.read_at(offset, &mut buf[..len]) {
        shared.fail(format!(
            "cannot read guest RAM at memfd offset {offset:#x}: {e}"
        ));
        return;
    }
    shared.faults.fetch_add(1, Ordering::Relaxed);
    shared.place(&buf[..len], page, true);
}

fn prefetch(shared: &Shared) {
    let extents = match shared.source.extents() {
        Ok(e) => e,
        Err(e) => {
            shared.fail(format!("cannot list the source's data: {e}"));
            return;
        }
    };
    let mut buf = vec![0u8; PREFETCH_CHUNK];
    for (offset, len) in extents {
        let mut at = offset;
        while at < offset + len {
            if shared.done.load(Ordering::Acquire) {
                return;
            }
            let n = usize::try_from(offset + len - at)
                .unwrap_or(PREFETCH_CHUNK)
                .min(PREFETCH_CHUNK);
            if let Err(e) = shared.source.read_at(at, &mut buf[..n]) {
                shared.fail(format!(
                    "cannot read guest RAM at memfd offset {at:#x}: {e}"
                ));
                return;
            }
            // The chunk may span two regions (the memfd runs on past the MMIO hole).
            for r in &shared.ram.regions {
                let (from, to) = (
                    at.max(r.file_offset),
                    (at + n as u64).min(r.file_offset + r.size),
                );
                if from < to {
                    // Both within this chunk of at most PREFETCH_CHUNK bytes.
                    let a = usize::try_from(from - at).unwrap_or(0);
                    let b = usize::try_from(to - at).unwrap_or(0).min(n);
                    let slice = &buf[a..b];
                    if !shared.place(slice, r.host_addr + (from - r.file_offset), true) {
                        return;
                    }
                }
            }
            at += n as u64;
        }
    }
    release(shared);
    shared.done.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    /// A memory file for 64 MiB of RAM: every 3rd page holds its number, the rest are
    /// holes.
    fn memory_file() -> (File, u64) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("ferry-fault-test-{}-{n}", std::process::id()));
        let mut file = File::create(&path).expect("create");
        let size = 64u64 << 20;
        file.set_len(size).expect("size");
        for page in (0..size / PAGE_SIZE).step_by(3) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&(page + 1).to_le_bytes());
            file.write_all_at(&bytes, page * PAGE_SIZE).expect("write");
        }
        file.flush().expect("flush");
        let file = File::open(&path).expect("open");
        let _ = std::fs::remove_file(&path);
        (file, size)
    }

    /// Two threads read every page at once while the prefetcher runs: each sees the
    /// file's contents, holes read zero, and loading completes.
    #[test]
    fn test_pages_arrive_on_touch_and_in_the_background() {
        let ram = GuestRam::new(64, 46).expect("ram");
        let (file, size) = memory_file();
        let load = LazyLoad::start(&ram, Box::new(FileSource::new(file, size))).expect("start");
        let pages = size / PAGE_SIZE;
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let ram = &ram;
                s.spawn(move || {
                    // One thread from the top, one from the bottom: they meet, and race
                    // the prefetcher and each other for the same pages.
                    for i in 0..pages {
                        let page = if t == 0 { i } else { pages - 1 - i };
                        let got: u64 = ram
                            .memory()
                            .read_obj(GuestAddress(page * PAGE_SIZE))
                            .expect("read");
                        let want = if page % 3 == 0 { page + 1 } else { 0 };
                        assert_eq!(got, want, "page {page}");
                    }
                });
            }
        });
        assert!(
            load.wait(std::time::Duration::from_secs(20)),
            "loading never finished"
        );
        let stats = load.stats();
        assert!(stats.done && stats.error.is_none(), "{stats:?}");
        // Guest RAM is the kernel's again: a new page in a hole just works.
        ram.memory()
            .write_obj(7u64, GuestAddress(PAGE_SIZE))
            .expect("write a hole");
        drop(load);
        assert_eq!(
            ram.memory()
                .read_obj::<u64>(GuestAddress(PAGE_SIZE))
                .expect("read"),
            7
        );
    }

    /// A thread faulting page after page while guest RAM is unregistered is woken,
    /// whichever side of the kernel's own wake its fault queues on (see
    /// `unregister_missing`): the handler's zero page fails for a fault that queued
    /// after the unregister, and only the wake after it frees that thread.
    #[test]
    fn test_faults_racing_the_unregister_are_woken() {
        for round in 0..400u64 {
            let ram = Arc::new(GuestRam::new(crate::layout::MIN_MEM_MIB, 46).expect("ram"));
            let tracked = ram.tracked();
            let (uffd, claim) = register_missing(&tracked).expect("register");
            let uffd = Arc::new(uffd);
            let stop = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            let handler = {
                let (uffd, stop) = (uffd.clone(), stop.try_clone().expect("eventfd"));
                std::thread::spawn(move || {
                    while let Ok(true) =
                        crate::sys::wait_readable(uffd.as_raw_fd(), stop.as_raw_fd())
                    {
                        while let Ok(Some(Event::Pagefault { addr, .. })) = uffd.read_event() {
                            let _ = zero(&uffd, addr as u64 & !(PAGE_SIZE - 1));
                        }
                    }
                })
            };
            let (done, finished) = std::sync::mpsc::channel();
            let toucher = ram.clone();
            std::thread::spawn(move || {
                for page in 0..512 {
                    let _: u64 = toucher
                        .memory()
                        .read_obj(GuestAddress(page * PAGE_SIZE))
                        .expect("read");
                }
                let _ = done.send(());
            });
            // Somewhere in the toucher's run of faults.
            std::thread::sleep(std::time::Duration::from_micros(round % 40 * 25));
            unregister_missing(&uffd, &tracked);
            drop(claim);
            finished
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("round {round}: a fault was never woken"));
            stop.write(1).expect("stop");
            handler.join().expect("handler");
        }
    }

    /// While it loads, guest RAM's userfaultfd is taken: a uffd tracker is refused.
    #[test]
    fn test_a_uffd_tracker_is_refused_while_loading() {
        let ram = GuestRam::new(64, 46).expect("ram");
        let (file, size) = memory_file();
        let load = LazyLoad::start(&ram, Box::new(FileSource::new(file, size))).expect("start");
        let claim = ram.tracked().writes.claim(Mechanism::Userfaultfd);
        if !load.stats().done {
            assert!(claim.is_err(), "refused while loading");
        }
        drop(claim);
        assert!(load.wait(std::time::Duration::from_secs(20)));
        drop(load);
        ram.tracked()
            .writes
            .claim(Mechanism::Userfaultfd)
            .expect("free once loaded");
    }
}
