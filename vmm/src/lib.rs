//! ferry's VMM: one KVM microVM per process. `builder` turns a configuration into a
//! running `Vmm`; `Vmm` owns the VM, its vCPU threads and its devices, and moves through
//! the lifecycle states; the `ferry` binary drives it from a config file.

pub mod arch;
pub mod builder;
pub mod controller;
pub mod metrics;
pub mod migration;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{Console, Serial, I8042};
use vmm_sys_util::eventfd::EventFd;

pub use builder::{build, BuildError};
pub use controller::{run_until_exit, Controller};
pub use metrics::Startup;
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
    /// A vCPU did not park, so the pause was undone: every vCPU runs again.
    #[error("cannot pause: {0}; the VM was resumed and keeps running")]
    PauseFailed(#[source] VcpuError),
    /// The vCPUs are frozen (a failed post-copy): whoever froze them must thaw them.
    #[error("cannot resume: the vCPUs are frozen (a post-copy into this ferry failed)")]
    Frozen,
    /// A vCPU did not continue, so the resume was undone: every vCPU is parked again.
    #[error("cannot resume: {0}; the VM stays paused")]
    ResumeFailed(#[source] VcpuError),
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
    /// The guest moved to another ferry, which runs it now.
    Migrated,
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::GuestStop | ExitReason::Requested | ExitReason::Migrated => 0,
            ExitReason::GuestFailed(_) => 1,
        }
    }
}

/// The legacy devices the VMM talks to directly.
pub struct Devices {
    /// COM1.
    pub serial: Arc<Mutex<Serial>>,
    /// Where COM1's output goes, without ever blocking the guest.
    pub console: Console,
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
    /// Keeps the vCPUs out of the guest from another thread.
    freeze: Arc<vcpu::Freeze>,
    paused_since: Option<Instant>,
    paused_total: Duration,
    /// What serves guest RAM for a VM loaded from a snapshot: kept for as long as the
    /// VM lives.
    backend: Option<snapshot::MemoryBackend>,
    /// Tracks pages written since the last snapshot, when `track_dirty_pages` is on.
    dirty: Option<Box<dyn memory::dirty::DirtyTracker>>,
    /// Pages a failed snapshot did not save, for the next Diff.
    unsaved: Option<memory::dirty::DirtyBitmap>,
    /// A dirty collect failed: Diffs are refused until a Full snapshot succeeds.
    needs_full: bool,
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

    /// What keeps this VM's vCPUs out of the guest from any thread (`Freeze::freeze`).
    /// A frozen VM stays so until `Freeze::thaw`; `resume` refuses it meanwhile.
    pub fn freezer(&self) -> Arc<vcpu::Freeze> {
        self.freeze.clone()
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
            self.vcpus.push(vcpu.start(false)?);
        }
        self.state = VmState::Running;
        Ok(())
    }

    /// Sends `cmd` to every vCPU in `which` (all when `None`) and waits, with one
    /// deadline for all, until each has acted on it. Returns which vCPUs answered, and
    /// the first error.
    fn command_all(
        &mut self,
        cmd: VcpuCommand,
        which: Option<&[bool]>,
    ) -> (Vec<bool>, Option<VcpuError>) {
        let chosen = |i: usize| which.is_none_or(|w| w.get(i).copied().unwrap_or(false));
        let sent: Vec<Option<Result<u64, VcpuError>>> = self
            .vcpus
            .iter_mut()
            .enumerate()
            .map(|(i, v)| chosen(i).then(|| v.send(cmd)))
            .collect();
        let deadline = Instant::now() + vcpu::COMMAND_TIMEOUT;
        let mut first_error = None;
        let mut answered = Vec::with_capacity(sent.len());
        for (v, seq) in self.vcpus.iter().zip(sent) {
            let done = match seq {
                None => {
                    answered.push(false);
                    continue;
                }
                Some(seq) => seq.and_then(|seq| v.wait_ack(seq, cmd, deadline)),
            };
            answered.push(done.is_ok());
            if let Err(e) = done {
                first_error.get_or_insert(e);
            }
        }
        (answered, first_error)
    }

    /// Undoes a half-done pause or resume: `cmd` goes to every vCPU, so that one that
    /// was late takes both commands in order and ends where the others are; only those
    /// that answered the first command are waited for.
    fn undo(&mut self, cmd: VcpuCommand, answered: &[bool]) {
        let late: Vec<bool> = answered.iter().map(|a| !a).collect();
        for (v, _) in self.vcpus.iter_mut().zip(&late).filter(|(_, l)| **l) {
            if let Err(e) = v.send(cmd) {
                tracing::warn!("undoing: {e}");
            }
        }
        if let (_, Some(e)) = self.command_all(cmd, Some(answered)) {
            tracing::warn!("undoing: {e}");
        }
    }

    /// Kicks every vCPU out of `KVM_RUN` and parks it, then pauses the devices. All or
    /// nothing: if a vCPU does not park in time, every vCPU is told to run again (the
    /// late one takes its pause and then the resume, in order) and the devices were
    /// never paused, so the VM keeps running as before, and the state says so.
    pub fn pause(&mut self) -> Result<(), LifecycleError> {
        self.transition(VmState::Paused)?;
        if let (answered, Some(e)) = self.command_all(VcpuCommand::Pause, None) {
            self.undo(VcpuCommand::Resume, &answered);
            return Err(LifecycleError::PauseFailed(e));
        }
        // After the vCPUs: a request the guest queued before stopping is held, not lost.
        self.devices.virtio.pause();
        self.state = VmState::Paused;
        self.paused_since = Some(Instant::now());
        Ok(())
    }

    /// Pauses a VM whose vCPUs were frozen (`freezer`) by another thread, so that its
    /// state says what it is. Unlike `pause` it never undoes: a vCPU that does not answer
    /// in time is frozen all the same, and takes its pause when it comes back. The error
    /// names such a vCPU; the VM is paused either way.
    pub fn pause_frozen(&mut self) -> Result<(), LifecycleError> {
        if !self.freeze.is_frozen() || self.state != VmState::Running {
            return self.pause();
        }
        let (_, late) = self.command_all(VcpuCommand::Pause, None);
        self.devices.virtio.pause();
        self.state = VmState::Paused;
        self.paused_since = Some(Instant::now());
        late.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Lets every vCPU continue where it stopped. All or nothing, as `pause`: if a vCPU
    /// does not continue in time, every vCPU is parked again and the devices paused.
    pub fn resume(&mut self) -> Result<(), LifecycleError> {
        if self.state != VmState::Paused {
            return Err(LifecycleError::InvalidTransition {
                from: self.state,
                to: VmState::Running,
            });
        }
        if self.freeze.is_frozen() {
            return Err(LifecycleError::Frozen);
        }
        // Devices first, so the guest finds them taking requests again.
        self.devices.virtio.resume();
        if let (answered, Some(e)) = self.command_all(VcpuCommand::Resume, None) {
            self.undo(VcpuCommand::Pause, &answered);
            self.devices.virtio.pause();
            return Err(LifecycleError::ResumeFailed(e));
        }
        self.state = VmState::Running;
        if let Some(since) = self.paused_since.take() {
            self.paused_total += since.elapsed();
        }
        Ok(())
    }

    /// Ends every vCPU thread, waiting at most `vcpu::COMMAND_TIMEOUT` in all: a vCPU
    /// that does not answer is left behind. Guest memory is freed when the `Vmm` is
    /// dropped (a vCPU left behind keeps the mapping it uses alive).
    pub fn stop(&mut self) {
        let stops: Vec<Option<u64>> = self.vcpus.iter_mut().map(|v| v.request_stop()).collect();
        let deadline = Instant::now() + vcpu::COMMAND_TIMEOUT;
        for (v, seq) in self.vcpus.iter_mut().zip(stops) {
            v.finish_stop(seq, deadline);
        }
        self.vcpus.clear();
        self.pending.clear();
        self.state = VmState::Stopped;
        // What the guest printed last reaches the console, unless its sink is stuck.
        self.devices.console.finish();
    }

    /// For tests: vCPU `index` waits `duration` before it takes its next command, as a
    /// vCPU held up in a device or the kernel would.
    #[doc(hidden)]
    pub fn stall_vcpu(&self, index: usize, duration: Duration) {
        if let Some(v) = self.vcpus.get(index) {
            v.stall_next_command(duration);
        }
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
            "uart": {
                "write_bytes": self.devices.console.written(),
                "missed_write_count": self.devices.console.dropped(),
            },
            "virtio": self.devices.virtio.metrics(),
            // ferry's own: which mechanism tracks dirty pages for Diff snapshots.
            "dirty": { "snapshot_tracking": self.dirty.as_ref().map(|t| t.mode().name()) },
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
