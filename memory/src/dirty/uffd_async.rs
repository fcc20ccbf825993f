//! uffd-wp asynchronous: the kernel resolves write faults by itself and marks the page
//! written; `PAGEMAP_SCAN` reads those marks and write-protects the pages again in one
//! call.
//!
//! With `retain_hot`, a page written in two rounds in a row is un-protected and left so:
//! the guest stops paying a write fault for it every round (3.5-4 µs here), and
//! `collect` reports it every round until tracking stops, without scanning it. So
//! `collect` returns a superset of the pages written, as the KVM log's hot mode does,
//! and pre-copy sends such pages once, at switch-over.

use std::fs::File;

use linux_raw_sys::general::page_region;
use userfaultfd::Uffd;

use super::uffd::{self, features};
use super::{
    BenchTracker, Claim, DirtyBitmap, DirtyError, DirtyTracker, Mechanism, TrackedRam,
    TrackingMode, WriteSubscription,
};
use crate::{page_index, sys, PAGE_SIZE};

/// Entries of `page_region` per `PAGEMAP_SCAN` call; a region may need several calls.
const SCAN_BATCH: usize = 4096;

/// The uffd-wp async tracker.
pub struct UffdAsync {
    ram: TrackedRam,
    /// While started: the userfaultfd, this tracker's record of ferry's writes, and its
    /// hold on the userfaultfd mechanism. Dropped in this order.
    uffd: Option<(Uffd, WriteSubscription, Claim)>,
    pagemap: File,
    regions_buf: Vec<page_region>,
    /// Most bytes one `PAGEMAP_SCAN` covers; 0 = a whole region per call.
    chunk: u64,
    /// With `retain_hot`: the pages the last scan found, and the hot pages.
    hot: Option<(DirtyBitmap, DirtyBitmap)>,
    /// The pages that held data at the last scan: the next one walks only the holes
    /// between them (walking populated extents costs about 7 ms per GiB here).
    data: Option<Vec<(usize, usize)>>,
    retain_hot: bool,
    /// Protect the holes too at `start` (see `uffd::shmem_may_map_pmd`).
    protect_holes: bool,
}

impl UffdAsync {
    /// A tracker over `ram`; nothing is protected until `start`.
    pub fn new(ram: TrackedRam) -> Result<Self, DirtyError> {
        let pagemap = File::open("/proc/self/pagemap").map_err(|source| DirtyError::Sys {
            what: "open /proc/self/pagemap",
            source,
        })?;
        let empty = page_region {
            start: 0,
            end: 0,
            categories: 0,
        };
        Ok(UffdAsync {
            ram,
            uffd: None,
            pagemap,
            regions_buf: vec![empty; SCAN_BATCH],
            chunk: 0,
            hot: None,
            data: None,
            retain_hot: false,
            protect_holes: uffd::shmem_may_map_pmd(),
        })
    }

    /// Leaves pages written in two rounds in a row un-protected (see the module doc).
    pub fn retain_hot(mut self, on: bool) -> Self {
        self.retain_hot = on;
        self
    }

    /// Overrides whether `start` protects the holes too, for tests of both ways.
    #[cfg(test)]
    fn protect_holes(mut self, on: bool) -> Self {
        self.protect_holes = on;
        self
    }

    /// Scans and re-protects at most `bytes` per `PAGEMAP_SCAN` call (0 = a whole region),
    /// so a running guest is never held off a large range at once. Measured by
    /// `ferry-bench-dirty --async-chunks`.
    pub fn chunk(mut self, bytes: u64) -> Self {
        self.chunk = bytes;
        self
    }
}

impl UffdAsync {
    /// Calls `found(first, last)` for each run of written pages (page numbers within the
    /// region, which `scan` turns into memfd pages), write-protecting them again. Hot
    /// pages are not scanned.
    fn scan_regions(
        &mut self,
        mut found: impl FnMut(&crate::RamRegion, u64, u64),
    ) -> Result<(), DirtyError> {
        if self.uffd.is_none() {
            return Err(DirtyError::State("not started"));
        }
        // Only pages that hold data can have been written: a write to a hole
        // allocates the page first. So a big guest that touched little costs little.
        // A page that gains data while the holes are walked is found by the next
        // scan, its write still marked. One punched since stays listed and scanned;
        // ferry punches only through `GuestRam::discard`, which reports the page.
        let data = match &self.data {
            Some(earlier) => self.ram.data_pages_since(earlier),
            None => self.ram.data_pages(),
        }
        .map_err(|source| DirtyError::Sys {
            what: "SEEK_DATA on guest RAM",
            source,
        })?;
        let hot = self
            .hot
            .as_ref()
            .map(|(_, hot)| hot.runs())
            .unwrap_or_default();
        let wanted = subtract_runs(&data, &hot);
        self.data = Some(data);
        for r in self.ram.regions.clone() {
            let base = page_index(r.file_offset / PAGE_SIZE);
            let end = base + page_index(r.size / PAGE_SIZE);
            for &(first, count) in &wanted {
                let (from, to) = (first.max(base), (first + count).min(end));
                if from < to {
                    let (from, to) = ((from - base) as u64, (to - base) as u64);
                    self.scan_span(&r, from * PAGE_SIZE, to * PAGE_SIZE, &mut found)?;
                }
            }
        }
        Ok(())
    }

    /// Scans region bytes `from..to`.
    fn scan_span(
        &mut self,
        r: &crate::RamRegion,
        from: u64,
        to: u64,
        found: &mut impl FnMut(&crate::RamRegion, u64, u64),
    ) -> Result<(), DirtyError> {
        let end = r.host_addr + to;
        let mut start = r.host_addr + from;
        while start < end {
            let scan_end = if self.chunk == 0 {
                end
            } else {
                end.min(start + self.chunk)
            };
            let (n, walk_end) =
                sys::pagemap_scan_written(&self.pagemap, start, scan_end, &mut self.regions_buf)
                    .map_err(|source| DirtyError::Sys {
                        what: "PAGEMAP_SCAN",
                        source,
                    })?;
            for pr in &self.regions_buf[..n] {
                // Clamp to the span: the kernel reports only within [start, scan_end).
                let first = (pr.start.max(start) - r.host_addr) / PAGE_SIZE;
                let last = (pr.end.min(scan_end) - r.host_addr) / PAGE_SIZE;
                found(r, first, last);
            }
            if walk_end <= start {
                return Err(DirtyError::State("stuck: PAGEMAP_SCAN made no progress"));
            }
            start = walk_end;
        }
        Ok(())
    }

    /// Removes write protection from memfd pages `first..first+count`.
    fn unprotect(&self, first: usize, count: usize) -> Result<(), DirtyError> {
        let Some((uffd, _, _)) = &self.uffd else {
            return Err(DirtyError::State("not started"));
        };
        uffd::protect_run(uffd, &self.ram, first, count, false)
    }

    fn scan(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), DirtyError> {
        self.scan_regions(|r, first, last| {
            let base = page_index(r.file_offset / PAGE_SIZE);
            bitmap.set_run(base + page_index(first), page_index(last - first));
        })
    }

    fn scan_ranges(&mut self, mut found: impl FnMut(u64, u64)) -> Result<(), DirtyError> {
        self.scan_regions(|_, first, last| found(first, last))
    }
}

/// Lists the pages of `ram` that hold data and write-protects them; returns the listing.
fn protect_data(uffd: &Uffd, ram: &TrackedRam) -> Result<Vec<(usize, usize)>, DirtyError> {
    let data = ram.data_pages().map_err(|source| DirtyError::Sys {
        what: "SEEK_DATA on guest RAM",
        source,
    })?;
    for &(first, count) in &data {
        uffd::protect_run(uffd, ram, first, count, true)?;
    }
    Ok(data)
}

/// The parts of the sorted runs `a` that no run of the sorted runs `b` covers.
fn subtract_runs(a: &[(usize, usize)], b: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(a.len());
    let mut bi = 0;
    for &(first, count) in a {
        let (mut at, end) = (first, first + count);
        while bi < b.len() && b[bi].0 + b[bi].1 <= at {
            bi += 1;
        }
        let mut k = bi;
        while at < end {
            match b.get(k) {
                Some(&(bf, bc)) if bf < end => {
                    if bf > at {
                        out.push((at, bf - at));
                    }
                    at = at.max(bf + bc);
                    k += 1;
                }
                _ => {
                    out.push((at, end - at));
                    at = end;
                }
            }
        }
    }
    out
}

impl DirtyTracker for UffdAsync {
    fn mode(&self) -> TrackingMode {
        if self.retain_hot {
            TrackingMode::UffdAsyncHot
        } else {
            TrackingMode::UffdAsync
        }
    }

    fn start(&mut self) -> Result<(), DirtyError> {
        if self.uffd.is_some() {
            return Err(DirtyError::State("already started"));
        }
        let claim = self.ram.writes.claim(Mechanism::Userfaultfd)?;
        let uffd = uffd::open(
            &[features::WP, features::WP_SHMEM, features::WP_ASYNC],
            "uffd-wp async",
        )?;
        // Subscribed before protecting: a ferry write in between is reported, not lost.
        let writes = self.ram.writes.subscribe();
        uffd::register(&uffd, &self.ram)?;
        // Only the pages that hold data are protected, not the holes between them:
        // markers over the holes cost about 3 ms per GiB here, and a hole needs none. A
        // hole that gains data later is a present page without protection, which
        // PAGEMAP_SCAN reports as written, and every scan walks the holes of the last
        // listing for such pages (`scan_regions`). Listing before protecting leaves no
        // gap: a page that gains data after the listing lies in one of its holes.
        // Where shmem may be mapped by huge entries, the holes are protected too (see
        // `shmem_may_map_pmd`).
        let protected = if self.protect_holes {
            uffd::protect_all(&uffd, &self.ram).map(|()| None)
        } else {
            protect_data(&uffd, &self.ram).map(Some)
        };
        let data = match protected {
            Ok(data) => data,
            Err(e) => {
                let _ = uffd::unregister(&uffd, &self.ram);
                return Err(e);
            }
        };
        self.uffd = Some((uffd, writes, claim));
        self.data = data;
        self.hot = self.retain_hot.then(|| {
            (
                DirtyBitmap::new(&self.ram.regions),
                DirtyBitmap::new(&self.ram.regions),
            )
        });
        Ok(())
    }

    fn collect(&mut self) -> Result<DirtyBitmap, DirtyError> {
        let mut bitmap = DirtyBitmap::new(&self.ram.regions);
        self.scan(&mut bitmap)?;
        if let Some((previous, hot)) = self.hot.take() {
            // Written in this round and the last: leave it writable from now on. The
            // scan just protected it again, so take that back.
            let newly = bitmap.and(&previous);
            let result = newly
                .runs()
                .into_iter()
                .try_for_each(|(first, count)| self.unprotect(first, count));
            let mut hot = hot;
            hot.union_with(&newly);
            let scanned = bitmap.clone();
            bitmap.union_with(&hot);
            self.hot = Some((scanned, hot));
            result?;
        }
        // After the scan: a ferry write racing with it is reported now or next time.
        if let Some((_, writes, _)) = &self.uffd {
            writes.take_into(&mut bitmap);
        }
        Ok(bitmap)
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        let (uffd, _writes, _claim) = self.uffd.take().ok_or(DirtyError::State("not started"))?;
        self.hot = None;
        self.data = None;
        uffd::unregister(&uffd, &self.ram)
    }
}

impl BenchTracker for UffdAsync {
    fn floor_collect(&mut self) -> Result<usize, DirtyError> {
        let mut pages = 0;
        self.scan_ranges(|first, last| pages += page_index(last - first))?;
        Ok(pages)
    }
}

impl Drop for UffdAsync {
    fn drop(&mut self) {
        if self.uffd.is_some() {
            let _ = self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{subtract_runs, UffdAsync};
    use crate::dirty::DirtyTracker;
    use crate::{GuestRam, PAGE_SIZE};

    /// Writes as the guest does: through the mapping, not through vm-memory (which
    /// would report the write to the tracker by itself).
    fn guest_write(ram: &GuestRam, page: u64, value: u64) {
        let r = &ram.regions()[0];
        assert!((page + 1) * PAGE_SIZE <= r.size);
        // SAFETY: the address lies in guest RAM's live mapping (checked above), which
        // `ram` keeps mapped; a u64 at a page start is aligned.
        unsafe { std::ptr::write_volatile((r.host_addr + page * PAGE_SIZE) as *mut u64, value) };
    }

    /// Each scan walks only the holes of the last one's listing: a page first written
    /// after that listing, in what was a hole, is still found.
    #[test]
    fn test_pages_written_into_holes_after_a_scan_are_found() {
        let ram = GuestRam::new(64, 46).expect("ram");
        for hot in [false, true] {
            let mut t = UffdAsync::new(ram.tracked())
                .expect("tracker")
                .retain_hot(hot);
            t.start().expect("start");
            guest_write(&ram, 10, 1);
            assert_eq!(t.collect().expect("collect").runs(), vec![(10, 1)]);
            // Round 2 writes page 10 again (listed by the last scan, so only a list that
            // keeps it finds it) and pages in holes; round 3 only pages in holes, and a
            // hot tracker reports page 10 on (written in two rounds in a row).
            for (round, written, want) in [
                (2u64, vec![3u64, 4, 10, 900], vec![3u64, 4, 10, 900]),
                (
                    3,
                    vec![5000, 16383],
                    if hot {
                        vec![10, 5000, 16383]
                    } else {
                        vec![5000, 16383]
                    },
                ),
            ] {
                for &p in &written {
                    guest_write(&ram, p, round);
                }
                let got: Vec<u64> = t
                    .collect()
                    .expect("collect")
                    .runs()
                    .into_iter()
                    .flat_map(|(f, c)| f as u64..(f + c) as u64)
                    .collect();
                assert_eq!(got, want, "hot {hot}, round {round}");
            }
            t.stop().expect("stop");
        }
    }

    /// `start` protects the pages that hold data, and only those: a page written before
    /// it is not reported until written again, and a page that was a hole at the start
    /// is reported when written.
    #[test]
    fn test_start_protects_the_pages_that_hold_data() {
        for (hot, holes) in [(false, false), (true, false), (false, true)] {
            let ram = GuestRam::new(64, 46).expect("ram");
            for p in [1u64, 2, 3, 5000] {
                guest_write(&ram, p, 7);
            }
            let mut t = UffdAsync::new(ram.tracked())
                .expect("tracker")
                .retain_hot(hot)
                .protect_holes(holes);
            t.start().expect("start");
            let case = format!("hot {hot}, holes protected {holes}");
            assert_eq!(t.collect().expect("collect").runs(), vec![], "{case}");
            guest_write(&ram, 2, 8);
            guest_write(&ram, 7000, 8);
            assert_eq!(
                t.collect().expect("collect").runs(),
                vec![(2, 1), (7000, 1)],
                "{case}"
            );
            t.stop().expect("stop");
        }
    }

    #[test]
    fn test_subtract_runs() {
        assert_eq!(subtract_runs(&[(0, 10)], &[]), vec![(0, 10)]);
        assert_eq!(subtract_runs(&[(0, 10)], &[(2, 3)]), vec![(0, 2), (5, 5)]);
        assert_eq!(
            subtract_runs(&[(0, 10), (20, 5)], &[(8, 14)]),
            vec![(0, 8), (22, 3)]
        );
        assert_eq!(subtract_runs(&[(5, 5)], &[(0, 20)]), vec![]);
        assert_eq!(
            subtract_runs(&[(0, 4), (10, 4)], &[(1, 1), (3, 8)]),
            vec![(0, 1), (2, 1), (11, 3)]
        );
    }
}
