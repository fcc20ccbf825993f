//! Register state of a vCPU at boot: the Linux 64-bit boot protocol wants long mode,
//! paging with an identity map, flat segments, and `boot_params` in RSI.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use memory::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout::{BOOT_GDT, BOOT_IDT, BOOT_STACK, PD, PDPT, PML4, ZERO_PAGE};

/// Why a vCPU's registers could not be set.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM set fewer MSRs than asked.
    #[error("KVM_SET_MSRS set {set} of {wanted} boot MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
    },
    /// Writing the GDT or page tables failed.
    #[error("cannot write boot structures to guest memory: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Flat GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_ffff,
];
const GDT_LIMIT: u16 = 4 * 8 - 1;

fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    // Each field is at most 4 bits wide, so the mask makes the value fit a u8.
    let flags =
        |bit: u32, width: u32| u8::try_from((descriptor >> bit) & ((1 << width) - 1)).unwrap_or(0);
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: flags(40, 4),
        present: flags(47, 1),
        dpl: flags(45, 2),
        db: flags(54, 1),
        s: flags(44, 1),
        l: flags(53, 1),
        g: flags(55, 1),
        avl: flags(52, 1),
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT and an identity map of the first GiB (2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, BOOT_GDT.unchecked_add(i as u64 * 8))
            .map_err(RegsError::Memory)?;
    }
    mem.write_obj(0u64, BOOT_IDT).map_err(RegsError::Memory)?;
    mem.write_obj(PDPT.0 | 0x3, PML4)
        .map_err(RegsError::Memory)?;
    mem.write_obj(PD.0 | 0x3, PDPT).map_err(RegsError::Memory)?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    mem.write_slice(&pd, PD).map_err(RegsError::Memory)
}

/// Puts the boot vCPU in long mode at `entry`, with `boot_params` in RSI.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    sregs.gdt.base = BOOT_GDT.0;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = BOOT_IDT.0;
    sregs.idt.limit = 7;
    let code = segment(0x08, GDT[1]);
    let data = segment(0x10, GDT[2]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(0x18, GDT[3]);
    sregs.cr3 = PML4.0;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK.0,
        rbp: BOOT_STACK.0,
        rsi: ZERO_PAGE.0,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// x87 and SSE control words as after FNINIT and at reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_DEF_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSRs a vCPU starts with, filtered to those KVM lists, so an MSR this host's KVM
/// lacks is never assumed.
pub fn boot_msrs(supported: &[u32]) -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_WRITEBACK),
    ]
    .into_iter()
    .filter(|(index, _)| supported.contains(index))
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs; every one must be accepted.
pub fn setup_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), RegsError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

fn delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 delivers ExtINT (the PIC) and LINT1 delivers NMI, as a PC's BIOS leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut state = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(&mut state, APIC_LVT0, delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(&mut state, APIC_LVT1, delivery_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&state).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_segment_decodes_code_descriptor() {
        let s = segment(0x08, GDT[1]);
        assert_eq!(
            (s.type_, s.present, s.l, s.db, s.s, s.g),
            (0xb, 1, 1, 0, 1, 1)
        );
        let t = segment(0x18, GDT[3]);
        assert_eq!((t.type_, t.s), (0xb, 0));
    }

    #[test]
    fn test_boot_msrs_skip_unsupported() {
        let msrs = boot_msrs(&[MSR_STAR, MSR_MTRR_DEF_TYPE]);
        assert_eq!(msrs.len(), 2);
        assert_eq!(msrs[1].data, MTRR_DEF_WRITEBACK);
    }

    #[test]
    fn test_delivery_mode_keeps_other_bits() {
        assert_eq!(delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
    }
}
