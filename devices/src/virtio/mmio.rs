//! The virtio-mmio transport, version 2 (virtio 1.x): registers, feature negotiation,
//! queue setup, interrupts, and the device's error state.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::state::{DeviceState, QueueSnapshot, TransportState};
use super::{DeviceError, Mem, Progress, VirtioDevice, BUDGET, F_VERSION_1};

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
/// Vendor ID reported to the guest: "FRRY".
const VENDOR: u32 = 0x5952_5246;

/// Offset of `QueueNotify`, where KVM's ioeventfds listen.
pub const NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_OFFSET: u64 = 0x100;

/// A virtio device behind its virtio-mmio registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Mem,
    irq: EventFd,
    queues: Vec<Queue>,
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// Devices stop taking requests while the VM is paused, so that saved state is final.
    paused: bool,
    /// Why the device stopped, for logs and metrics.
    error: Option<String>,
    /// Guest register misuse and chain errors, for metrics.
    errors: u64,
    /// Each queue's notification eventfd (the ioeventfd KVM signals): work left over
    /// from a vCPU's exit is handed to the event loop through it.
    notifiers: Vec<EventFd>,
    /// Requests a device takes per event (`BUDGET`).
    budget: usize,
}

impl MmioTransport {
    /// Puts `device` behind a fresh transport. `irq` is the device's irqfd.
    pub fn new(device: Box<dyn VirtioDevice>, mem: Mem, irq: EventFd) -> Result<Self, String> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| format!("queue of {max}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            irq,
            queues,
            status: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            paused: false,
            error: None,
            errors: 0,
            notifiers: Vec::new(),
            budget: BUDGET,
        })
    }

    /// Gives the transport each queue's notification eventfd, which the event loop
    /// watches. Without them, work left over after a budget waits for the guest's next
    /// notification.
    pub fn set_notifiers(&mut self, notifiers: Vec<EventFd>) {
        self.notifiers = notifiers;
    }

    /// For tests: requests a device takes per event, in place of `BUDGET`.
    #[doc(hidden)]
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget.max(1);
    }

    /// Queues whose budget ran out (bit per queue, as `notify` returns them) get their
    /// own notification again, so the event loop serves other events (the API, other
    /// devices) and then comes back to them.
    pub fn requeue(&self, more: u32) {
        for (q, evt) in self.notifiers.iter().enumerate() {
            if more & (1 << q) != 0 {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("cannot requeue queue {q}: {e}");
                }
            }
        }
    }

    /// Builds the transport again from saved state, around a device rebuilt from its own
    /// state. The queues are checked as they are rebuilt.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: Mem,
        irq: EventFd,
        state: &TransportState,
    ) -> Result<Self, String> {
        let mut t = Self::new(device, mem, irq)?;
        let max_sizes = t.device.queue_max_sizes().to_vec();
        if state.queues.len() != max_sizes.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                max_sizes.len()
            ));
        }
        t.queues = state
            .queues
            .iter()
            .zip(max_sizes)
            .map(|(q, max)| q.to_queue(max))
            .collect::<Result<_, _>>()?;
        let offered = t.device.features() | F_VERSION_1;
        if state.driver_features & !offered != 0 {
            return Err(format!(
                "driver_features {:#x} include {:#x}, which the device never offered (it offers {offered:#x})",
                state.driver_features,
                state.driver_features & !offered
            ));
        }
        t.status = state.status;
        t.driver_features = state.driver_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.interrupt_status = state.interrupt_status;
        t.config_generation = state.config_generation;
        if let Some(i) = t
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&t.mem))
        {
            let q = &state.queues[i];
            return Err(format!(
                "queues[{i}] is ready but its rings (desc_table {:#x}, avail_ring {:#x}, used_ring {:#x}, size {}) are not all in guest RAM",
                q.desc_table, q.avail_ring, q.used_ring, q.size
            ));
        }
        Ok(t)
    }

    /// The transport's state and the device's.
    pub fn state(&self) -> (TransportState, DeviceState) {
        let transport = TransportState {
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueSnapshot::from).collect(),
        };
        (transport, self.device.state())
    }

    /// Drops the device (closing its file or tap) and leaves an inert stand-in, so that a
    /// device rebuilt from saved state can take over the same backend.
    pub fn retire(&mut self) {
        let sizes = self.device.queue_max_sizes().to_vec();
        let state = self.device.state();
        let device_type = self.device.device_type();
        self.device = Box::new(Retired {
            sizes,
            state,
            device_type,
        });
        self.paused = true;
    }

    /// The device-specific half.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device-specific half, to change its backend.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// How many queues the device has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Requests the guest made that the device has not taken yet, per queue.
    pub fn pending_requests(&self) -> Vec<u16> {
        self.queues
            .iter()
            .map(|q| {
                if !q.ready() {
                    return 0;
                }
                q.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                    .map(|idx| (idx - std::num::Wrapping(q.next_avail())).0)
                    .unwrap_or(0)
            })
            .collect()
    }

    /// The device has stopped on a guest error and waits for a reset.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Counters for the metrics endpoint.
    pub fn metrics(&self) -> serde_json::Value {
        let mut m = self.device.metrics();
        m["guest_errors"] = self.errors.into();
        m["pending_requests"] = self.pending_requests().into();
        m["needs_reset"] = (self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0).into();
        m
    }

    fn active(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) == 0
    }

    fn queues_valid(&self) -> bool {
        self.queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem))
    }

    /// Tells the driver the config space changed (a drive's new size).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.interrupt(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// Stops taking requests (the VM is pausing).
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Takes requests again, and handles whatever the guest queued meanwhile: its
    /// notifications during the pause were not acted on.
    /// Returns the queues with work left, as `notify`.
    pub fn resume(&mut self) -> u32 {
        self.paused = false;
        self.kick_all()
    }

    /// The guest notified queue `index` (through the ioeventfd or a trapped write).
    /// Returns the queues that still have work after this round (bit per queue): the
    /// caller comes back to them after serving other events.
    pub fn notify(&mut self, index: usize) -> u32 {
        if self.paused || !self.active() || !self.queues.get(index).is_some_and(|q| q.ready()) {
            return 0;
        }
        let result = self
            .device
            .process_queue(index, &mut self.queues, &self.mem, self.budget);
        self.finish(result)
    }

    /// The device's backend fd became ready. Returns the queues with work left, as
    /// `notify`.
    pub fn backend_ready(&mut self) -> u32 {
        if self.paused || !self.active() {
            return 0;
        }
        let result = self
            .device
            .process_backend(&mut self.queues, &self.mem, self.budget);
        self.finish(result)
    }

    /// Looks at every queue and the backend, as after a pause or at `DRIVER_OK`.
    /// Returns the queues with work left, as `notify`.
    pub fn kick_all(&mut self) -> u32 {
        let mut more = 0;
        for q in 0..self.queues.len() {
            more |= self.notify(q);
        }
        more | self.backend_ready()
    }

    fn finish(&mut self, result: Result<Progress, DeviceError>) -> u32 {
        match result {
            Ok(progress) => {
                let mut signal = false;
                for (i, q) in self.queues.iter_mut().enumerate() {
                    if progress.used & (1 << i) != 0 {
                        // An unreadable used-event field means "notify": the guest gets
                        // a spurious interrupt rather than a lost one.
                        signal |= q.needs_notification(&self.mem).unwrap_or(true);
                    }
                }
                if signal {
                    self.interrupt(VIRTIO_MMIO_INT_VRING);
                }
                progress.more
            }
            Err(e) => {
                self.fail(e.to_string());
                0
            }
        }
    }

    fn interrupt(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("cannot raise the virtio interrupt: {e}");
        }
    }

    /// Stops the device on a guest error: `DEVICE_NEEDS_RESET`, and a config interrupt
    /// so that a driver that listens finds out.
    fn fail(&mut self, reason: String) {
        self.errors += 1;
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            tracing::warn!(
                "virtio device type {}: {reason}; it needs a reset",
                self.device.device_type()
            );
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.error = Some(reason);
            self.interrupt(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.error = None;
        self.device.reset();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    /// A register read. Registers take aligned 32-bit accesses; config space any
    /// access within it. Anything else reads as zeros.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_OFFSET {
            let config = self.device.config_space();
            let start = usize::try_from(offset - CONFIG_OFFSET).unwrap_or(usize::MAX);
            if let Some(src) = start
                .checked_add(data.len())
                .and_then(|end| config.get(start..end))
            {
                data.copy_from_slice(src);
            } else {
                self.errors += 1;
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.errors += 1;
            return;
        }
        let features = self.device.features() | F_VERSION_1;
        let value: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => (features & 0xffff_ffff) as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => {
                self.errors += 1;
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A register write. A write the guest may not make in the current state (a queue
    /// change after `DRIVER_OK`, a bad queue size, an unknown register) stops the device.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            // Neither block nor net has a writable config field ferry implements.
            self.errors += 1;
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self.fail(format!("{}-byte write to register {offset:#x}", data.len()));
        };
        if !offset.is_multiple_of(4) {
            return self.fail(format!("unaligned write to register {offset:#x}"));
        }
        let v = u32::from_le_bytes(bytes);
        let configuring = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if configuring => {
                self.write_queue(offset, v)
            }
            NOTIFY_OFFSET => {
                // A trapped notify (no ioeventfd matched): one budget's worth here, on
                // the vCPU, and the rest from the event loop, so that no guest can keep
                // a vCPU in device work and away from a pause.
                let index = usize::try_from(v).unwrap_or(usize::MAX);
                let more = self.notify(index);
                self.requeue(more);
            }
            0x64 => self.interrupt_status &= !v,
            0x70 => self.write_status(v),
            _ => self.fail(format!(
                "write of {v:#x} to register {offset:#x} in status {:#x}",
                self.status
            )),
        }
    }

    fn write_queue(&mut self, offset: u64, v: u32) {
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            return self.fail(format!("queue {sel} does not exist"));
        };
        if q.ready() && offset != 0x44 {
            return self.fail(format!("queue {sel} changed while ready"));
        }
        let result = match offset {
            0x38 => u16::try_from(v)
                .map_err(|_| ())
                .and_then(|size| q.try_set_size(size).map_err(|_| ())),
            0x44 => {
                q.set_ready(v == 1);
                Ok(())
            }
            0x80 => set_low(q.desc_table(), v, |a| q.try_set_desc_table_address(a)),
            0x84 => set_high(q.desc_table(), v, |a| q.try_set_desc_table_address(a)),
            0x90 => set_low(q.avail_ring(), v, |a| q.try_set_avail_ring_address(a)),
            0x94 => set_high(q.avail_ring(), v, |a| q.try_set_avail_ring_address(a)),
            0xa0 => set_low(q.used_ring(), v, |a| q.try_set_used_ring_address(a)),
            0xa4 => set_high(q.used_ring(), v, |a| q.try_set_used_ring_address(a)),
            _ => Err(()),
        };
        if result.is_err() {
            self.fail(format!(
                "queue {sel}: invalid value {v:#x} for register {offset:#x}"
            ));
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            return self.reset();
        }
        // Drivers only add bits; clearing one (other than by reset) is a driver bug.
        if v & self.status != self.status {
            return self.fail(format!("status {v:#x} clears bits of {:#x}", self.status));
        }
        let added = v & !self.status;
        let mut status = v;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features() | F_VERSION_1;
            let ok = self.driver_features & !offered == 0
                && self.driver_features & F_VERSION_1 != 0
                && self.status & VIRTIO_CONFIG_S_DRIVER != 0;
            if !ok {
                // The driver reads the status back and sees its features refused.
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let needed =
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
            if self.status & needed != needed {
                return self.fail(format!(
                    "DRIVER_OK before features were accepted (status {:#x})",
                    self.status
                ));
            }
            let event_idx = self.driver_features
                & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
                != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
            if !self.queues_valid() {
                self.status = status & !VIRTIO_CONFIG_S_DRIVER_OK;
                return self.fail("a ready queue lies outside guest RAM or is misaligned".into());
            }
        }
        self.status = status;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            // Requests may already be queued, and a backend may already have data: one
            // budget here, the rest from the event loop, as for a trapped notify.
            let more = self.kick_all();
            self.requeue(more);
        }
    }
}

fn set_low(
    current: u64,
    low: u32,
    set: impl FnOnce(GuestAddress) -> Result<(), virtio_queue::Error>,
) -> Result<(), ()> {
    set(GuestAddress((current & !0xffff_ffff) | u64::from(low))).map_err(|_| ())
}

fn set_high(
    current: u64,
    high: u32,
    set: impl FnOnce(GuestAddress) -> Result<(), virtio_queue::Error>,
) -> Result<(), ()> {
    set(GuestAddress(
        (current & 0xffff_ffff) | (u64::from(high) << 32),
    ))
    .map_err(|_| ())
}

/// What stays behind a retired device: the same shape, no backend, no requests taken.
struct Retired {
    sizes: Vec<u16>,
    state: DeviceState,
    device_type: u32,
}

impl VirtioDevice for Retired {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        0
    }
    fn config_space(&self) -> Vec<u8> {
        Vec::new()
    }
    fn process_queue(
        &mut self,
        _: usize,
        _: &mut [Queue],
        _: &Mem,
        _: usize,
    ) -> Result<Progress, DeviceError> {
        Ok(Progress::default())
    }
    fn state(&self) -> DeviceState {
        self.state.clone()
    }
    fn metrics(&self) -> serde_json::Value {
        serde_json::json!({ "retired": true })
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
