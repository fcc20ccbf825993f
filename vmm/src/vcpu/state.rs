//! A vCPU's saved state: everything KVM holds for it, read on the vCPU's own thread
//! while it is parked outside `KVM_RUN`, and written back to a fresh vCPU before it
//! first runs.
//!
//! Registers are plain named fields. The other KVM structures (XSAVE, LAPIC, events,
//! debug registers, XCRs) are kept as their exact bytes: their layout is KVM's ABI, and
//! a restore checks each one's length before it reaches KVM.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Cap, VcpuFd};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::vm::HostKvm;

/// Why a vCPU's state could not be read or applied.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// Which ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved structure has the wrong size for this KVM.
    #[error("vCPU {index}: field {field} is {got} bytes, KVM's structure is {want}")]
    Size {
        /// vCPU index.
        index: u8,
        /// The field.
        field: &'static str,
        /// Its length.
        got: usize,
        /// The length KVM takes.
        want: usize,
    },
    /// KVM refused a saved value.
    #[error("vCPU {index}: KVM refused {field}: {reason}")]
    Refused {
        /// vCPU index.
        index: u8,
        /// The field (and MSR, where one is named).
        field: String,
        /// Why.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_regs", deny_unknown_fields)]
struct RegsDef {
    rax: u64,
    rbx: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    rsp: u64,
    rbp: u64,
    r8: u64,
    r9: u64,
    r10: u64,
    r11: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
    rip: u64,
    rflags: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_segment", deny_unknown_fields)]
struct SegmentDef {
    base: u64,
    limit: u32,
    selector: u16,
    #[serde(rename = "type")]
    type_: u8,
    present: u8,
    dpl: u8,
    db: u8,
    s: u8,
    l: u8,
    g: u8,
    avl: u8,
    unusable: u8,
    #[serde(skip)]
    padding: u8,
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_dtable", deny_unknown_fields)]
struct DtableDef {
    base: u64,
    limit: u16,
    #[serde(skip)]
    padding: [u16; 3],
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_sregs", deny_unknown_fields)]
struct SregsDef {
    #[serde(with = "SegmentDef")]
    cs: kvm_segment,
    #[serde(with = "SegmentDef")]
    ds: kvm_segment,
    #[serde(with = "SegmentDef")]
    es: kvm_segment,
    #[serde(with = "SegmentDef")]
    fs: kvm_segment,
    #[serde(with = "SegmentDef")]
    gs: kvm_segment,
    #[serde(with = "SegmentDef")]
    ss: kvm_segment,
    #[serde(with = "SegmentDef")]
    tr: kvm_segment,
    #[serde(with = "SegmentDef")]
    ldt: kvm_segment,
    #[serde(with = "DtableDef")]
    gdt: kvm_dtable,
    #[serde(with = "DtableDef")]
    idt: kvm_dtable,
    cr0: u64,
    cr2: u64,
    cr3: u64,
    cr4: u64,
    cr8: u64,
    efer: u64,
    apic_base: u64,
    interrupt_bitmap: [u64; 4],
}

/// One CPUID leaf as the guest saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeaf {
    /// EAX on input.
    pub function: u32,
    /// ECX on input.
    pub index: u32,
    /// KVM_CPUID_FLAG_*.
    pub flags: u32,
    /// Output registers.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// One MSR and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Msr {
    /// The MSR's index.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// The vCPU's index (its APIC ID).
    pub index: u8,
    /// CPUID as the guest saw it.
    pub cpuid: Vec<CpuidLeaf>,
    /// General-purpose registers, RIP and RFLAGS.
    #[serde(with = "RegsDef")]
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    #[serde(with = "SregsDef")]
    pub sregs: kvm_sregs,
    /// `kvm_xsave`: the x87 FPU, SSE and every XSAVE component.
    pub xsave: Vec<u8>,
    /// `kvm_xcrs`: XCR0.
    pub xcrs: Vec<u8>,
    /// `kvm_debugregs`: DR0-3, DR6, DR7.
    pub debugregs: Vec<u8>,
    /// `kvm_lapic_state`: the local APIC's register page.
    pub lapic: Vec<u8>,
    /// Every MSR of `saved_msrs`, in KVM's order (the TSC before its deadline).
    pub msrs: Vec<Msr>,
    /// `kvm_vcpu_events`: pending exceptions, interrupts, NMIs, SMM.
    pub vcpu_events: Vec<u8>,
    /// KVM_MP_STATE_*: running, halted, waiting for INIT/SIPI.
    pub mp_state: u32,
    /// The guest's TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

fn blob<T: IntoBytes + Immutable>(v: &T) -> Vec<u8> {
    v.as_bytes().to_vec()
}

fn unblob<T: FromBytes>(index: u8, field: &'static str, bytes: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(bytes).map_err(|_| StateError::Size {
        index,
        field,
        got: bytes.len(),
        want: std::mem::size_of::<T>(),
    })
}

/// MSRs to save: those in KVM's list that a vCPU of this ferry can read, write back and
/// read back equal (time-driven ones, such as the TSC, may move on in between). Probed
/// once per process on a scratch VM, so that no running guest is touched.
pub fn saved_msrs(host: &HostKvm) -> &'static [u32] {
    static SAVED: OnceLock<Vec<u32>> = OnceLock::new();
    SAVED.get_or_init(|| match probe_msrs(host) {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!("cannot probe MSRs on a scratch vCPU ({e}); saving KVM's list as is");
            host.msrs.clone()
        }
    })
}

/// Reads `indices` from `fd`, dropping any that KVM refuses to read (`KVM_GET_MSRS`
/// stops at the first one it cannot read and returns how many it did).
fn readable(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, kvm_ioctls::Error> {
    let mut left: Vec<u32> = indices.to_vec();
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let entries: Vec<kvm_msr_entry> = left
            .iter()
            .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        // Fails only above KVM_MAX_MSR_ENTRIES, far more than KVM lists.
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let n = fd.get_msrs(&mut msrs)?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // When short, entry `n` is the one KVM could not read: skip it, go on after it.
        let skip = if n < entries.len() { n + 1 } else { n };
        left.drain(..skip);
    }
    Ok(out)
}

fn probe_msrs(host: &HostKvm) -> Result<Vec<u32>, kvm_ioctls::Error> {
    let vm = host.kvm.create_vm()?;
    vm.create_irq_chip()?;
    let fd = vm.create_vcpu(0)?;
    let mut entries = host.cpuid.as_slice().to_vec();
    crate::arch::cpuid::normalize(
        &mut entries,
        &crate::arch::cpuid::CpuidParams {
            index: 0,
            topology: crate::arch::cpuid::Topology {
                vcpus: 1,
                smt: false,
            },
            tsc_khz: None,
        },
    );
    let cpuid = CpuId::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
    fd.set_cpuid2(&cpuid)?;
    let read = readable(&fd, &host.msrs)?;
    let mut kept = Vec::with_capacity(read.len());
    for entry in read {
        let one = Msrs::from_entries(&[entry]).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        if fd.set_msrs(&one)? != 1 {
            tracing::debug!(
                "MSR {:#x} reads but does not write back; not saved",
                entry.index
            );
            continue;
        }
        kept.push(entry.index);
    }
    Ok(kept)
}

impl VcpuState {
    /// Reads the state of a vCPU that is not in `KVM_RUN`.
    pub fn save(index: u8, fd: &VcpuFd, msrs: &[u32]) -> Result<Self, StateError> {
        let kvm = |what| {
            move |source| StateError::Kvm {
                index,
                what,
                source,
            }
        };
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?.mp_state;
        let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = blob(&fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?);
        let xcrs = blob(&fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?);
        let debugregs = blob(&fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?);
        let lapic = blob(&fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?);
        let read = readable(fd, msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if read.len() != msrs.len() {
            return Err(StateError::Refused {
                index,
                field: "msrs".into(),
                reason: format!(
                    "{} of the {} MSRs ferry saves cannot be read",
                    msrs.len() - read.len(),
                    msrs.len()
                ),
            });
        }
        let vcpu_events = blob(&fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?);
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .iter()
            .map(|e| CpuidLeaf {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect();
        Ok(VcpuState {
            index,
            cpuid,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs: read
                .into_iter()
                .map(|e| Msr {
                    index: e.index,
                    data: e.data,
                })
                .collect(),
            vcpu_events,
            mp_state,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Checks every field that can be checked without KVM: lengths of KVM's structures,
    /// the CPUID size, MSR indices among those this ferry saves.
    pub fn check(&self, msrs: &[u32]) -> Result<(), StateError> {
        let index = self.index;
        unblob::<kvm_xsave>(index, "xsave", &self.xsave)?;
        unblob::<kvm_xcrs>(index, "xcrs", &self.xcrs)?;
        unblob::<kvm_debugregs>(index, "debugregs", &self.debugregs)?;
        unblob::<kvm_lapic_state>(index, "lapic", &self.lapic)?;
        unblob::<kvm_vcpu_events>(index, "vcpu_events", &self.vcpu_events)?;
        if self.cpuid.is_empty() || self.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
            return Err(StateError::Refused {
                index,
                field: "cpuid".into(),
                reason: format!(
                    "{} leaves; KVM takes 1 to {}",
                    self.cpuid.len(),
                    kvm_bindings::KVM_MAX_CPUID_ENTRIES
                ),
            });
        }
        if let Some(m) = self.msrs.iter().find(|m| !msrs.contains(&m.index)) {
            return Err(StateError::Refused {
                index,
                field: format!("msrs[{:#x}]", m.index),
                reason: "this host's KVM does not save and restore that MSR".into(),
            });
        }
        if self.mp_state > kvm_bindings::KVM_MP_STATE_SUSPENDED {
            return Err(StateError::Refused {
                index,
                field: "mp_state".into(),
                reason: format!("{} is no KVM_MP_STATE", self.mp_state),
            });
        }
        Ok(())
    }

    /// Writes the state into a fresh vCPU, in the order KVM needs: CPUID first (it
    /// decides which MSRs and XSAVE components exist), the TSC frequency before the
    /// TSC, the LAPIC before MSRs that refer to it, events last.
    pub fn restore(&self, fd: &VcpuFd, host: &HostKvm) -> Result<(), StateError> {
        let index = self.index;
        let kvm = |what| {
            move |source| StateError::Kvm {
                index,
                what,
                source,
            }
        };
        let entries: Vec<kvm_cpuid_entry2> = self
            .cpuid
            .iter()
            .map(|l| kvm_cpuid_entry2 {
                function: l.function,
                index: l.index,
                flags: l.flags,
                eax: l.eax,
                ebx: l.ebx,
                ecx: l.ecx,
                edx: l.edx,
                padding: [0; 3],
            })
            .collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|_| StateError::Refused {
            index,
            field: "cpuid".into(),
            reason: "too many leaves".into(),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            self.restore_tsc_khz(fd, host, khz);
        }
        fd.set_mp_state(kvm_mp_state {
            mp_state: self.mp_state,
        })
        .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(|e| StateError::Refused {
            index,
            field: "sregs".into(),
            reason: format!(
                "KVM_SET_SREGS: {e} (cr0 {:#x}, cr4 {:#x}, efer {:#x})",
                self.sregs.cr0, self.sregs.cr4, self.sregs.efer
            ),
        })?;
        let xsave: kvm_xsave = unblob(index, "xsave", &self.xsave)?;
        // SAFETY: `xsave` is a whole 4 KiB kvm_xsave, checked by `unblob`. KVM reads
        // only that much, as ferry never enables dynamic XSAVE features (AMX) for the
        // guest (no ARCH_REQ_XCOMP_GUEST_PERM), which would need KVM_SET_XSAVE2.
        unsafe { fd.set_xsave(&xsave) }.map_err(|e| StateError::Refused {
            index,
            field: "xsave".into(),
            reason: format!("KVM_SET_XSAVE: {e}"),
        })?;
        let xcrs: kvm_xcrs = unblob(index, "xcrs", &self.xcrs)?;
        fd.set_xcrs(&xcrs).map_err(|e| StateError::Refused {
            index,
            field: "xcrs".into(),
            reason: format!("KVM_SET_XCRS: {e}"),
        })?;
        let debugregs: kvm_debugregs = unblob(index, "debugregs", &self.debugregs)?;
        fd.set_debug_regs(&debugregs)
            .map_err(|e| StateError::Refused {
                index,
                field: "debugregs".into(),
                reason: format!("KVM_SET_DEBUGREGS: {e}"),
            })?;
        let lapic: kvm_lapic_state = unblob(index, "lapic", &self.lapic)?;
        fd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        // In KVM's order, in batches of the most one call takes.
        for batch in self.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|m| kvm_msr_entry {
                    index: m.index,
                    reserved: 0,
                    data: m.data,
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Refused {
                index,
                field: "msrs".into(),
                reason: "too many MSRs in one batch".into(),
            })?;
            let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
            if let Some(m) = batch.get(set) {
                return Err(StateError::Refused {
                    index,
                    field: format!("msrs[{:#x}]", m.index),
                    reason: format!("value {:#x}", m.data),
                });
            }
        }
        let events: kvm_vcpu_events = unblob(index, "vcpu_events", &self.vcpu_events)?;
        fd.set_vcpu_events(&events)
            .map_err(|e| StateError::Refused {
                index,
                field: "vcpu_events".into(),
                reason: format!("KVM_SET_VCPU_EVENTS: {e}"),
            })?;
        Ok(())
    }

    /// Gives the guest the TSC frequency it had, where KVM can scale it; otherwise the
    /// guest's clock runs at this host's rate, which is said once.
    fn restore_tsc_khz(&self, fd: &VcpuFd, host: &HostKvm, khz: u32) {
        let here = fd.get_tsc_khz().ok();
        if here == Some(khz) {
            return;
        }
        if !host.kvm.check_extension(Cap::TscControl) {
            tracing::warn!(
                vcpu = self.index,
                "the guest's TSC ran at {khz} kHz, this host's at {here:?} kHz, and KVM cannot scale it"
            );
            return;
        }
        if let Err(e) = fd.set_tsc_khz(khz) {
            tracing::warn!(vcpu = self.index, "cannot set the TSC to {khz} kHz: {e}");
        }
    }
}
