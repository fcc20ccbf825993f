//! uffd-wp synchronous: a handler thread receives each write fault on a protected page,
//! records the page, and un-protects it, which lets the writer go on. `collect` takes the
//! recorded pages and protects them again.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use userfaultfd::{Event, Uffd};
use vmm_sys_util::eventfd::EventFd;

use super::uffd::{self, features};
use super::{
    AtomicBitmap, BenchTracker, Claim, DirtyBitmap, DirtyError, DirtyTracker, Mechanism,
    TrackedRam, TrackingMode, WriteSubscription,
};
use crate::dirty::bitmap::total_pages;
use crate::PAGE_BYTES;

struct Shared {
    uffd: Uffd,
    ram: TrackedRam,
    seen: AtomicBitmap,
    /// Held by the handler while it records and un-protects one page, and by `collect`
    /// while it takes the record and re-protects: so a page is never un-protected after
    /// `collect` re-protected it without also being recorded for the next round.
    order: Mutex<()>,
}

/// What a started tracker holds.
struct Running {
    shared: Arc<Shared>,
    stop: EventFd,
    thread: JoinHandle<()>,
    writes: WriteSubscription,
    _claim: Claim,
}

/// The uffd-wp sync tracker.
pub struct UffdSync {
    ram: TrackedRam,
    running: Option<Running>,
}

impl UffdSync {
    /// A tracker over `ram`; nothing is protected until `start`.
    pub fn new(ram: TrackedRam) -> Self {
        UffdSync { ram, running: None }
    }
}

fn handle_faults(shared: &Shared, stop: &EventFd) {
    loop {
        match crate::sys::wait_readable(shared.uffd.as_raw_fd(), stop.as_raw_fd()) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!("uffd-wp sync: poll failed: {e}");
                return;
            }
        }
        loop {
            match shared.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    let Some((page, page_addr)) = shared.ram.page_at(addr as u64) else {
                        continue;
                    };
                    let _order = shared.order.lock().expect("poisoned");
                    shared.seen.set_range(page, 1);
                    if let Err(e) = shared.uffd.remove_write_protection(
                        page_addr as *mut libc::c_void,
                        PAGE_BYTES,
                        true,
                    ) {
                        tracing::error!("uffd-wp sync: cannot un-protect {page_addr:#x}: {e}");
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("uffd-wp sync: reading events failed: {e}");
                    break;
                }
            }
        }
    }
}

impl DirtyTracker for UffdSync {
    fn mode(&self) -> TrackingMode {
        TrackingMode::UffdSync
    }

    fn start(&mut self) -> Result<(), DirtyError> {
        if self.running.is_some() {
            return Err(DirtyError::State("already started"));
        }
        let claim = self.ram.writes.claim(Mechanism::Userfaultfd)?;
        let uffd = uffd::open(&[features::WP, features::WP_SHMEM], "uffd-wp sync")?;
        let writes = self.ram.writes.subscribe();
        uffd::register(&uffd, &self.ram)?;
        // Nothing is protected yet: the handler must run before the first protect, or a
        // write would block with nobody to answer it.
        let shared = Arc::new(Shared {
            uffd,
            ram: self.ram.clone(),
            seen: AtomicBitmap::new(total_pages(&self.ram.regions)),
            order: Mutex::new(()),
        });
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DirtyError::Sys {
            what: "eventfd",
            source,
        })?;
        let thread_stop = stop.try_clone().map_err(|source| DirtyError::Sys {
            what: "eventfd",
            source,
        })?;
        let thread_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("uffd-wp".into())
            .spawn(move || {
                seccomp::apply(seccomp::Thread::Memory);
                handle_faults(&thread_shared, &thread_stop)
            });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(source) => {
                let _ = uffd::unregister(&shared.uffd, &self.ram);
                return Err(DirtyError::Sys {
                    what: "spawn the uffd-wp handler",
                    source,
                });
            }
        };
        let running = Running {
            shared,
            stop,
            thread,
            writes,
            _claim: claim,
        };
        if let Err(e) = uffd::protect_all(&running.shared.uffd, &self.ram) {
            self.running = Some(running);
            let _ = self.stop();
            return Err(e);
        }
        self.running = Some(running);
        Ok(())
    }

    fn collect(&mut self) -> Result<DirtyBitmap, DirtyError> {
        let running = self
            .running
            .as_ref()
            .ok_or(DirtyError::State("not started"))?;
        let shared = &running.shared;
        let mut bitmap = DirtyBitmap::new(&self.ram.regions);
        {
            let _order = shared.order.lock().expect("poisoned");
            shared.seen.take_into(&mut bitmap);
            for (first, count) in bitmap.runs() {
                // A run can cross from low RAM into RAM above 4 GiB: re-protect its part
                // in each region.
                for (addr, len) in self.ram.host_ranges(first, count) {
                    shared
                        .uffd
                        .write_protect(addr, len)
                        .map_err(|source| DirtyError::Uffd {
                            what: "UFFDIO_WRITEPROTECT",
                            source,
                        })?;
                }
            }
        }
        running.writes.take_into(&mut bitmap);
        Ok(bitmap)
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        let running = self
            .running
            .take()
            .ok_or(DirtyError::State("not started"))?;
        // Unregistering first: it wakes any writer still blocked on a protected page
        // (`uffd::unregister` does; the kernel itself wakes no write-protect fault
        // there, and the handler's un-protect fails on an unregistered range).
        let result = uffd::unregister(&running.shared.uffd, &self.ram);
        let _ = running.stop.write(1);
        let _ = running.thread.join();
        result
    }
}

impl BenchTracker for UffdSync {
    fn floor_collect(&mut self) -> Result<usize, DirtyError> {
        // The mechanism is the bitmap swap plus one UFFDIO_WRITEPROTECT per run: that
        // is all `collect` does, so its floor is itself with ferry's writes included.
        Ok(self.collect()?.count())
    }
}

impl Drop for UffdSync {
    fn drop(&mut self) {
        if self.running.is_some() {
            let _ = self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::GuestRam;

    /// A write blocked on a protected page goes on when the tracker stops, even while
    /// the handler cannot answer it: the kernel wakes no write-protect fault when it
    /// unregisters a range, and the handler's un-protect fails once it is unregistered.
    #[test]
    fn test_stop_lets_a_blocked_write_go_on() {
        let ram = GuestRam::new(16, 46).expect("ram");
        let mut tracker = UffdSync::new(ram.tracked());
        tracker.start().expect("start");
        let shared = tracker.running.as_ref().expect("running").shared.clone();
        // The handler takes `order` to answer a fault: held here, it answers none.
        let held = shared.order.lock().expect("poisoned");
        let (wrote, written) = mpsc::channel();
        let memory = ram.memory().clone();
        let writer = std::thread::spawn(move || {
            memory.write_obj(7u64, GuestAddress(0)).expect("write");
            let _ = wrote.send(());
        });
        assert!(
            written.recv_timeout(Duration::from_millis(100)).is_err(),
            "the write was not held by the protection"
        );
        let stopper = std::thread::spawn(move || tracker.stop());
        let went_on = written.recv_timeout(Duration::from_secs(2));
        // Whatever happened, let the handler and the stop finish; the last reference
        // to the userfaultfd then closes it, which wakes the write if nothing did.
        drop(held);
        drop(shared);
        stopper.join().expect("stopper").expect("stop");
        writer.join().expect("writer");
        assert!(
            went_on.is_ok(),
            "the write waited for the handler after the tracker's unregister"
        );
    }
}
