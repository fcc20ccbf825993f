//! Marks every write ferry makes through vm-memory, for every dirty tracker at once.
//!
//! Guest RAM is a `GuestMemoryMmap<WriteLog>`: vm-memory calls `mark_dirty` on each write
//! through it (loaders, virtio queues, device DMA). That is how device writes reach the
//! dirty trackers without each device remembering to say so. The KVM dirty log never
//! sees userspace writes, so without this they would be lost to migration.
//!
//! Each running tracker subscribes its own bitmap (`WriteSinks::subscribe`), and every
//! mark goes to all of them: a tracker that takes its marks never takes another's.
//!
//! Who writes and who reads the subscriber list: trackers add and remove themselves
//! (`subscribe`, and dropping the subscription) under the write lock; every marking
//! thread (the VMM thread's devices, vCPU threads' MMIO handlers, ferry's own writes)
//! reads it under the read lock and ORs into each bitmap, which is atomic
//! (`AtomicBitmap::set_range`). A tracker takes only its own bitmap. A mark made while a
//! tracker subscribes lands in it or happened before it started; both are right,
//! because a tracker counts every page as clean from its start on.
//!
//! The mechanisms' holds (`claim`) sit under one mutex: a claim takes a free one, fails
//! on a held one, and waits (bounded) for one whose holder said it is releasing it, as
//! a live snapshot does once its file is complete and only guest RAM's unregistering
//! is left; dropping the hold frees it and wakes the waiters.

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};

use super::{AtomicBitmap, DirtyBitmap, DirtyError};
use crate::PAGE_SIZE;

/// ferry's own writes to guest RAM, fanned out to every running tracker, and which
/// kernel mechanisms are in use (each can serve one tracker at a time).
#[derive(Debug)]
pub struct WriteSinks {
    pages: usize,
    sinks: RwLock<Vec<Arc<AtomicBitmap>>>,
    holds: Mutex<Holds>,
    /// Signalled when a hold is dropped.
    freed: Condvar,
}

/// How long a claim waits for a hold that is being released: a live snapshot's
/// unregistering of guest RAM takes milliseconds (about 4 ms for 128 MiB of data here).
const RELEASE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Free,
    Held,
    /// Held, and about to be dropped: a claim waits for it.
    Releasing,
}

#[derive(Debug)]
struct Holds {
    /// A userfaultfd holds guest RAM: a range registers with one userfaultfd only.
    uffd: Hold,
    /// KVM's dirty log is on: reading it clears it, so it serves one tracker.
    kvm_log: Hold,
}

impl Holds {
    fn of(&mut self, mechanism: Mechanism) -> &mut Hold {
        match mechanism {
            Mechanism::Userfaultfd => &mut self.uffd,
            Mechanism::KvmDirtyLog => &mut self.kvm_log,
        }
    }
}

/// A kernel mechanism a tracker takes for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// A userfaultfd registered over guest RAM.
    Userfaultfd,
    /// KVM's dirty log.
    KvmDirtyLog,
}

impl WriteSinks {
    /// Sinks for guest RAM of `pages` pages; nothing is allocated until a tracker
    /// subscribes.
    pub fn new(pages: usize) -> Self {
        WriteSinks {
            pages,
            sinks: RwLock::new(Vec::new()),
            holds: Mutex::new(Holds {
                uffd: Hold::Free,
                kvm_log: Hold::Free,
            }),
            freed: Condvar::new(),
        }
    }

    /// Marks pages `first..first+count` in every subscribed bitmap.
    pub fn mark(&self, first: usize, count: usize) {
        for s in self.sinks.read().expect("poisoned").iter() {
            s.set_range(first, count);
        }
    }

    /// Whether any subscriber has `page` marked.
    pub fn is_marked(&self, page: usize) -> bool {
        self.sinks
            .read()
            .expect("poisoned")
            .iter()
            .any(|s| s.get(page))
    }

    /// A bitmap of its own that receives every mark from now on, until dropped.
    pub fn subscribe(self: &Arc<Self>) -> WriteSubscription {
        let bits = Arc::new(AtomicBitmap::new(self.pages));
        self.sinks.write().expect("poisoned").push(bits.clone());
        WriteSubscription {
            sinks: self.clone(),
            bits,
        }
    }

    /// Takes `mechanism` for one tracker, or says who has it. Waits, up to
    /// `RELEASE_WAIT`, for a holder that is releasing it (`Claim::releasing`).
    pub fn claim(self: &Arc<Self>, mechanism: Mechanism) -> Result<Claim, DirtyError> {
        let deadline = Instant::now() + RELEASE_WAIT;
        let mut holds = self.holds.lock().expect("poisoned");
        loop {
            match *holds.of(mechanism) {
                Hold::Free => break,
                Hold::Releasing => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(busy(mechanism));
                    }
                    holds = self.freed.wait_timeout(holds, left).expect("poisoned").0;
                }
                Hold::Held => return Err(busy(mechanism)),
            }
        }
        *holds.of(mechanism) = Hold::Held;
        Ok(Claim {
            sinks: self.clone(),
            mechanism,
        })
    }
}

fn busy(mechanism: Mechanism) -> DirtyError {
    DirtyError::Busy(match mechanism {
        Mechanism::Userfaultfd => {
            "guest RAM is already registered with another userfaultfd (a uffd tracker, or a snapshot's memory being loaded or served)"
        }
        Mechanism::KvmDirtyLog => "KVM's dirty log already serves another tracker",
    })
}

/// One tracker's own record of ferry's writes.
#[derive(Debug)]
pub struct WriteSubscription {
    sinks: Arc<WriteSinks>,
    bits: Arc<AtomicBitmap>,
}

impl WriteSubscription {
    /// ORs the pages marked since the last take into `into`, and clears them here.
    pub fn take_into(&self, into: &mut DirtyBitmap) {
        self.bits.take_into(into);
    }
}

impl Drop for WriteSubscription {
    fn drop(&mut self) {
        self.sinks
            .sinks
            .write()
            .expect("poisoned")
            .retain(|s| !Arc::ptr_eq(s, &self.bits));
    }
}

/// A kernel mechanism held by one tracker; released when dropped.
#[derive(Debug)]
pub struct Claim {
    sinks: Arc<WriteSinks>,
    mechanism: Mechanism,
}

impl Claim {
    /// Says the holder is about to drop this hold, having no more use for it than
    /// undoing its setup: a claim of the mechanism meanwhile waits instead of failing.
    pub fn releasing(&self) {
        self.set(Hold::Releasing);
    }

    fn set(&self, hold: Hold) {
        *self
            .sinks
            .holds
            .lock()
            .expect("poisoned")
            .of(self.mechanism) = hold;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.set(Hold::Free);
        self.sinks.freed.notify_all();
    }
}

/// One region's view of the shared write sinks: offsets in the region become pages of
/// the memfd.
#[derive(Clone, Debug)]
pub struct WriteLog {
    sinks: Arc<WriteSinks>,
    /// Where the region starts in the memfd, in bytes.
    file_offset: u64,
}

impl WriteLog {
    /// The log of the region that starts `file_offset` bytes into the memfd.
    pub fn new(sinks: Arc<WriteSinks>, file_offset: u64) -> Self {
        WriteLog { sinks, file_offset }
    }

    fn page(&self, offset: usize) -> usize {
        crate::page_index((self.file_offset + offset as u64) / PAGE_SIZE)
    }
}

impl<'a> WithBitmapSlice<'a> for WriteLog {
    type S = RefSlice<'a, WriteLog>;
}

impl Bitmap for WriteLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = self.page(offset);
        let last = self.page(offset.saturating_add(len - 1));
        self.sinks.mark(first, last - first + 1);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.sinks.is_marked(self.page(offset))
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, WriteLog> {
        RefSlice::new(self, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RamRegion;
    use vm_memory::GuestAddress;

    fn regions(pages: u64) -> Vec<RamRegion> {
        vec![RamRegion {
            guest_addr: GuestAddress(0),
            size: pages * PAGE_SIZE,
            host_addr: 0,
            file_offset: 0,
        }]
    }

    #[test]
    fn test_marks_pages_of_the_memfd() {
        let sinks = Arc::new(WriteSinks::new(64));
        let sub = sinks.subscribe();
        let log = WriteLog::new(sinks.clone(), 8 * PAGE_SIZE);
        log.mark_dirty(4095, 2);
        log.slice_at(3 * 4096).mark_dirty(0, 1);
        log.mark_dirty(0, 0);
        assert!(log.dirty_at(4096) && !log.dirty_at(2 * 4096));
        let mut got = DirtyBitmap::new(&regions(64));
        sub.take_into(&mut got);
        assert_eq!(got.pages().collect::<Vec<_>>(), vec![8, 9, 11]);
    }

    /// Two trackers' subscriptions each get every mark; taking one leaves the other.
    #[test]
    fn test_every_subscriber_sees_every_mark() {
        let sinks = Arc::new(WriteSinks::new(64));
        let before = WriteLog::new(sinks.clone(), 0);
        before.mark_dirty(0, 1);
        let a = sinks.subscribe();
        let b = sinks.subscribe();
        before.mark_dirty(5 * 4096, 1);
        let mut got_a = DirtyBitmap::new(&regions(64));
        a.take_into(&mut got_a);
        before.mark_dirty(7 * 4096, 1);
        let mut got_b = DirtyBitmap::new(&regions(64));
        b.take_into(&mut got_b);
        assert_eq!(got_a.pages().collect::<Vec<_>>(), vec![5]);
        assert_eq!(got_b.pages().collect::<Vec<_>>(), vec![5, 7]);
        drop(a);
        assert_eq!(sinks.sinks.read().expect("poisoned").len(), 1);
    }

    #[test]
    fn test_a_mechanism_serves_one_tracker() {
        let sinks = Arc::new(WriteSinks::new(64));
        let claim = sinks.claim(Mechanism::Userfaultfd).expect("first");
        let err = sinks.claim(Mechanism::Userfaultfd).expect_err("second");
        assert!(err.to_string().contains("another userfaultfd"), "{err}");
        let _kvm = sinks
            .claim(Mechanism::KvmDirtyLog)
            .expect("another mechanism");
        drop(claim);
        sinks.claim(Mechanism::Userfaultfd).expect("free again");
    }

    /// A claim waits for a hold its holder is releasing, and takes it once dropped;
    /// a hold not being released still refuses at once.
    #[test]
    fn test_a_claim_waits_for_a_hold_being_released() {
        let sinks = Arc::new(WriteSinks::new(64));
        let claim = sinks.claim(Mechanism::Userfaultfd).expect("first");
        claim.releasing();
        let started = Instant::now();
        std::thread::scope(|s| {
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                drop(claim);
            });
            let next = sinks.claim(Mechanism::Userfaultfd).expect("once released");
            assert!(started.elapsed() >= Duration::from_millis(40));
            let started = Instant::now();
            sinks
                .claim(Mechanism::Userfaultfd)
                .expect_err("held, not being released");
            assert!(started.elapsed() < Duration::from_millis(40));
            drop(next);
        });
        sinks.claim(Mechanism::Userfaultfd).expect("free again");
    }
}
