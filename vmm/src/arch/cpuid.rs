//! CPUID: what KVM supports, normalized for each vCPU so the guest sees a consistent
//! topology (APIC IDs, cores, threads) and knows it runs under a hypervisor.

use kvm_bindings::kvm_cpuid_entry2;

/// The topology ferry presents.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    /// Total vCPUs.
    pub vcpus: u8,
    /// Two threads per core when set.
    pub smt: bool,
}

/// What the per-vCPU fixups need to know.
#[derive(Clone, Copy, Debug)]
pub struct CpuidParams {
    /// This vCPU's index, which is also its APIC ID.
    pub index: u8,
    /// Machine topology.
    pub topology: Topology,
    /// TSC frequency in kHz for the hypervisor timing leaf, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Topology level types in leaves 0xb and 0x1f.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

fn ceil_log2(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for one vCPU.
pub fn normalize(entries: &mut Vec<kvm_cpuid_entry2>, p: &CpuidParams) {
    let threads = if p.topology.smt { 2u32 } else { 1 };
    let vcpus = u32::from(p.topology.vcpus);
    let apic_id = u32::from(p.index);
    let thread_shift = ceil_log2(threads);
    let core_shift = ceil_log2(vcpus);

    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (apic_id << 24) | (vcpus.min(255) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing - 1.
                let cores = vcpus.div_ceil(threads);
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { vcpus } else { threads };
                e.eax = (e.eax & 0x3ff) | ((sharing - 1) << 14) | ((cores - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = thread_shift;
                        e.ebx = threads;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_shift.max(thread_shift);
                        e.ebx = vcpus;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_HYPERVISOR if p.tsc_khz.is_some() => {
                e.eax = e.eax.max(LEAF_HYPERVISOR_TIMING);
            }
            _ => {}
        }
    }

    if let Some(khz) = p.tsc_khz {
        entries.retain(|e| e.function != LEAF_HYPERVISOR_TIMING);
        // EAX: TSC kHz; EBX: local APIC timer frequency in kHz (KVM's is 1 GHz).
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR_TIMING,
            eax: khz,
            ebx: 1_000_000,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn params(index: u8, vcpus: u8, smt: bool) -> CpuidParams {
        CpuidParams {
            index,
            topology: Topology { vcpus, smt },
            tsc_khz: Some(2_000_000),
        }
    }

    #[test]
    fn test_leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = vec![leaf(1, 0)];
        normalize(&mut e, &params(3, 4, false));
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn test_topology_leaf_describes_all_vcpus() {
        let mut e = vec![leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2)];
        normalize(&mut e, &params(5, 6, true));
        assert_eq!((e[0].eax, e[0].ebx, e[0].ecx >> 8), (1, 2, LEVEL_SMT));
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx >> 8), (3, 6, LEVEL_CORE));
        assert_eq!(e[2].ecx >> 8, 0, "levels past the core level are invalid");
        assert!(e.iter().filter(|l| l.function == 0xb).all(|l| l.edx == 5));
    }

    #[test]
    fn test_timing_leaf_added_once_with_tsc_khz() {
        let mut e = vec![leaf(LEAF_HYPERVISOR, 0), leaf(LEAF_HYPERVISOR_TIMING, 0)];
        normalize(&mut e, &params(0, 1, false));
        let timing: Vec<_> = e
            .iter()
            .filter(|l| l.function == LEAF_HYPERVISOR_TIMING)
            .collect();
        assert_eq!(timing.len(), 1);
        assert_eq!(timing[0].eax, 2_000_000);
        assert_eq!(e[0].eax, LEAF_HYPERVISOR_TIMING);
    }
}
