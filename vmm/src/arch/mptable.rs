//! The Intel MultiProcessor Specification 1.4 table, so guests without ACPI find every
//! vCPU and the IOAPIC. Built as bytes: no crate provides it, and building a byte image
//! avoids `unsafe` packed-struct conversions.

use memory::GuestMemoryMmap;
use vm_memory::Bytes;

use super::layout::{EBDA, EBDA_END};

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the table to fit in the EBDA.
    #[error("an MP table for {0} vCPUs does not fit in the EBDA")]
    TooManyCpus(u8),
    /// The table would not fit its own length field.
    #[error("an MP table of {0} bytes is too large")]
    TooLarge(usize),
    /// Writing guest memory failed.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// `memory::layout::IOAPIC_START` and `LAPIC_START`, as the 32-bit fields the table holds.
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Legacy ISA interrupts routed through the IOAPIC.
const IOAPIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;
/// Family 6 signature and FPU|APIC feature flags; Linux only checks they are non-zero.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

const ENTRY_CPU: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_sub(*b))
}

fn interrupt_entry(kind: u8, irq_type: u8, src_irq: u8, dst_apic: u8, dst_pin: u8) -> [u8; 8] {
    [kind, irq_type, 0, 0, 0, src_irq, dst_apic, dst_pin]
}

/// Builds the floating pointer structure followed by the configuration table, placed at
/// `base` (an address below 1 MiB).
pub fn build(base: u32, cpus: u8) -> Result<Vec<u8>, MptableError> {
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT } else { 0 };
        entries.extend_from_slice(&[ENTRY_CPU, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&interrupt_entry(
            ENTRY_IOINT,
            INT_TYPE_INT,
            pin,
            ioapic_id,
            pin,
        ));
        count += 1;
    }
    entries.extend_from_slice(&interrupt_entry(ENTRY_LINT, INT_TYPE_EXTINT, 0, 0xff, 0));
    entries.extend_from_slice(&interrupt_entry(ENTRY_LINT, INT_TYPE_NMI, 0, 0xff, 1));
    count += 2;

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = base + 16; // just past the floating pointer
    let table_len = u16::try_from(HEADER_LEN + entries.len())
        .map_err(|_| MptableError::TooLarge(HEADER_LEN + entries.len()))?;

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum later
    header.extend_from_slice(b"FERRY   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length and checksum
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, revision
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `cpus` vCPUs into the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    // The EBDA sits below 1 MiB.
    let base = u32::try_from(EBDA.0).map_err(|_| MptableError::TooManyCpus(cpus))?;
    let bytes = build(base, cpus)?;
    if EBDA.0 + bytes.len() as u64 > EBDA_END.0 {
        return Err(MptableError::TooManyCpus(cpus));
    }
    mem.write_slice(&bytes, EBDA).map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn test_checksums_and_cpu_entries() {
        let bytes = build(0x9fc00, 4).expect("build");
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0);
        let table = &bytes[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let cpus: Vec<_> = table[44..]
            .chunks(20)
            .take(4)
            .map(|c| (c[0], c[1], c[3]))
            .collect();
        assert_eq!(cpus, vec![(0, 0, 3), (0, 1, 1), (0, 2, 1), (0, 3, 1)]);
    }

    #[test]
    fn test_32_cpus_fit_in_ebda() {
        assert!(EBDA.0 + build(0x9fc00, 32).expect("build").len() as u64 <= EBDA_END.0);
    }

    #[test]
    fn test_apic_addresses_match_layout() {
        assert_eq!(u64::from(IOAPIC_ADDR), memory::layout::IOAPIC_START.0);
        assert_eq!(u64::from(LAPIC_ADDR), memory::layout::LAPIC_START.0);
    }
}
