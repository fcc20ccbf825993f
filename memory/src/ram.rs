//! Guest RAM on one memfd, split into regions around the MMIO hole.

use std::fs::File;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use vm_memory::Bytes;

use crate::dirty::{guest_to_page, total_pages, TrackedRam, WriteLog, WriteSinks};
use crate::layout::{self, MIB, MIN_MEM_MIB};
use crate::{sys, PAGE_SIZE};

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The requested size is below the minimum.
    #[error("memory size {0} MiB is too small: ferry needs at least {MIN_MEM_MIB} MiB")]
    TooSmall(u64),
    /// The requested size does not fit the guest-physical address space.
    #[error("memory size {size_mib} MiB does not fit in the {phys_bits}-bit guest-physical address space")]
    TooLarge {
        /// Requested size.
        size_mib: u64,
        /// Physical address width of the vCPUs.
        phys_bits: u8,
    },
    /// A region is larger than one KVM memory slot holds.
    #[error(
        "memory size {size_mib} MiB needs a memory slot larger than KVM's limit of {max_mib} MiB"
    )]
    SlotTooLarge {
        /// Requested size.
        size_mib: u64,
        /// Largest slot, in MiB.
        max_mib: u64,
    },
    /// `memfd_create` failed.
    #[error("cannot create the guest memory memfd: {0}")]
    Memfd(#[source] std::io::Error),
    /// Sizing or sealing the memfd failed.
    #[error("cannot size guest memory to {size_mib} MiB: {source}")]
    Resize {
        /// Requested size.
        size_mib: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Mapping a region failed.
    #[error("cannot map {size_mib} MiB of guest memory: {source}")]
    Mmap {
        /// Size of the region that failed.
        size_mib: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// An access outside guest RAM.
    #[error("{len:#x} bytes at guest address {addr:#x} are not all guest RAM")]
    OutsideRam {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A read, write or discard failed.
    #[error("guest memory access failed: {0}")]
    Access(String),
    /// vm-memory refused the region layout.
    #[error("invalid guest memory layout: {0}")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// One contiguous piece of guest RAM, as KVM needs it for a memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub guest_addr: GuestAddress,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address of the shared mapping.
    pub host_addr: u64,
    /// Offset of this region in the memfd.
    pub file_offset: u64,
}

/// Guest memory as devices and loaders see it: every write through it is marked for
/// dirty tracking.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<WriteLog>;

/// All of guest RAM: the memfd and its shared mapping. A clone is a second handle on
/// the same memory, which stays mapped while any handle lives.
#[derive(Clone)]
pub struct GuestRam {
    file: Arc<File>,
    memory: GuestMemoryMmap,
    regions: Vec<RamRegion>,
    size: u64,
    /// Pages ferry itself writes or discards, for every running dirty tracker.
    writes: Arc<WriteSinks>,
}

/// Checks that `size_mib` MiB of guest RAM can be mapped, by reserving (and at once
/// releasing) that much address space: nothing is allocated. Also checks the KVM slot
/// limit.
pub fn check_mappable(size_mib: u64) -> Result<(), RamError> {
    check_slots(size_mib)?;
    let len = size_mib
        .checked_mul(MIB)
        .and_then(|size| usize::try_from(size).ok())
        .ok_or(RamError::TooLarge {
            size_mib,
            phys_bits: 64,
        })?;
    sys::reserve_address_space(len).map_err(|source| RamError::Mmap {
        size_mib,
        source: vm_memory::mmap::MmapRegionError::Mmap(source),
    })
}

/// Pages in one KVM memory slot at most (`KVM_MEM_MAX_NR_PAGES`).
const KVM_SLOT_MAX_PAGES: u64 = (1 << 31) - 1;

/// Each region becomes one KVM slot: refuse at once a size whose region KVM would.
fn check_slots(size_mib: u64) -> Result<(), RamError> {
    let size = size_mib.saturating_mul(MIB);
    let max = KVM_SLOT_MAX_PAGES * PAGE_SIZE;
    if layout::ram_regions(size).iter().any(|(_, len)| *len > max) {
        return Err(RamError::SlotTooLarge {
            size_mib,
            max_mib: max / MIB,
        });
    }
    Ok(())
}

impl GuestRam {
    /// Creates `size_mib` MiB of guest RAM. Nothing is touched: pages are allocated only
    /// when the guest (or ferry) first writes them. `phys_bits` bounds the layout.
    pub fn new(size_mib: u64, phys_bits: u8) -> Result<Self, RamError> {
        if size_mib < MIN_MEM_MIB {
            return Err(RamError::TooSmall(size_mib));
        }
        let too_large = RamError::TooLarge {
            size_mib,
            phys_bits,
        };
        let size = size_mib.checked_mul(MIB).ok_or(too_large)?;
        if layout::ram_end(size) > 1u64 << phys_bits.min(63) || isize::try_from(size).is_err() {
            return Err(RamError::TooLarge {
                size_mib,
                phys_bits,
            });
        }

        check_slots(size_mib)?;
        let file = sys::memfd_create(c"ferry-guest-ram").map_err(RamError::Memfd)?;
        let resize = |source| RamError::Resize { size_mib, source };
        file.set_len(size).map_err(resize)?;
        // Nothing may shrink guest RAM under a running guest: that would turn guest
        // accesses into SIGBUS in ferry.
        sys::add_seals(&file, libc::F_SEAL_SHRINK).map_err(resize)?;
        Self::map(file, size_mib, size, phys_bits)
    }

    /// Guest RAM of `size_mib` MiB on a memfd that another ferry created and handed
    /// over (a local migration): its pages are used as they are, nothing is copied.
    /// The memfd must be exactly that size and sealed against shrinking, so that the
    /// other process cannot pull guest RAM from under this one.
    pub fn from_memfd(file: File, size_mib: u64, phys_bits: u8) -> Result<Self, RamError> {
        let too_large = RamError::TooLarge {
            size_mib,
            phys_bits,
        };
        let size = size_mib.checked_mul(MIB).ok_or(too_large)?;
        if size_mib < MIN_MEM_MIB {
            return Err(RamError::TooSmall(size_mib));
        }
        if layout::ram_end(size) > 1u64 << phys_bits.min(63) || isize::try_from(size).is_err() {
            return Err(RamError::TooLarge {
                size_mib,
                phys_bits,
            });
        }
        check_slots(size_mib)?;
        let wrong = |reason: String| RamError::Resize {
            size_mib,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, reason),
        };
        let len = file
            .metadata()
            .map_err(|source| RamError::Resize { size_mib, source })?
            .len();
        if len != size {
            return Err(wrong(format!(
                "the memfd handed over is {len} bytes, not {size}"
            )));
        }
        let seals = sys::seals(&file).map_err(|source| RamError::Resize { size_mib, source })?;
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(wrong(
                "the memfd handed over is not sealed against shrinking".into(),
            ));
        }
        Self::map(file, size_mib, size, phys_bits)
    }

    /// Maps `file` (of `size` bytes) as guest RAM, one mapping per region.
    fn map(file: File, size_mib: u64, size: u64, phys_bits: u8) -> Result<Self, RamError> {
        let file = Arc::new(file);

        // Sized for the whole memfd; the regions below are contiguous in it. Nothing is
        // allocated until a tracker subscribes.
        let writes = Arc::new(WriteSinks::new(
            usize::try_from(size / PAGE_SIZE).unwrap_or(usize::MAX),
        ));
        let mut mapped = Vec::new();
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for (guest_addr, len) in layout::ram_regions(size) {
            // Both fit in usize: `size` was checked against isize above.
            let len_usize = usize::try_from(len).map_err(|_| RamError::TooLarge {
                size_mib,
                phys_bits,
            })?;
            let log = WriteLog::new(writes.clone(), offset);
            let mmap = MmapRegionBuilder::new_with_bitmap(len_usize, log)
                .with_file_offset(FileOffset::from_arc(file.clone(), offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .build()
                .map_err(|source| RamError::Mmap {
                    size_mib: len / MIB,
                    source,
                })?;
            regions.push(RamRegion {
                guest_addr,
                size: len,
                host_addr: mmap.as_ptr() as u64,
                file_offset: offset,
            });
            // `new` fails only when the region would wrap the address space, which the
            // phys_bits check above rules out.
            let region = GuestRegionMmap::new(mmap, guest_addr).ok_or(RamError::TooLarge {
                size_mib,
                phys_bits,
            })?;
            mapped.push(region);
            offset += len;
        }
        let memory = GuestMemoryMmap::from_regions(mapped).map_err(RamError::Layout)?;
        debug_assert_eq!(total_pages(&regions) as u64, size / PAGE_SIZE);
        Ok(GuestRam {
            file,
            memory,
            regions,
            size,
            writes,
        })
    }

    /// The guest memory, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The regions, for KVM memory slots.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd that backs all regions.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// What a dirty tracker needs.
    pub fn tracked(&self) -> TrackedRam {
        TrackedRam {
            regions: self.regions.clone(),
            writes: self.writes.clone(),
            mapping: self.memory.clone(),
            memfd: self.file.clone(),
        }
    }
    /// The memfd pages of `addr..addr+len` as (first, count), checked to lie in one
    /// RAM region.
    pub fn pages_of(&self, addr: GuestAddress, len: u64) -> Result<(usize, usize), RamError> {
        let outside = || RamError::OutsideRam { addr: addr.0, len };
        let last = addr.0.checked_add(len.max(1) - 1).ok_or_else(outside)?;
        let first_page = guest_to_page(&self.regions, addr).ok_or_else(outside)?;
        let last_page = guest_to_page(&self.regions, GuestAddress(last)).ok_or_else(outside)?;
        let span = (last / PAGE_SIZE) - (addr.0 / PAGE_SIZE);
        if last_page < first_page || (last_page - first_page) as u64 != span {
            return Err(outside());
        }
        Ok((first_page, last_page - first_page + 1))
    }

    /// Writes `data` at `addr` as ferry (not the guest): through the tracked mapping, so
    /// the userfaultfd trackers see it, and marked in ferry's own bitmap by the
    /// `WriteLog` (the KVM dirty log never sees userspace writes).
    pub fn write(&self, data: &[u8], addr: GuestAddress) -> Result<(), RamError> {
        self.pages_of(addr, data.len() as u64)?;
        self.memory
            .write_slice(data, addr)
            .map_err(|e| RamError::Access(e.to_string()))
    }

    /// Writes whole pages at `addr` into the memfd with `pwrite(2)`, not through the
    /// mapping: filling RAM that the guest has not touched this way allocates each page
    /// in the kernel without a page fault, several times faster here than a copy
    /// through the mapping (an incoming migration). The pages are marked for every
    /// running dirty tracker, which `pwrite` itself would bypass.
    pub fn fill(&self, data: &[u8], addr: GuestAddress) -> Result<(), RamError> {
        let (first, count) = self.pages_of(addr, data.len() as u64)?;
        if !addr.0.is_multiple_of(PAGE_SIZE) || !(data.len() as u64).is_multiple_of(PAGE_SIZE) {
            return Err(RamError::Access(format!(
                "fill of {:#x} bytes at {:#x} is not whole pages",
                data.len(),
                addr.0
            )));
        }
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(data, first as u64 * PAGE_SIZE)
            .map_err(|e| RamError::Access(format!("pwrite into guest RAM: {e}")))?;
        self.writes.mark(first, count);
        Ok(())
    }

    /// Drops this process's (and KVM's) mappings of all of guest RAM; the memfd keeps
    /// every page as it is, and the next access faults it back in.
    pub fn unmap(&self) -> Result<(), RamError> {
        for r in &self.regions {
            sys::unmap_shared(r.host_addr, r.size)
                .map_err(|e| RamError::Access(format!("madvise(MADV_DONTNEED): {e}")))?;
        }
        Ok(())
    }

    /// Discards whole pages: their contents become zero and their memory is freed. The
    /// kernel reports a punched page as not written, so ferry marks it dirty itself.
    pub fn discard(&self, addr: GuestAddress, len: u64) -> Result<(), RamError> {
        if !addr.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(RamError::Access(format!(
                "discard of {len:#x} bytes at {:#x} is not whole pages",
                addr.0
            )));
        }
        let (first, count) = self.pages_of(addr, len)?;
        let offset = first as u64 * PAGE_SIZE;
        sys::punch_hole(&self.file, offset, len)
            .map_err(|e| RamError::Access(format!("punch hole: {e}")))?;
        self.writes.mark(first, count);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn test_rejects_zero_size() {
        assert!(matches!(GuestRam::new(0, 46), Err(RamError::TooSmall(0))));
    }

    #[test]
    fn test_rejects_size_beyond_address_space() {
        let err = GuestRam::new(1 << 30, 46)
            .err()
            .expect("1 EiB must be refused");
        assert!(matches!(err, RamError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("46-bit"));
        assert!(matches!(
            GuestRam::new(u64::MAX, 46),
            Err(RamError::TooLarge { .. })
        ));
    }

    #[test]
    fn test_rejects_a_region_larger_than_a_kvm_slot() {
        let err = GuestRam::new(16 << 20, 52).err().expect("16 TiB");
        assert!(matches!(err, RamError::SlotTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("KVM's limit"), "{err}");
    }

    #[test]
    fn test_memfd_is_sealed_and_sparse() {
        let ram = GuestRam::new(64, 46).expect("64 MiB");
        // SAFETY: F_GET_SEALS only reads the state of a valid fd.
        let seals = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(ram.file()),
                libc::F_GET_SEALS,
            )
        };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
        assert!(
            ram.file().set_len(MIB).is_err(),
            "shrinking must be refused"
        );
        let blocks = std::os::unix::fs::MetadataExt::blocks(&ram.file().metadata().expect("stat"));
        assert_eq!(
            blocks, 0,
            "no page may be allocated before the guest touches it"
        );
    }

    #[test]
    fn test_large_guest_maps_both_regions() {
        // 64 GiB of address space, none of it touched.
        let ram = GuestRam::new(64 * 1024, 46).expect("64 GiB");
        assert_eq!(ram.regions().len(), 2);
        let high = ram.regions()[1];
        assert_eq!(high.guest_addr, layout::MMIO_HOLE_END);
        assert_eq!(high.file_offset, layout::MMIO_HOLE_START.0);
        let last = GuestAddress(high.guest_addr.0 + high.size - 8);
        ram.memory()
            .write_obj(0x1234_5678u64, last)
            .expect("write top of RAM");
        assert_eq!(
            ram.memory().read_obj::<u64>(last).expect("read"),
            0x1234_5678
        );
        assert!(ram
            .memory()
            .check_address(layout::MMIO_HOLE_START)
            .is_none());
    }
}
