//! KVM's dirty log: `KVM_MEM_LOG_DIRTY_PAGES` on each memory slot, read with
//! `KVM_GET_DIRTY_LOG`. With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, reading does not
//! re-protect, and `KVM_CLEAR_DIRTY_LOG` re-protects only the pages that were dirty.
//!
//! With `retain_hot`, a page dirty in two rounds in a row is not re-protected: the guest
//! stops paying a fault for it every round, and KVM keeps reporting it dirty until
//! tracking stops. `collect` then returns a superset of the pages written (the hot
//! ones each round), which is what a migration sends anyway for pages that change
//! every round.

use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;

use super::{
    BenchTracker, Claim, DirtyBitmap, DirtyError, DirtyTracker, Mechanism, TrackedRam,
    TrackingMode, WriteSubscription,
};
use crate::{page_index, sys, PAGE_SIZE};

/// The KVM dirty-log tracker. Slot `i` is RAM region `i`. It holds guest RAM's mapping
/// (`TrackedRam::mapping`), so the slots it re-registers on `stop` or drop still name
/// live guest RAM.
pub struct KvmDirtyLog {
    ram: TrackedRam,
    vm: Arc<VmFd>,
    manual_protect: bool,
    /// While started: this tracker's record of ferry's writes and its hold on the log.
    started: Option<(WriteSubscription, Claim)>,
    retain_hot: bool,
    /// Each slot's dirty words from the previous round, for `retain_hot`.
    previous: Vec<Vec<u64>>,
}

impl KvmDirtyLog {
    /// A tracker over the VM's RAM slots.
    pub fn new(ram: TrackedRam, vm: Arc<VmFd>) -> Self {
        KvmDirtyLog {
            ram,
            vm,
            manual_protect: false,
            started: None,
            retain_hot: false,
            previous: Vec::new(),
        }
    }

    /// Leaves pages dirty in two rounds in a row writable (see the module doc). Takes
    /// effect only where KVM has manual protect; without it, reading re-protects all.
    pub fn retain_hot(mut self, on: bool) -> Self {
        self.retain_hot = on;
        self
    }

    fn set_slots(&self, flags: u32) -> Result<(), DirtyError> {
        for (slot, r) in (0u32..).zip(&self.ram.regions) {
            let region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: r.guest_addr.0,
                memory_size: r.size,
                userspace_addr: r.host_addr,
            };
            // SAFETY: the region is the same live mapping the slot already has; only
            // its flags change.
            unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| DirtyError::Sys {
                what: "KVM_SET_USER_MEMORY_REGION",
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        }
        Ok(())
    }
}

impl KvmDirtyLog {
    /// Reads each slot's dirty log, hands it to `visit`, then re-protects those pages
    /// (with manual protect; otherwise reading already did).
    fn each_slot(
        &mut self,
        mut visit: impl FnMut(&crate::RamRegion, &[u64]),
    ) -> Result<(), DirtyError> {
        if self.started.is_none() {
            return Err(DirtyError::State("not started"));
        }
        for (slot, r) in (0u32..).zip(&self.ram.regions) {
            let size =
                usize::try_from(r.size).map_err(|_| DirtyError::State("over a slot too large"))?;
            let mut words = self
                .vm
                .get_dirty_log(slot, size)
                .map_err(|e| DirtyError::Sys {
                    what: "KVM_GET_DIRTY_LOG",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                })?;
            visit(r, &words);
            if self.manual_protect && self.retain_hot {
                let index = usize::try_from(slot).unwrap_or(usize::MAX);
                if self.previous.len() <= index {
                    self.previous.resize(index + 1, Vec::new());
                }
                let previous = std::mem::replace(&mut self.previous[index], words.clone());
                // Re-protect only what was not also dirty last round.
                for (w, p) in words
                    .iter_mut()
                    .zip(previous.iter().chain(std::iter::repeat(&0)))
                {
                    *w &= !p;
                }
            }
            if self.manual_protect {
                let pages = u32::try_from(r.size / PAGE_SIZE)
                    .map_err(|_| DirtyError::State("over a slot too large"))?;
                sys::kvm_clear_dirty_log(self.vm.as_ref(), slot, pages, &words).map_err(
                    |source| DirtyError::Sys {
                        what: "KVM_CLEAR_DIRTY_LOG",
                        source,
                    },
                )?;
            }
        }
        Ok(())
    }
}

impl DirtyTracker for KvmDirtyLog {
    fn mode(&self) -> TrackingMode {
        if self.retain_hot {
            TrackingMode::KvmDirtyLogHot
        } else {
            TrackingMode::KvmDirtyLog
        }
    }

    fn start(&mut self) -> Result<(), DirtyError> {
        if self.started.is_some() {
            return Err(DirtyError::State("already started"));
        }
        let claim = self.ram.writes.claim(Mechanism::KvmDirtyLog)?;
        if self
            .vm
            .check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
            > 0
            && !self.manual_protect
        {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
                ..Default::default()
            };
            self.vm.enable_cap(&cap).map_err(|e| DirtyError::Sys {
                what: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
            self.manual_protect = true;
        }
        self.previous.clear();
        let writes = self.ram.writes.subscribe();
        self.set_slots(KVM_MEM_LOG_DIRTY_PAGES)?;
        self.started = Some((writes, claim));
        Ok(())
    }

    fn collect(&mut self) -> Result<DirtyBitmap, DirtyError> {
        let mut bitmap = DirtyBitmap::new(&self.ram.regions);
        self.each_slot(|r, words| bitmap.merge_at(page_index(r.file_offset / PAGE_SIZE), words))?;
        // KVM never sees ferry's own writes: they come from this tracker's subscription.
        if let Some((writes, _)) = &self.started {
            writes.take_into(&mut bitmap);
        }
        Ok(bitmap)
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.started.is_none() {
            return Err(DirtyError::State("not started"));
        }
        let result = self.set_slots(0);
        self.started = None;
        result
    }
}

impl BenchTracker for KvmDirtyLog {
    fn floor_collect(&mut self) -> Result<usize, DirtyError> {
        let mut pages = 0;
        self.each_slot(|_, words| {
            pages += words.iter().map(|w| w.count_ones() as usize).sum::<usize>()
        })?;
        Ok(pages)
    }
}

impl Drop for KvmDirtyLog {
    fn drop(&mut self) {
        if self.started.is_some() {
            let _ = self.stop();
        }
    }
}
