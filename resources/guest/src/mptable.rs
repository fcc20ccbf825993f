//! Counts the enabled processors in the Intel MP table that the VMM wrote, checking both
//! checksums, so the guest can report how many CPUs it was given.

fn byte(addr: u64) -> u8 {
    // SAFETY: the scanned ranges are in identity-mapped low RAM.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |sum, i| sum.wrapping_add(byte(addr + i))) == 0
}

fn find_floating_pointer(start: u64, len: u64) -> Option<u64> {
    (start..start + len).step_by(16).find(|&a| {
        byte(a) == b'_'
            && byte(a + 1) == b'M'
            && byte(a + 2) == b'P'
            && byte(a + 3) == b'_'
            && checksum_ok(a, 16)
    })
}

/// What the MP table says.
pub enum MpResult {
    /// No floating pointer in the EBDA or the BIOS area.
    Missing,
    /// A structure failed its signature or checksum.
    Corrupt,
    /// The number of enabled processors.
    Cpus(u32),
}

/// Scans the EBDA's first KiB and the BIOS ROM area, as the MP spec says to.
pub fn count_cpus() -> MpResult {
    let Some(fp) =
        find_floating_pointer(0x9fc00, 0x400).or_else(|| find_floating_pointer(0xf0000, 0x10000))
    else {
        return MpResult::Missing;
    };
    let table = u32::from_le_bytes([byte(fp + 4), byte(fp + 5), byte(fp + 6), byte(fp + 7)]) as u64;
    if table == 0
        || byte(table) != b'P'
        || byte(table + 1) != b'C'
        || byte(table + 2) != b'M'
        || byte(table + 3) != b'P'
    {
        return MpResult::Corrupt;
    }
    let len = u16::from_le_bytes([byte(table + 4), byte(table + 5)]) as u64;
    let count = u16::from_le_bytes([byte(table + 34), byte(table + 35)]);
    if !checksum_ok(table, len) {
        return MpResult::Corrupt;
    }
    let mut entry = table + 44;
    let mut cpus = 0;
    for _ in 0..count {
        let size = match byte(entry) {
            0 => {
                if byte(entry + 3) & 1 != 0 {
                    cpus += 1;
                }
                20
            }
            1..=4 => 8,
            _ => return MpResult::Corrupt,
        };
        entry += size;
        if entry > table + len {
            return MpResult::Corrupt;
        }
    }
    MpResult::Cpus(cpus)
}
