//! The x86_64 guest-physical memory map, sorted by address.

use vm_memory::GuestAddress;

/// One MiB, the unit of `mem_size_mib`.
pub const MIB: u64 = 1 << 20;

/// Start of the 32-bit MMIO hole: RAM stops here below 4 GiB.
pub const MMIO_HOLE_START: GuestAddress = GuestAddress(0xc000_0000);
/// virtio-mmio devices, one 4 KiB page each, from here up.
pub const VIRTIO_MMIO_START: GuestAddress = GuestAddress(0xd000_0000);
/// The IOAPIC's registers.
pub const IOAPIC_START: GuestAddress = GuestAddress(0xfec0_0000);
/// The local APICs' registers.
pub const LAPIC_START: GuestAddress = GuestAddress(0xfee0_0000);
/// End of the 32-bit MMIO hole; RAM beyond `MMIO_HOLE_START` resumes here.
pub const MMIO_HOLE_END: GuestAddress = GuestAddress(1 << 32);

/// The smallest guest ferry accepts: the boot structures and a kernel must fit.
pub const MIN_MEM_MIB: u64 = 16;

/// Splits `size` bytes of guest RAM around the MMIO hole. A guest of up to 3 GiB gets one
/// region at 0; a larger one gets a second region starting at 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_HOLE_START.0);
    let mut regions = vec![(GuestAddress(0), low)];
    if size > low {
        regions.push((MMIO_HOLE_END, size - low));
    }
    regions
}

/// The first guest-physical address past the end of RAM laid out by `ram_regions`.
pub fn ram_end(size: u64) -> u64 {
    // Saturating: a size near u64::MAX must not wrap to a small end and pass a check.
    ram_regions(size)
        .last()
        .map(|(start, len)| start.0.saturating_add(*len))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_small_guest_has_one_region() {
        assert_eq!(ram_regions(512 * MIB), vec![(GuestAddress(0), 512 * MIB)]);
    }

    #[test]
    fn test_guest_exactly_at_hole_has_one_region() {
        assert_eq!(ram_regions(3072 * MIB), vec![(GuestAddress(0), 3072 * MIB)]);
    }

    #[test]
    fn test_large_guest_skips_mmio_hole() {
        let r = ram_regions(8192 * MIB);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), 3072 * MIB));
        assert_eq!(r[1], (GuestAddress(4096 * MIB), 5120 * MIB));
        assert_eq!(ram_end(8192 * MIB), 9216 * MIB);
        assert_eq!(ram_end(u64::MAX), u64::MAX, "saturates, never wraps");
    }
}
