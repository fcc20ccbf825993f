//! Turns a configuration into a `Vmm` ready to start: guest RAM, the kernel and its boot
//! structures, the KVM VM, the legacy devices and the vCPUs.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use api::VmConfig;
use devices::legacy::{Console, IrqLine, Serial, CONSOLE_BUFFER, I8042};
use devices::{MmioBus, PioBus};
use kvm_bindings::CpuId;
use kvm_ioctls::{Cap, VcpuFd};
use memory::GuestRam;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::cpuid::{self, CpuidParams, Topology};
use crate::arch::{boot, mptable, regs};
use crate::snapshot::{MachineState, MemoryBackend};
use crate::vcpu::state::saved_msrs;
use crate::vcpu::{self, Vcpu, VcpuError, VcpuMetrics};
use crate::virtio::{self, VirtioDevices, VirtioError};
use crate::vm::{HostKvm, Vm, VmError};
use crate::{Devices, VmState, Vmm};

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// KVM or guest RAM setup failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the kernel or writing boot structures failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Setting vCPU registers failed.
    #[error("vCPU {index}: {source}")]
    Regs {
        /// vCPU index.
        index: u8,
        /// The error.
        #[source]
        source: regs::RegsError,
    },
    /// A vCPU could not be created.
    #[error("cannot create vCPU {index}: {source}")]
    CreateVcpu {
        /// vCPU index.
        index: u8,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Setting up vCPU control failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A virtio device could not be set up.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// Saved state does not fit.
    #[error("saved state: {0}")]
    State(String),
    /// A vCPU's saved state does not fit.
    #[error(transparent)]
    VcpuState(#[from] crate::vcpu::state::StateError),
    /// A device could not be set up.
    #[error("cannot set up {what}: {reason}")]
    Device {
        /// Which device.
        what: &'static str,
        /// The error.
        reason: String,
    },
}

fn device_err(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> BuildError {
    move |e| BuildError::Device {
        what,
        reason: e.to_string(),
    }
}

/// The UART's interrupt line.
const SERIAL_IRQ: u32 = 4;
/// The keyboard's interrupt line.
const KEYBOARD_IRQ: u32 = 1;
const COM1_PORT: u16 = 0x3f8;
const I8042_PORT: u16 = 0x60;

/// Builds a VM from `config`, which must already be validated. Nothing runs until
/// `Vmm::start`.
pub fn build(config: &VmConfig) -> Result<Vmm, BuildError> {
    let machine = &config.machine_config;
    // Validation bounds vcpu_count to 1..=32.
    let vcpu_count = u8::try_from(machine.vcpu_count).unwrap_or(u8::MAX);

    let host = crate::vm::host()?;
    host.check_vcpus(vcpu_count)?;
    host.check_memory(machine.mem_size_mib)?;
    let ram = GuestRam::new(machine.mem_size_mib, host.phys_bits).map_err(VmError::from)?;

    // Open drives and taps, and load the guest, before creating the VM: bad paths fail
    // fast.
    let opened = virtio::open(config)?;
    let kernel = boot::load_kernel(ram.memory(), &config.boot_source.kernel_image_path)?;
    let initrd = match &config.boot_source.initrd_path {
        Some(path) => Some(boot::load_initrd(&ram, &kernel, path)?),
        None => None,
    };
    let cmdline = format!(
        "{}{}",
        config.boot_source.boot_args(),
        virtio::cmdline_args(config)
    );
    boot::write_boot_params(&ram, &kernel, initrd.as_ref(), &cmdline)?;
    mptable::write(ram.memory(), vcpu_count)?;
    regs::write_boot_tables(ram.memory())
        .map_err(|source| BuildError::Regs { index: 0, source })?;

    let vm = Vm::new(host, ram)?;
    let mut vmm = assemble(
        host,
        config,
        vm,
        opened,
        Origin::Boot {
            entry: kernel.entry,
        },
    )?;
    if machine.track_dirty_pages {
        vmm.track_for_snapshots(machine.dirty_tracking.as_deref())
            .map_err(|e| BuildError::State(e.to_string()))?;
    }
    Ok(vmm)
}

/// Where a VM's state comes from.
#[derive(Clone, Copy)]
enum Origin<'a> {
    /// A fresh boot: the boot vCPU starts at the kernel's entry point.
    Boot { entry: GuestAddress },
    /// A snapshot or migration: every component takes its saved state.
    Saved(&'a MachineState),
}

/// Builds a VM from a snapshot's state on guest RAM that already holds (or will be
/// served) the snapshot's memory: every component is built from its saved state, in one
/// step, and each is checked as it is. The VM comes back paused, with its vCPU threads
/// parked; nothing is left behind if any part fails. `config` is the configuration to
/// use, with the loading side's backends (drive paths, taps).
pub fn restore(
    config: &VmConfig,
    state: &MachineState,
    ram: GuestRam,
    backend: Option<MemoryBackend>,
) -> Result<Vmm, BuildError> {
    let host = crate::vm::host()?;
    restore_on(Vm::new(host, ram)?, config, state, backend)
}

/// As `restore`, on a VM already created with its guest RAM (a migration creates it
/// before the switch-over: registering guest RAM with KVM takes about 1 ms per GiB
/// here, which the paused guest need not wait for).
pub fn restore_on(
    vm: Vm,
    config: &VmConfig,
    state: &MachineState,
    backend: Option<MemoryBackend>,
) -> Result<Vmm, BuildError> {
    let host = crate::vm::host()?;
    let vcpu_count = u8::try_from(state.vcpus.len()).unwrap_or(u8::MAX);
    host.check_vcpus(vcpu_count)?;
    let msrs = saved_msrs(host);
    for vcpu in &state.vcpus {
        vcpu.check(msrs)?;
    }
    state.vm.check()?;
    let opened = virtio::open(config)?;
    vm.restore_state(&state.vm)?;
    let mut vmm = assemble(host, config, vm, opened, Origin::Saved(state))?;
    vmm.backend = backend;
    vmm.devices.virtio.pause();
    for vcpu in vmm.pending.drain(..) {
        vmm.vcpus.push(vcpu.start(true)?);
    }
    vmm.state = VmState::Paused;
    vmm.paused_since = Some(std::time::Instant::now());
    Ok(vmm)
}

/// The devices and vCPUs of a VM, from boot or from saved state.
fn assemble(
    host: &HostKvm,
    config: &VmConfig,
    vm: Vm,
    opened: Vec<virtio::Opened>,
    origin: Origin,
) -> Result<Vmm, BuildError> {
    let machine = &config.machine_config;
    let saved = match origin {
        Origin::Saved(state) => Some(state),
        Origin::Boot { .. } => None,
    };

    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| device_err("the serial IRQ")(&e))?;
    vm.fd()
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| device_err("the serial IRQ")(&e))?;
    let sink: Box<dyn Write + Send> = match config
        .serial
        .as_ref()
        .and_then(|s| s.serial_out_path.as_ref())
    {
        Some(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    device_err("the serial output file")(&format!("{}: {e}", path.display()))
                })?,
        ),
        // A file on a duplicate of fd 1, not `std::io::stdout()`: its line buffer would
        // hold partial lines back, and its lock is shared with the rest of the process.
        None => Box::new(File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| device_err("the console")(&e))?,
        )),
    };
    let console =
        Console::spawn(sink, CONSOLE_BUFFER).map_err(|e| device_err("the console")(&e))?;
    let serial = match saved {
        Some(state) => Serial::from_state(&state.serial, IrqLine(serial_irq), console.output())
            .map_err(|e| BuildError::State(format!("serial: {e}")))?,
        None => Serial::new(IrqLine(serial_irq), console.output()),
    };
    let serial = Arc::new(Mutex::new(serial));

    let kbd_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| device_err("the keyboard IRQ")(&e))?;
    vm.fd()
        .register_irqfd(&kbd_irq, KEYBOARD_IRQ)
        .map_err(|e| device_err("the keyboard IRQ")(&e))?;
    let reset_evt =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| device_err("the reset event")(&e))?;
    let reset_clone = reset_evt
        .try_clone()
        .map_err(|e| device_err("the reset event")(&e))?;
    let mut i8042 = I8042::new(reset_clone, IrqLine(kbd_irq));
    if let Some(state) = saved {
        i8042
            .restore(&state.i8042)
            .map_err(|e| BuildError::State(format!("i8042: {e}")))?;
    }
    let i8042 = Arc::new(Mutex::new(i8042));

    let mut bus = PioBus::new();
    bus.insert(COM1_PORT, 8, serial.clone())
        .map_err(|e| device_err("COM1")(&e))?;
    bus.insert(I8042_PORT, 5, i8042.clone())
        .map_err(|e| device_err("the i8042")(&e))?;
    let bus = Arc::new(bus);
    let mut mmio_bus = MmioBus::new();
    let virtio_devices = VirtioDevices::attach(
        vm.fd(),
        vm.ram().memory(),
        opened,
        saved.map(|s| s.virtio.as_slice()),
        &mut mmio_bus,
    )?;
    let mmio_bus = Arc::new(mmio_bus);

    vcpu::register_kick_handler()?;
    let (event_tx, event_rx) = mpsc::channel();
    let vcpu_event_fd =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| device_err("the vCPU event fd")(&e))?;
    let boot_msrs = regs::boot_msrs(&host.msrs);
    let vcpu_metrics = Arc::new(VcpuMetrics::default());
    let vcpu_count = match saved {
        Some(state) => u8::try_from(state.vcpus.len()).unwrap_or(u8::MAX),
        // Validation bounds vcpu_count to 1..=32.
        None => u8::try_from(machine.vcpu_count).unwrap_or(u8::MAX),
    };
    let topology = Topology {
        vcpus: vcpu_count,
        smt: machine.smt,
    };
    let freeze = Arc::new(vcpu::Freeze::default());
    let shared = vcpu::Shared {
        bus,
        mmio: mmio_bus,
        metrics: vcpu_metrics.clone(),
        freeze: freeze.clone(),
        events: event_tx,
    };
    let mut pending = Vec::with_capacity(usize::from(vcpu_count));
    for index in 0..vcpu_count {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| BuildError::CreateVcpu { index, source })?;
        if let Some(state) = saved {
            let vcpu_state = state
                .vcpus
                .get(usize::from(index))
                .filter(|v| v.index == index)
                .ok_or_else(|| BuildError::State(format!("no state for vCPU {index}")))?;
            vcpu_state.restore(&fd, host)?;
        } else {
            boot_vcpu(host, &fd, index, topology, &boot_msrs, &origin)?;
        }
        let event_fd = vcpu_event_fd
            .try_clone()
            .map_err(|e| device_err("the vCPU event fd")(&e))?;
        pending.push(Vcpu::new(index, fd, shared.clone(), event_fd));
    }

    Ok(Vmm {
        vm,
        vcpus: Vec::new(),
        pending,
        devices: Devices {
            serial,
            console,
            i8042,
            reset_evt,
            virtio: virtio_devices,
        },
        vcpu_metrics,
        freeze,
        paused_since: None,
        paused_total: Duration::ZERO,
        vcpu_events: event_rx,
        vcpu_event_fd,
        state: VmState::NotStarted,
        backend: None,
        dirty: None,
        unsaved: None,
        needs_full: false,
    })
}

/// Sets up a vCPU for a fresh boot: CPUID, MSRs, FPU, LAPIC, and for the boot vCPU the
/// registers that enter the kernel.
fn boot_vcpu(
    host: &HostKvm,
    fd: &VcpuFd,
    index: u8,
    topology: Topology,
    boot_msrs: &[kvm_bindings::kvm_msr_entry],
    origin: &Origin,
) -> Result<(), BuildError> {
    let regs_err = |source| BuildError::Regs { index, source };
    let tsc_khz = if host.kvm.check_extension(Cap::GetTscKhz) {
        fd.get_tsc_khz().ok()
    } else {
        None
    };
    let mut entries = host.cpuid.as_slice().to_vec();
    cpuid::normalize(
        &mut entries,
        &CpuidParams {
            index,
            topology,
            tsc_khz,
        },
    );
    let cpuid = CpuId::from_entries(&entries).map_err(|_| BuildError::Device {
        what: "CPUID",
        reason: format!("{} entries are more than KVM takes", entries.len()),
    })?;
    fd.set_cpuid2(&cpuid).map_err(|source| {
        regs_err(regs::RegsError::Kvm {
            what: "KVM_SET_CPUID2",
            source,
        })
    })?;
    regs::setup_msrs(fd, boot_msrs).map_err(regs_err)?;
    regs::setup_fpu(fd).map_err(regs_err)?;
    regs::setup_lapic(fd).map_err(regs_err)?;
    if let (0, Origin::Boot { entry }) = (index, origin) {
        regs::setup_boot_vcpu(fd, *entry).map_err(regs_err)?;
    }
    Ok(())
}
