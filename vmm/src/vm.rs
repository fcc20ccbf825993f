//! The KVM VM: capabilities, memory slots, the in-kernel irqchip and PIT.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use zerocopy::{FromBytes, IntoBytes};

use memory::dirty::{
    BenchTracker, DirtyError, DirtyTracker, KvmDirtyLog, TrackingMode, UffdAsync, UffdSync,
};
use memory::GuestRam;

/// Why the VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The host KVM lacks something ferry needs.
    #[error("this host's KVM lacks {0}, which ferry needs")]
    MissingCap(&'static str),
    /// The host KVM runs fewer vCPUs than asked.
    #[error("this host's KVM runs at most {max} vCPUs per VM, {wanted} were asked for")]
    TooManyVcpus {
        /// KVM's limit.
        max: usize,
        /// The request.
        wanted: u8,
    },
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM's bookkeeping for this much guest RAM would take too much of the host.
    #[error("memory size {size_mib} MiB is too large for this host: KVM would need {} MiB of kernel memory to track it, more than half of the host's {host_mib} MiB", size_mib / 512)]
    MemoryTooLarge {
        /// Requested size.
        size_mib: u64,
        /// The host's memory.
        host_mib: u64,
    },
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Ram(#[from] memory::RamError),
    /// Saved VM state that KVM cannot take.
    #[error("VM state field {field}: {reason}")]
    State {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Where KVM puts the TSS it needs for real-mode emulation: three pages just below the
/// BIOS area, inside the MMIO hole, never RAM.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Capabilities ferry relies on, each probed before use.
const REQUIRED_CAPS: [(Cap, &str); 9] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// What ferry learned from the host's KVM, once.
pub struct HostKvm {
    /// The /dev/kvm handle.
    pub kvm: Kvm,
    /// `KVM_GET_SUPPORTED_CPUID`.
    pub cpuid: CpuId,
    /// MSRs KVM can save and restore.
    pub msrs: Vec<u32>,
    /// Guest-physical address width.
    pub phys_bits: u8,
}

impl HostKvm {
    /// Opens /dev/kvm and checks every capability ferry uses.
    pub fn open() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msrs = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        // CPUID 0x80000008 EAX[7:0] is the physical address width; 36 bits is the
        // architectural minimum when the leaf is absent.
        let phys_bits = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .and_then(|e| u8::try_from(e.eax & 0xff).ok())
            .unwrap_or(36);
        Ok(HostKvm {
            kvm,
            cpuid,
            msrs,
            phys_bits,
        })
    }

    /// Checks, before anything is allocated, that guest RAM of `mem_size_mib` can be
    /// given to a VM on this host: the guest-physical address width holds it, the
    /// address space has room to map it, and KVM's bookkeeping for it (about 8 bytes
    /// per 4 KiB page, in the kernel, with shadow paging as here) fits in half of the
    /// host's memory. Measured here: 4 TiB takes 3.6 s to register with KVM, and 7.6
    /// TiB had not finished after 60 s; such a start would hold the VMM thread.
    pub fn check_memory(&self, mem_size_mib: u64) -> Result<(), VmError> {
        let too_large = || {
            VmError::Ram(memory::RamError::TooLarge {
                size_mib: mem_size_mib,
                phys_bits: self.phys_bits,
            })
        };
        let size = mem_size_mib
            .checked_mul(memory::layout::MIB)
            .ok_or_else(too_large)?;
        if memory::layout::ram_end(size) > 1u64 << self.phys_bits.min(63) {
            return Err(too_large());
        }
        memory::check_mappable(mem_size_mib).map_err(VmError::Ram)?;
        let host_bytes = host_memory_bytes();
        if size / 512 > host_bytes / 2 {
            return Err(VmError::MemoryTooLarge {
                size_mib: mem_size_mib,
                host_mib: host_bytes / memory::layout::MIB,
            });
        }
        Ok(())
    }

    /// Checks that KVM runs `vcpus` vCPUs in one VM.
    pub fn check_vcpus(&self, vcpus: u8) -> Result<(), VmError> {
        let max = self.kvm.get_max_vcpus();
        if usize::from(vcpus) > max {
            return Err(VmError::TooManyVcpus { max, wanted: vcpus });
        }
        Ok(())
    }
}

/// The host's KVM, opened once per process: its CPUID and MSR lists do not change.
pub fn host() -> Result<&'static HostKvm, VmError> {
    static HOST: std::sync::OnceLock<HostKvm> = std::sync::OnceLock::new();
    if let Some(host) = HOST.get() {
        return Ok(host);
    }
    let opened = HostKvm::open()?;
    Ok(HOST.get_or_init(|| opened))
}

/// The host's physical memory, from `/proc/meminfo` (`u64::MAX` if unreadable, so that
/// nothing is refused on a guess).
fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(u64::MAX)
}

/// The VM-wide state KVM holds: both PICs, the IOAPIC, the PIT and the KVM clock.
/// The interrupt controllers and the PIT are their exact KVM structures, checked for
/// length (and chip) before they reach KVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmVmState {
    /// `kvm_irqchip` of the master PIC.
    pub pic_master: Vec<u8>,
    /// `kvm_irqchip` of the slave PIC.
    pub pic_slave: Vec<u8>,
    /// `kvm_irqchip` of the IOAPIC.
    pub ioapic: Vec<u8>,
    /// `kvm_pit_state2`.
    pub pit: Vec<u8>,
    /// The KVM clock, in ns.
    pub clock_ns: u64,
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "pic_master"),
    (KVM_IRQCHIP_PIC_SLAVE, "pic_slave"),
    (KVM_IRQCHIP_IOAPIC, "ioapic"),
];

fn state_err(field: &'static str, reason: impl Into<String>) -> VmError {
    VmError::State {
        field,
        reason: reason.into(),
    }
}

fn unblob<T: FromBytes>(field: &'static str, bytes: &[u8]) -> Result<T, VmError> {
    T::read_from_bytes(bytes).map_err(|_| {
        state_err(
            field,
            format!(
                "{} bytes, KVM's structure is {}",
                bytes.len(),
                std::mem::size_of::<T>()
            ),
        )
    })
}

impl KvmVmState {
    fn chips(&self) -> [&Vec<u8>; 3] {
        [&self.pic_master, &self.pic_slave, &self.ioapic]
    }

    /// Checks each structure's length and chip, without KVM.
    pub fn check(&self) -> Result<(), VmError> {
        for ((id, field), bytes) in CHIPS.iter().zip(self.chips()) {
            let chip: kvm_irqchip = unblob(field, bytes)?;
            if chip.chip_id != *id {
                return Err(state_err(
                    field,
                    format!("holds chip {}, not chip {id}", chip.chip_id),
                ));
            }
        }
        unblob::<kvm_pit_state2>("pit", &self.pit)?;
        Ok(())
    }
}

/// A KVM VM with its RAM registered and its interrupt controllers created.
pub struct Vm {
    fd: Arc<VmFd>,
    ram: GuestRam,
}

impl Vm {
    /// Creates the VM and gives it `ram`.
    pub fn new(host: &HostKvm, ram: GuestRam) -> Result<Self, VmError> {
        let fd = host.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        for (slot, r) in (0u32..).zip(ram.regions()) {
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: r.guest_addr.0,
                memory_size: r.size,
                userspace_addr: r.host_addr,
            };
            // SAFETY: the region describes a live shared mapping owned by `ram`, which
            // this `Vm` keeps for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Vm {
            fd: Arc::new(fd),
            ram,
        })
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Reads the interrupt controllers, the PIT and the clock. The vCPUs must be parked.
    pub fn save_state(&self) -> Result<KvmVmState, VmError> {
        let mut chips = Vec::with_capacity(CHIPS.len());
        for (id, _) in CHIPS {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            chips.push(chip.as_bytes().to_vec());
        }
        let pit = self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
        let clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        let [pic_master, pic_slave, ioapic]: [Vec<u8>; 3] = chips
            .try_into()
            .map_err(|_| state_err("irqchip", "three chips were not read"))?;
        Ok(KvmVmState {
            pic_master,
            pic_slave,
            ioapic,
            pit: pit.as_bytes().to_vec(),
            clock_ns: clock.clock,
        })
    }

    /// Writes saved VM-wide state into this (fresh) VM. Each structure is checked first.
    pub fn restore_state(&self, state: &KvmVmState) -> Result<(), VmError> {
        state.check()?;
        for ((_, field), bytes) in CHIPS.iter().zip(state.chips()) {
            let chip: kvm_irqchip = unblob(field, bytes)?;
            self.fd
                .set_irqchip(&chip)
                .map_err(|e| state_err(field, format!("KVM_SET_IRQCHIP: {e}")))?;
        }
        let pit: kvm_pit_state2 = unblob("pit", &state.pit)?;
        self.fd
            .set_pit2(&pit)
            .map_err(|e| state_err("pit", format!("KVM_SET_PIT2: {e}")))?;
        // No flags: the clock continues from where it was saved, as Firecracker's does,
        // rather than jumping by the wall-clock time the snapshot sat on disk.
        let clock = kvm_clock_data {
            clock: state.clock_ns,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(|e| state_err("clock_ns", format!("KVM_SET_CLOCK: {e}")))?;
        Ok(())
    }

    /// A dirty-page tracker of the chosen kind over guest RAM, not yet started.
    pub fn dirty_tracker(&self, mode: TrackingMode) -> Result<Box<dyn DirtyTracker>, DirtyError> {
        let tracker: Box<dyn DirtyTracker> = self.bench_tracker(mode)?;
        Ok(tracker)
    }

    /// For benchmarks only: a tracker that can also run its bare mechanism.
    pub fn bench_tracker(&self, mode: TrackingMode) -> Result<Box<dyn BenchTracker>, DirtyError> {
        Ok(match mode {
            TrackingMode::UffdAsync => Box::new(UffdAsync::new(self.ram.tracked())?),
            TrackingMode::UffdAsyncHot => {
                Box::new(UffdAsync::new(self.ram.tracked())?.retain_hot(true))
            }
            TrackingMode::UffdSync => Box::new(UffdSync::new(self.ram.tracked())),
            TrackingMode::KvmDirtyLog => {
                Box::new(KvmDirtyLog::new(self.ram.tracked(), self.fd.clone()))
            }
            TrackingMode::KvmDirtyLogHot => {
                Box::new(KvmDirtyLog::new(self.ram.tracked(), self.fd.clone()).retain_hot(true))
            }
        })
    }
}
