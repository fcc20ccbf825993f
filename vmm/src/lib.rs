//! ferry's VMM: one KVM microVM per process. `builder` turns a configuration into a
//! running `Vmm`; `Vmm` owns the VM, its vCPU threads and its devices, and moves through
//! the lifecycle states; the `ferry` binary drives it from a config file.

pub mod arch;
pub mod builder;
pub mod controller;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{Serial, I8042};
use vmm_sys_util::eventfd::EventFd;

pub use builder::{build, BuildError};
pub use controller::{run_until_exit, Controller};
use vcpu::{VcpuCommand, VcpuError, VcpuEvent, VcpuHandle};

/// Where the VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Built, vCPUs not yet running.
    NotStarted,
    /// vCPUs run the guest.
    Running,
    /// vCPUs are parked outside `KVM_RUN`.
    Paused,
    /// The VM has ended.
    Stopped,
}

impl VmState {
    fn valid_transition(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (NotStarted, Running) | (Running, Paused) | (Paused, Running) | (_, Stopped)
        )
    }
}

/// A lifecycle request that the current state does not allow, or that failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The request makes no sense in this state.
    #[error("cannot go from {from:?} to {to:?}")]
    InvalidTransition {
        /// Current state.
        from: VmState,
        /// Requested state.
        to: VmState,
    },
    /// A vCPU did not follow.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Saving or rebuilding devices failed.
    #[error(transparent)]
    Devices(#[from] virtio::VirtioError),
}

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest rebooted (i8042 reset, Ctrl-Alt-Del, KVM reset event) or powered off.
    GuestStop,
    /// ferry was asked to stop (SIGINT, SIGTERM).
    Requested,
    /// The guest failed; the message names the vCPU, the exit and RIP.
    GuestFailed(String),
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::GuestStop | ExitReason::Requested => 0,
            ExitReason::GuestFailed(_) => 1,
        }
    }
}

/// The legacy devices the VMM talks to directly.
pub struct Devices {
    /// COM1.
    pub serial: Arc<Mutex<Serial>>,
    /// Bytes the guest wrote to COM1.
    pub serial_bytes: Arc<AtomicU64>,
    /// The keyboard controller.
    pub i8042: Arc<Mutex<I8042>>,
    /// Written by the i8042 when the guest resets the CPU.
    pub reset_evt: EventFd,
    /// Drives and network interfaces.
    pub virtio: virtio::VirtioDevices,
}

/// One microVM.
pub struct Vmm {
    vm: vm::Vm,
    vcpus: Vec<VcpuHandle>,
    pending: Vec<vcpu::Vcpu>,
    devices: Devices,
    vcpu_events: Receiver<(u8, VcpuEvent)>,
    vcpu_event_fd: EventFd,
    state: VmState,
    vcpu_metrics: Arc<vcpu::VcpuMetrics>,
    paused_since: Option<Instant>,
    paused_total: Duration,
}

impl Vmm {
    /// The current state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Guest RAM.
    pub fn ram(&self) -> &memory::GuestRam {
        self.vm.ram()
    }

    /// A dirty-page tracker of the chosen kind over guest RAM, not yet started.
    pub fn dirty_tracker(
        &self,
        mode: memory::dirty::TrackingMode,
    ) -> Result<Box<dyn memory::dirty::DirtyTracker>, memory::dirty::DirtyError> {
        self.vm.dirty_tracker(mode)
    }

    /// For benchmarks only: a tracker that can also run its bare mechanism
    /// (`floor_collect`), which throws dirty state away.
    pub fn bench_tracker(
        &self,
        mode: memory::dirty::TrackingMode,
    ) -> Result<Box<dyn memory::dirty::BenchTracker>, memory::dirty::DirtyError> {
        self.vm.bench_tracker(mode)
    }

    /// The devices.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    fn transition(&mut self, to: VmState) -> Result<(), LifecycleError> {
        if !self.state.valid_transition(to) {
            return Err(LifecycleError::InvalidTransition {
                from: self.state,
                to,
            });
        }
        Ok(())
    }

    /// Starts every vCPU thread.
    pub fn start(&mut self) -> Result<(), LifecycleError> {
        self.transition(VmState::Running)?;
        for vcpu in self.pending.drain(..) {
            self.vcpus.push(vcpu.start()?);
        }
        self.state = VmState::Running;
        Ok(())
    }

    fn command_all(&mut self, cmd: VcpuCommand) -> Result<(), VcpuError> {
        for v in &self.vcpus {
            v.send(cmd)?;
        }
        for v in &self.vcpus {
            v.wait_ack(cmd)?;
        }
        Ok(())
    }

    /// Kicks every vCPU out of `KVM_RUN` and parks it; returns once all are parked.
    pub fn pause(&mut self) -> Result<(), LifecycleError> {
        self.transition(VmState::Paused)?;
        self.command_all(VcpuCommand::Pause)?;
        // After the vCPUs: a request the guest queued before stopping is held, not lost.
        self.devices.virtio.pause();
        self.state = VmState::Paused;
        self.paused_since = Some(Instant::now());
        Ok(())
    }

    /// Lets every vCPU continue where it stopped.
    pub fn resume(&mut self) -> Result<(), LifecycleError> {
        if self.state != VmState::Paused {
            return Err(LifecycleError::InvalidTransition {
                from: self.state,
                to: VmState::Running,
            });
        }
        // Devices first, so the guest finds them taking requests again.
        self.devices.virtio.resume();
        self.command_all(VcpuCommand::Resume)?;
        self.state = VmState::Running;
        if let Some(since) = self.paused_since.take() {
            self.paused_total += since.elapsed();
        }
        Ok(())
    }

    /// Ends every vCPU thread. Guest memory is freed when the `Vmm` is dropped.
    pub fn stop(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
        self.vcpus.clear();
        self.pending.clear();
        self.state = VmState::Stopped;
    }

    /// Every virtio device's state, as JSON. The VM must be paused, so that the state is
    /// final.
    pub fn save_devices(&self) -> Result<serde_json::Value, LifecycleError> {
        self.require_paused()?;
        serde_json::to_value(self.devices.virtio.save())
            .map_err(|e| virtio::VirtioError::State(e.to_string()).into())
    }

    /// Replaces every virtio device with one built from `saved` (as `save_devices`
    /// returned it), on the same guest memory. The VM must be paused; the new devices
    /// take requests from `resume` on.
    pub fn restore_devices(&mut self, saved: serde_json::Value) -> Result<(), LifecycleError> {
        self.require_paused()?;
        let saved: Vec<virtio::SavedDevice> =
            serde_json::from_value(saved).map_err(|e| virtio::VirtioError::State(e.to_string()))?;
        self.devices
            .virtio
            .restore(&saved, self.vm.ram().memory())?;
        Ok(())
    }

    fn require_paused(&self) -> Result<(), LifecycleError> {
        if self.state != VmState::Paused {
            return Err(LifecycleError::InvalidTransition {
                from: self.state,
                to: VmState::Paused,
            });
        }
        Ok(())
    }

    /// The VM's metrics: vCPU exits by reason, time spent paused, serial bytes.
    pub fn metrics(&self) -> serde_json::Value {
        let paused = self.paused_total + self.paused_since.map_or(Duration::ZERO, |s| s.elapsed());
        serde_json::json!({
            "vcpu": self.vcpu_metrics.json(),
            "vmm": { "paused_us": u64::try_from(paused.as_micros()).unwrap_or(u64::MAX) },
            "uart": { "write_bytes": self.devices.serial_bytes.load(Ordering::Relaxed) },
            "virtio": self.devices.virtio.metrics(),
        })
    }

    /// The fds that become readable when the guest stops: vCPU events and the i8042
    /// reset line.
    pub fn exit_fds(&self) -> [std::os::fd::RawFd; 2] {
        use std::os::fd::AsRawFd;
        [
            self.vcpu_event_fd.as_raw_fd(),
            self.devices.reset_evt.as_raw_fd(),
        ]
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard controller.
    pub fn send_ctrl_alt_del(&self) -> std::io::Result<()> {
        self.devices
            .i8042
            .lock()
            .expect("poisoned")
            .send_ctrl_alt_del()
    }

    /// Collects why the guest stopped, if it did: a reset through the i8042, or an
    /// event from a vCPU. Failures win over clean stops.
    pub fn guest_exit(&self) -> Option<ExitReason> {
        let _ = self.vcpu_event_fd.read();
        let mut reason = None;
        if self.devices.reset_evt.read().is_ok() {
            reason = Some(ExitReason::GuestStop);
        }
        for (_, event) in self.vcpu_events.try_iter() {
            match event {
                VcpuEvent::Failed(msg) => return Some(ExitReason::GuestFailed(msg)),
                VcpuEvent::Reset | VcpuEvent::PowerOff => reason = Some(ExitReason::GuestStop),
            }
        }
        reason
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}
