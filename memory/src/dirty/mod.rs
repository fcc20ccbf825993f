//! Dirty-page tracking over guest RAM: which pages were written since the last look.
//!
//! Three mechanisms, one interface (`DirtyTracker`), chosen at runtime (`TrackingMode`):
//! - `UffdAsync`: userfaultfd write-protect with `UFFD_FEATURE_WP_ASYNC`. The kernel
//!   resolves write faults itself and records them in the page tables; `collect` is a
//!   `PAGEMAP_SCAN` that returns the written pages and write-protects them again in
//!   the same call.
//! - `UffdSync`: userfaultfd write-protect with a handler thread that records each write
//!   fault in a bitmap and un-protects the page. It sees every first write as it happens.
//! - `KvmDirtyLog`: `KVM_GET_DIRTY_LOG` (with `KVM_CLEAR_DIRTY_LOG` when the kernel has
//!   manual protect), the mechanism Firecracker and Cloud Hypervisor use.
//!
//! Writes ferry makes itself (device emulation, loaders, `GuestRam::write`) go through
//! the tracked mapping, which the userfaultfd modes see, and vm-memory marks each of them
//! for every running tracker (`WriteLog`, `WriteSinks`): each tracker has a bitmap of its
//! own, which its `collect` merges. So do pages ferry discards (`GuestRam::discard`). The
//! KVM dirty log does not see userspace writes, and no mode sees a discard (the kernel
//! reports a punched page as not written).
//!
//! Trackers of different mechanisms can run at once (a userfaultfd one and a KVM one),
//! and each reports every write. Each kernel mechanism serves one tracker at a time: a
//! range registers with one userfaultfd, and reading KVM's log clears it. A second
//! tracker of the same mechanism is refused at `start` (`DirtyError::Busy`), or waits
//! there, bounded, while a live snapshot that has answered unregisters guest RAM
//! (`write_log`).

mod bitmap;
mod kvm_log;
pub(crate) mod uffd;
mod uffd_async;
mod uffd_sync;
mod write_log;

use std::sync::Arc;

pub use bitmap::{guest_to_page, page_to_guest, total_pages, AtomicBitmap, DirtyBitmap};
pub use kvm_log::KvmDirtyLog;
pub use uffd_async::UffdAsync;
pub use uffd_sync::UffdSync;
pub use write_log::{Claim, Mechanism, WriteLog, WriteSinks, WriteSubscription};

use crate::{GuestMemoryMmap, RamRegion};

/// Which mechanism tracks dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackingMode {
    /// userfaultfd write-protect, asynchronous, collected with PAGEMAP_SCAN.
    UffdAsync,
    /// userfaultfd write-protect with a fault-handling thread.
    UffdSync,
    /// KVM's dirty log.
    KvmDirtyLog,
    /// KVM's dirty log, leaving pages dirty two rounds in a row writable: `collect`
    /// reports a superset of the writes (the hot pages every round).
    KvmDirtyLogHot,
    /// uffd-wp async, leaving pages written two rounds in a row un-protected: a
    /// superset, as `KvmDirtyLogHot`.
    UffdAsyncHot,
}

impl TrackingMode {
    /// The three mechanisms, each reporting exactly the pages written.
    pub const ALL: [TrackingMode; 3] = [
        TrackingMode::UffdAsync,
        TrackingMode::UffdSync,
        TrackingMode::KvmDirtyLog,
    ];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            TrackingMode::UffdAsync => "uffd-async",
            TrackingMode::UffdSync => "uffd-sync",
            TrackingMode::KvmDirtyLog => "kvm-dirty-log",
            TrackingMode::KvmDirtyLogHot => "kvm-dirty-log-hot",
            TrackingMode::UffdAsyncHot => "uffd-async-hot",
        }
    }
}

impl std::str::FromStr for TrackingMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        TrackingMode::ALL
            .into_iter()
            .chain([TrackingMode::KvmDirtyLogHot, TrackingMode::UffdAsyncHot])
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown tracking mode {s:?}: use uffd-async, uffd-sync, kvm-dirty-log, kvm-dirty-log-hot or uffd-async-hot")
            })
    }
}

/// Why tracking failed.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The kernel lacks a userfaultfd feature the mode needs.
    #[error("this kernel's userfaultfd lacks {0}, which {1} tracking needs")]
    MissingFeature(&'static str, &'static str),
    /// KVM lacks a capability the mode needs.
    #[error("this host's KVM lacks {0}, which dirty-log tracking needs")]
    MissingCap(&'static str),
    /// A userfaultfd operation failed.
    #[error("userfaultfd {what} failed: {source}")]
    Uffd {
        /// Which operation.
        what: &'static str,
        /// The error.
        #[source]
        source: userfaultfd::Error,
    },
    /// A system call failed.
    #[error("{what} failed: {source}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The tracker is not in the state the call needs.
    #[error("dirty tracking is {0}")]
    State(&'static str),
    /// The kernel mechanism already serves another tracker.
    #[error("cannot start dirty tracking: {0}")]
    Busy(&'static str),
}

/// Tracks which guest pages are written.
pub trait DirtyTracker: Send {
    /// The mechanism.
    fn mode(&self) -> TrackingMode;
    /// Starts tracking: every page counts as clean from here on.
    fn start(&mut self) -> Result<(), DirtyError>;
    /// The pages written since `start` or the previous `collect`, and re-arms tracking.
    /// A write that races with `collect` is reported by this call or the next one.
    fn collect(&mut self) -> Result<DirtyBitmap, DirtyError>;
    /// Stops tracking and removes every protection it installed.
    fn stop(&mut self) -> Result<(), DirtyError>;
}

/// For benchmarks only: a tracker that can also run the bare mechanism of its `collect`.
/// Production code holds `dyn DirtyTracker`, which cannot reach `floor_collect`.
pub trait BenchTracker: DirtyTracker {
    /// The same system calls as `collect`, with the same effect on protection, but no
    /// bitmap: the pages they report are thrown away. Returns how many were dirty.
    fn floor_collect(&mut self) -> Result<usize, DirtyError>;
}

/// What a tracker needs to know about guest RAM.
#[derive(Clone)]
pub struct TrackedRam {
    /// The RAM regions (slot `i` is region `i`).
    pub regions: Vec<RamRegion>,
    /// ferry's own writes and discards, for every running tracker.
    pub writes: Arc<WriteSinks>,
    /// Keeps guest RAM mapped while a tracker exists: `stop` and `Drop` name these
    /// host addresses to the kernel (unregister, memory slots), which must still be
    /// guest RAM then, not unmapped or reused.
    pub mapping: GuestMemoryMmap,
    /// The memfd, for which pages hold data: a page the guest never wrote cannot be
    /// dirty.
    pub memfd: Arc<std::fs::File>,
}

impl TrackedRam {
    /// The memfd page that host address `host_addr` falls in, and that page's host
    /// address; `None` outside guest RAM (a fault a userfaultfd reports, say).
    pub(crate) fn page_at(&self, host_addr: u64) -> Option<(usize, u64)> {
        self.regions
            .iter()
            .find(|r| host_addr >= r.host_addr && host_addr < r.host_addr + r.size)
            .map(|r| {
                let in_region = (host_addr - r.host_addr) & !(crate::PAGE_SIZE - 1);
                (
                    crate::page_index((r.file_offset + in_region) / crate::PAGE_SIZE),
                    r.host_addr + in_region,
                )
            })
    }

    /// The host ranges, as (address, bytes), of memfd pages `first..first+count`: one
    /// per region the run crosses (memfd pages are numbered on across the gap below
    /// 4 GiB, host addresses are not).
    pub(crate) fn host_ranges(
        &self,
        first: usize,
        count: usize,
    ) -> impl Iterator<Item = (*mut libc::c_void, usize)> + '_ {
        self.host_ranges_at(first, count)
            .map(|(addr, len, _)| (addr, len))
    }

    /// `host_ranges`, each with its offset in the memfd.
    pub(crate) fn host_ranges_at(
        &self,
        first: usize,
        count: usize,
    ) -> impl Iterator<Item = (*mut libc::c_void, usize, u64)> + '_ {
        let (from, to) = (
            first as u64 * crate::PAGE_SIZE,
            (first + count) as u64 * crate::PAGE_SIZE,
        );
        self.regions.iter().filter_map(move |r| {
            let (a, b) = (from.max(r.file_offset), to.min(r.file_offset + r.size));
            (a < b).then(|| {
                let addr = r.host_addr + (a - r.file_offset);
                (
                    addr as *mut libc::c_void,
                    usize::try_from(b - a).unwrap_or(usize::MAX),
                    a,
                )
            })
        })
    }

    /// The memfd ranges that hold pages, as (first page, pages).
    pub fn data_pages(&self) -> std::io::Result<Vec<(usize, usize)>> {
        let size = self.regions.iter().map(|r| r.size).sum();
        Ok(as_pages(crate::sys::data_extents(&self.memfd, size)?))
    }

    /// The pages that hold data now, given `earlier`, the runs `data_pages` gave
    /// before: only the holes between them are walked again. Walking a large populated
    /// memfd takes milliseconds (about 7 ms per GiB here), walking its holes
    /// microseconds, so a caller that must list the pages while the guest is paused
    /// walks it once before. Pages may only have gained data since; one that lost it
    /// (punched) is still listed, and reads as zeros.
    pub fn data_pages_since(
        &self,
        earlier: &[(usize, usize)],
    ) -> std::io::Result<Vec<(usize, usize)>> {
        let size: u64 = self.regions.iter().map(|r| r.size).sum();
        let mut runs = Vec::with_capacity(earlier.len());
        let mut at = 0u64;
        let gaps = earlier
            .iter()
            .map(|&(first, count)| (first as u64 * crate::PAGE_SIZE, count))
            .chain(std::iter::once((size, 0)));
        // Adjacent runs are joined, so that the list does not fragment round after
        // round (each run costs its scanner a call).
        let add = |runs: &mut Vec<(usize, usize)>, (first, count): (usize, usize)| match runs
            .last_mut()
        {
            Some(last) if last.0 + last.1 == first => last.1 += count,
            _ => runs.push((first, count)),
        };
        for (start, count) in gaps {
            if start > at {
                for run in as_pages(crate::sys::data_extents_in(&self.memfd, at, start)?) {
                    add(&mut runs, run);
                }
            }
            if count > 0 {
                add(
                    &mut runs,
                    (crate::page_index(start / crate::PAGE_SIZE), count),
                );
            }
            at = start + count as u64 * crate::PAGE_SIZE;
        }
        Ok(runs)
    }
}

/// Byte extents as page runs (first page, count), rounded out to whole pages.
fn as_pages(extents: Vec<(u64, u64)>) -> Vec<(usize, usize)> {
    extents
        .into_iter()
        .map(|(offset, len)| {
            let first = crate::page_index(offset / crate::PAGE_SIZE);
            let end = crate::page_index((offset + len).div_ceil(crate::PAGE_SIZE));
            (first, end - first)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::{GuestRam, PAGE_SIZE};

    fn trackers(ram: &GuestRam) -> Vec<Box<dyn DirtyTracker>> {
        vec![
            Box::new(UffdAsync::new(ram.tracked()).expect("pagemap")),
            Box::new(UffdSync::new(ram.tracked())),
        ]
    }

    fn pages(b: &DirtyBitmap) -> Vec<u64> {
        b.guest_pages().map(|a| a.0 / PAGE_SIZE).collect()
    }

    /// Plain stores through the mapping, as KVM and the guest make them.
    /// A listing taken earlier and brought up to date walks only its holes, and gives
    /// what a full walk gives now.
    #[test]
    fn test_data_pages_since_finds_pages_filled_after_the_first_walk() {
        let ram = GuestRam::new(64, 46).expect("ram");
        let page = vec![1u8; crate::PAGE_BYTES];
        for p in [0u64, 1, 2, 100, 5000] {
            ram.fill(&page, vm_memory::GuestAddress(p * PAGE_SIZE))
                .expect("fill");
        }
        let earlier = ram.tracked().data_pages().expect("walk");
        for p in [3u64, 50, 99, 101, 16383] {
            ram.fill(&page, vm_memory::GuestAddress(p * PAGE_SIZE))
                .expect("fill");
        }
        let mut since = ram.tracked().data_pages_since(&earlier).expect("since");
        let mut now = ram.tracked().data_pages().expect("walk");
        let pages = |runs: &mut Vec<(usize, usize)>| {
            let mut v: Vec<usize> = runs.iter().flat_map(|&(f, n)| f..f + n).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(pages(&mut since), pages(&mut now));
        assert_eq!(
            pages(&mut now),
            vec![0, 1, 2, 3, 50, 99, 100, 101, 5000, 16383]
        );
    }

    #[test]
    fn test_uffd_modes_report_exactly_the_written_pages() {
        let ram = GuestRam::new(64, 46).expect("ram");
        for mut t in trackers(&ram) {
            t.start().expect("start");
            assert_eq!(
                pages(&t.collect().expect("collect")),
                Vec::<u64>::new(),
                "{:?}: clean at start",
                t.mode()
            );
            for round in 1..=3u64 {
                let written: Vec<u64> = (0..40).map(|i| (i * 97 + round * 13) % 16384).collect();
                for &p in &written {
                    ram.memory()
                        .write_obj(round, GuestAddress(p * PAGE_SIZE + 8))
                        .expect("store");
                }
                let mut want = written.clone();
                want.sort_unstable();
                want.dedup();
                assert_eq!(
                    pages(&t.collect().expect("collect")),
                    want,
                    "{:?} round {round}",
                    t.mode()
                );
            }
            t.stop().expect("stop");
        }
    }

    #[test]
    fn test_ferry_writes_and_discards_are_reported() {
        let ram = GuestRam::new(5 * 1024, 46).expect("ram with two regions");
        let high = GuestAddress(4 << 30);
        for mut t in trackers(&ram) {
            t.start().expect("start");
            ram.memory().write_obj(1u64, high).expect("store");
            assert_eq!(
                pages(&t.collect().expect("collect")),
                vec![high.0 / PAGE_SIZE],
                "{:?}",
                t.mode()
            );
            // A punched page reads as zero but the kernel does not call it written.
            ram.discard(high, PAGE_SIZE).expect("discard");
            ram.write(b"ferry", GuestAddress(0x5000))
                .expect("ferry write");
            assert_eq!(
                pages(&t.collect().expect("collect")),
                vec![5, high.0 / PAGE_SIZE],
                "{:?}",
                t.mode()
            );
            assert_eq!(ram.memory().read_obj::<u64>(high).expect("load"), 0);
            t.stop().expect("stop");
        }
    }

    /// Memfd pages run on from the end of low RAM into RAM above 4 GiB, so one run of
    /// written pages can cross the boundary; both parts must be tracked again.
    #[test]
    fn test_run_across_the_region_boundary_is_tracked_again() {
        let ram = GuestRam::new(5 * 1024, 46).expect("ram with two regions");
        let low_last = GuestAddress((3 << 30) - PAGE_SIZE);
        let high_first = GuestAddress(4 << 30);
        let want = vec![low_last.0 / PAGE_SIZE, high_first.0 / PAGE_SIZE];
        for mut t in trackers(&ram) {
            t.start().expect("start");
            for round in 1..=3u64 {
                ram.memory().write_obj(round, low_last).expect("store");
                ram.memory().write_obj(round, high_first).expect("store");
                assert_eq!(
                    pages(&t.collect().expect("collect")),
                    want,
                    "{:?} round {round}",
                    t.mode()
                );
            }
            t.stop().expect("stop");
        }
    }

    #[test]
    fn test_a_second_userfaultfd_tracker_is_refused() {
        let ram = GuestRam::new(64, 46).expect("ram");
        let mut first = UffdAsync::new(ram.tracked()).expect("pagemap");
        first.start().expect("start");
        let mut second = UffdSync::new(ram.tracked());
        let err = second.start().expect_err("one userfaultfd per range");
        assert!(matches!(err, DirtyError::Busy(_)), "{err}");
        first.stop().expect("stop");
        second.start().expect("free after the first stopped");
        second.stop().expect("stop");
    }

    #[test]
    fn test_ferry_access_outside_ram_is_refused() {
        let ram = GuestRam::new(4096, 46).expect("ram");
        let hole = GuestAddress(3 << 30);
        assert!(ram.write(b"x", hole).is_err());
        assert!(
            ram.write(&[0; 8192], GuestAddress((3 << 30) - 4096))
                .is_err(),
            "crosses into the hole"
        );
        assert!(ram.discard(GuestAddress(0x1001), PAGE_SIZE).is_err());
    }
}
