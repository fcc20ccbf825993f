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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};

use super::{AtomicBitmap, DirtyBitmap, DirtyError};
use crate::PAGE_SIZE;

/// ferry's own writes to guest RAM, fanned out to every running tracker, and which
/// kernel mechanisms are in use (each can serve one tracker at a time).
#[derive(Debug)]
pub struct WriteSinks {
    pages: usize,
    sinks: RwLock<Vec<Arc<AtomicBitmap>>>,
    /// A userfaultfd holds guest RAM: a range registers with one userfaultfd only.
    uffd: AtomicBool,
    /// KVM's dirty log is on: reading it clears it, so it serves one tracker.
    kvm_log: AtomicBool,
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
            uffd: AtomicBool::new(false),
            kvm_log: AtomicBool::new(false),
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

    /// Takes `mechanism` for one tracker, or says who has it.
    pub fn claim(self: &Arc<Self>, mechanism: Mechanism) -> Result<Claim, DirtyError> {
        let flag = self.flag(mechanism);
        if flag.swap(true, Ordering::AcqRel) {
            return Err(DirtyError::Busy(match mechanism {
                Mechanism::Userfaultfd => {
                    "guest RAM is already registered with another userfaultfd (a uffd tracker, or a snapshot's memory being loaded or served)"
                }
                Mechanism::KvmDirtyLog => "KVM's dirty log already serves another tracker",
            }));
        }
        Ok(Claim {
            sinks: self.clone(),
            mechanism,
        })
    }

    fn flag(&self, mechanism: Mechanism) -> &AtomicBool {
        match mechanism {
            Mechanism::Userfaultfd => &self.uffd,
            Mechanism::KvmDirtyLog => &self.kvm_log,
        }
    }
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

impl Drop for Claim {
    fn drop(&mut self) {
        self.sinks
            .flag(self.mechanism)
            .store(false, Ordering::Release);
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
}
