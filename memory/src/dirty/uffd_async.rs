//! uffd-wp asynchronous: the kernel resolves write faults by itself and marks the page
//! written; `PAGEMAP_SCAN` reads those marks and write-protects the pages again in one
//! call.

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
        })
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
    /// region, which `scan` turns into memfd pages), write-protecting them again.
    fn scan_regions(
        &mut self,
        mut found: impl FnMut(&crate::RamRegion, u64, u64),
    ) -> Result<(), DirtyError> {
        if self.uffd.is_none() {
            return Err(DirtyError::State("not started"));
        }
        for r in &self.ram.regions {
            let end = r.host_addr + r.size;
            let mut start = r.host_addr;
            while start < end {
                let scan_end = if self.chunk == 0 {
                    end
                } else {
                    end.min(start + self.chunk)
                };
                let (n, walk_end) = sys::pagemap_scan_written(
                    &self.pagemap,
                    start,
                    scan_end,
                    &mut self.regions_buf,
                )
                .map_err(|source| DirtyError::Sys {
                    what: "PAGEMAP_SCAN",
                    source,
                })?;
                for pr in &self.regions_buf[..n] {
                    // Clamp to the region: the kernel reports only within [start, end).
                    let first = (pr.start.max(r.host_addr) - r.host_addr) / PAGE_SIZE;
                    let last = (pr.end.min(scan_end) - r.host_addr) / PAGE_SIZE;
                    found(r, first, last);
                }
                if walk_end <= start {
                    return Err(DirtyError::State("stuck: PAGEMAP_SCAN made no progress"));
                }
                start = walk_end;
            }
        }
        Ok(())
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

impl DirtyTracker for UffdAsync {
    fn mode(&self) -> TrackingMode {
        TrackingMode::UffdAsync
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
        // Never-touched shmem pages get a PTE marker: nothing needs populating first.
        if let Err(e) = uffd::protect_all(&uffd, &self.ram) {
            let _ = uffd::unregister(&uffd, &self.ram);
            return Err(e);
        }
        self.uffd = Some((uffd, writes, claim));
        Ok(())
    }

    fn collect(&mut self) -> Result<DirtyBitmap, DirtyError> {
        let mut bitmap = DirtyBitmap::new(&self.ram.regions);
        self.scan(&mut bitmap)?;
        // After the scan: a ferry write racing with it is reported now or next time.
        if let Some((_, writes, _)) = &self.uffd {
            writes.take_into(&mut bitmap);
        }
        Ok(bitmap)
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        let (uffd, _writes, _claim) = self.uffd.take().ok_or(DirtyError::State("not started"))?;
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
