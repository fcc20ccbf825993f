//! The VM's virtio devices: where each sits (its MMIO page and IRQ), the eventfds KVM
//! uses to reach it, and saving and rebuilding all of them.
//!
//! Placement follows Firecracker: drives first (the root drive is `/dev/vda`), then
//! network interfaces, one 4 KiB page each from `VIRTIO_MMIO_START`, IRQs from 5, all
//! announced on the kernel command line as `virtio_mmio.device=4K@<addr>:<irq>`.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use api::VmConfig;
use devices::virtio::block::{Block, BlockState};
use devices::virtio::net::{Net, NetState};
use devices::virtio::{
    DeviceState, Mem, MmioTransport, TransportState, VirtioDevice, MMIO_SIZE, NOTIFY_OFFSET,
};
use devices::MmioBus;
use kvm_ioctls::{IoEventAddress, VmFd};
use memory::layout::VIRTIO_MMIO_START;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use vmm_sys_util::eventfd::EventFd;

/// The first IRQ virtio devices get (0-4 are the PIT, keyboard, cascade and COM ports);
/// `MAX_DEVICES` of them end at the last IOAPIC pin, 23.
const FIRST_IRQ: u32 = 5;
/// How many virtio devices fit the IRQs.
pub const MAX_DEVICES: usize = api::models::MAX_VIRTIO_DEVICES;

/// Why virtio devices could not be set up, saved or rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A drive's file could not be opened.
    #[error(transparent)]
    Block(#[from] devices::virtio::block::BlockError),
    /// A network interface's tap could not be opened.
    #[error("network interface {id}: {source}")]
    Net {
        /// Interface ID.
        id: String,
        /// The error.
        #[source]
        source: devices::virtio::TapError,
    },
    /// More devices than IRQs.
    #[error("{0} virtio devices are more than the {MAX_DEVICES} ferry can place")]
    TooMany(usize),
    /// KVM refused an irqfd or ioeventfd, or an eventfd could not be made.
    #[error("cannot wire virtio device {id} to KVM: {reason}")]
    Kvm {
        /// Device ID.
        id: String,
        /// The error.
        reason: String,
    },
    /// Saved state does not fit this VM.
    #[error("device state does not fit this VM: {0}")]
    State(String),
    /// No such device.
    #[error("the microVM has no {kind} \"{id}\"")]
    NotFound {
        /// "drive" or "network interface".
        kind: &'static str,
        /// The ID asked for.
        id: String,
    },
}

/// One device's saved state, with where it sits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDevice {
    /// Drive or interface ID.
    pub id: String,
    /// MMIO base address.
    pub base: u64,
    /// Its IRQ.
    pub irq: u32,
    /// Registers and queues.
    pub transport: TransportState,
    /// The device's own state.
    pub device: DeviceState,
}

/// What a snapshot keeps of a device: where it sits and what the guest sees of it. Its
/// backend (file, tap) is not kept: it comes from the loading side's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSnapshot {
    /// Drive or interface ID.
    pub id: String,
    /// MMIO base address.
    pub base: u64,
    /// Its IRQ.
    pub irq: u32,
    /// Registers and queues.
    pub transport: TransportState,
}

struct Slot {
    id: String,
    base: u64,
    irq: u32,
    transport: Arc<Mutex<MmioTransport>>,
    irq_evt: EventFd,
    /// One per queue, registered with KVM on the queue's notify write.
    queue_evts: Vec<EventFd>,
}

/// The VM's virtio devices.
#[derive(Default)]
pub struct VirtioDevices {
    slots: Vec<Slot>,
}

fn clone_all(evts: &[EventFd]) -> Result<Vec<EventFd>, String> {
    evts.iter()
        .map(|e| e.try_clone().map_err(|e| e.to_string()))
        .collect()
}

fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn build_device(state: &DeviceState) -> Result<Box<dyn VirtioDevice>, VirtioError> {
    Ok(match state {
        DeviceState::Block(s) => Box::new(Block::new(s.clone())?),
        DeviceState::Net(s) => {
            Box::new(Net::new(s.clone()).map_err(|source| VirtioError::Net {
                id: s.id.clone(),
                source,
            })?)
        }
    })
}

/// What each configured device is, in placement order.
pub fn device_states(config: &VmConfig) -> Vec<(String, DeviceState)> {
    let mut drives: Vec<_> = config.drives.iter().collect();
    // The root drive becomes /dev/vda.
    drives.sort_by_key(|d| !d.is_root_device);
    let blocks = drives.into_iter().map(|d| {
        (
            d.drive_id.clone(),
            DeviceState::Block(BlockState {
                id: d.drive_id.clone(),
                path: d.path_on_host.clone().unwrap_or_default(),
                read_only: d.is_read_only.unwrap_or(false),
                writeback: d.cache_type.as_deref() == Some("Writeback"),
            }),
        )
    });
    let nets = config.network_interfaces.iter().map(|n| {
        (
            n.iface_id.clone(),
            DeviceState::Net(NetState {
                id: n.iface_id.clone(),
                host_dev_name: n.host_dev_name.clone(),
                guest_mac: n.guest_mac.as_deref().and_then(parse_mac),
            }),
        )
    });
    blocks.chain(nets).collect()
}

/// What the kernel command line needs for the configured devices: each device's
/// `virtio_mmio.device=`, and `root=` for a root drive.
pub fn cmdline_args(config: &VmConfig) -> String {
    let mut args = String::new();
    if let Some(root) = config.drives.iter().find(|d| d.is_root_device) {
        let mode = if root.is_read_only.unwrap_or(false) {
            "ro"
        } else {
            "rw"
        };
        match &root.partuuid {
            Some(uuid) => args.push_str(&format!(" root=PARTUUID={uuid} {mode}")),
            None => args.push_str(&format!(" root=/dev/vda {mode}")),
        }
    }
    for i in 0..config.drives.len() + config.network_interfaces.len() {
        let (base, irq) = placement(i);
        args.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
    }
    args
}

fn placement(index: usize) -> (u64, u32) {
    // `index` < MAX_DEVICES, checked by `open`.
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    (
        VIRTIO_MMIO_START.0 + u64::from(index) * MMIO_SIZE,
        FIRST_IRQ.saturating_add(index),
    )
}

/// A device with its ID, opened and not yet placed.
pub type Opened = (String, Box<dyn VirtioDevice>);

/// Opens every configured device's backend (file or tap): a bad path fails here,
/// before the VM exists.
pub fn open(config: &VmConfig) -> Result<Vec<Opened>, VirtioError> {
    let states = device_states(config);
    if states.len() > MAX_DEVICES {
        return Err(VirtioError::TooMany(states.len()));
    }
    states
        .into_iter()
        .map(|(id, state)| Ok((id, build_device(&state)?)))
        .collect()
}

impl VirtioDevices {
    /// Places the opened devices on `bus` and wires their interrupts (irqfd) and queue
    /// notifications (ioeventfd) to KVM. With `saved` (from a snapshot), each device's
    /// transport takes its saved registers and queues, checked against the device.
    pub fn attach(
        vm: &VmFd,
        mem: &Mem,
        opened: Vec<Opened>,
        saved: Option<&[DeviceSnapshot]>,
        bus: &mut MmioBus,
    ) -> Result<Self, VirtioError> {
        if let Some(saved) = saved {
            if saved.len() != opened.len() {
                return Err(VirtioError::State(format!(
                    "{} devices were saved, the configuration has {}",
                    saved.len(),
                    opened.len()
                )));
            }
        }
        let mut slots = Vec::with_capacity(opened.len());
        for (index, (id, device)) in opened.into_iter().enumerate() {
            let (base, irq) = placement(index);
            let snapshot = saved.and_then(|s| s.get(index));
            if let Some(s) = snapshot {
                if (s.id.as_str(), s.base, s.irq) != (id.as_str(), base, irq) {
                    return Err(VirtioError::State(format!(
                        "device {} at {:#x} IRQ {} was saved, the configuration places {id} at {base:#x} IRQ {irq}",
                        s.id, s.base, s.irq
                    )));
                }
            }
            let kvm = |reason: String| VirtioError::Kvm {
                id: id.clone(),
                reason,
            };
            let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| kvm(e.to_string()))?;
            vm.register_irqfd(&irq_evt, irq)
                .map_err(|e| kvm(format!("irqfd for IRQ {irq}: {e}")))?;
            let queues = device.queue_max_sizes().len();
            let mut queue_evts = Vec::with_capacity(queues);
            for q in 0..u32::try_from(queues).unwrap_or(0) {
                let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| kvm(e.to_string()))?;
                vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), q)
                    .map_err(|e| kvm(format!("ioeventfd for queue {q}: {e}")))?;
                queue_evts.push(evt);
            }
            let irq_clone = irq_evt.try_clone().map_err(|e| kvm(e.to_string()))?;
            let mut transport = match snapshot {
                Some(s) => MmioTransport::restore(device, mem.clone(), irq_clone, &s.transport)
                    .map_err(|e| VirtioError::State(format!("device {id}: {e}")))?,
                None => MmioTransport::new(device, mem.clone(), irq_clone).map_err(kvm)?,
            };
            transport.set_notifiers(clone_all(&queue_evts).map_err(kvm)?);
            let transport = Arc::new(Mutex::new(transport));
            bus.insert(base, MMIO_SIZE, transport.clone())
                .map_err(|e| kvm(e.to_string()))?;
            slots.push(Slot {
                id,
                base,
                irq,
                transport,
                irq_evt,
                queue_evts,
            });
        }
        Ok(VirtioDevices { slots })
    }

    /// The fds the event loop watches, each with whether it is edge-triggered (taps
    /// are: a device reads them only while it has buffers).
    pub fn fds(&self) -> Vec<(RawFd, bool)> {
        let mut fds = Vec::new();
        for slot in &self.slots {
            fds.extend(slot.queue_evts.iter().map(|e| (e.as_raw_fd(), false)));
            let backend = slot
                .transport
                .lock()
                .expect("poisoned")
                .device()
                .backend_fd();
            fds.extend(backend.map(|fd| (fd, true)));
        }
        fds
    }

    /// Handles readiness of `fd`; false if it is not a device's. Queue notifications,
    /// the common case, are found without taking any device's lock.
    pub fn handle(&self, fd: RawFd) -> bool {
        for slot in &self.slots {
            if let Some(q) = slot.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
                let _ = slot.queue_evts[q].read();
                let mut t = slot.transport.lock().expect("poisoned");
                let more = t.notify(q);
                t.requeue(more);
                return true;
            }
        }
        for slot in &self.slots {
            let mut t = slot.transport.lock().expect("poisoned");
            if t.device().backend_fd() == Some(fd) {
                let more = t.backend_ready();
                t.requeue(more);
                return true;
            }
        }
        false
    }

    /// Stops every device taking requests.
    pub fn pause(&self) {
        for slot in &self.slots {
            slot.transport.lock().expect("poisoned").pause();
        }
    }

    /// Lets every device take requests again, starting with those queued meanwhile.
    pub fn resume(&self) {
        for slot in &self.slots {
            let mut t = slot.transport.lock().expect("poisoned");
            let more = t.resume();
            t.requeue(more);
        }
    }

    /// Every device's state. Taken while paused, it is final: nothing is half done.
    pub fn save(&self) -> Vec<SavedDevice> {
        self.slots
            .iter()
            .map(|slot| {
                let (transport, device) = slot.transport.lock().expect("poisoned").state();
                SavedDevice {
                    id: slot.id.clone(),
                    base: slot.base,
                    irq: slot.irq,
                    transport,
                    device,
                }
            })
            .collect()
    }

    /// What a snapshot keeps of every device.
    pub fn snapshot(&self) -> Vec<DeviceSnapshot> {
        self.save()
            .into_iter()
            .map(|d| DeviceSnapshot {
                id: d.id,
                base: d.base,
                irq: d.irq,
                transport: d.transport,
            })
            .collect()
    }

    /// Requests the guest made that no device has taken yet, per device and queue.
    pub fn pending_requests(&self) -> serde_json::Value {
        self.slots
            .iter()
            .map(|s| {
                let pending = s.transport.lock().expect("poisoned").pending_requests();
                (s.id.clone(), serde_json::json!(pending))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// Replaces every device with one built from `saved`, on the same guest memory,
    /// MMIO pages, IRQs and ioeventfds. The old devices are dropped first, closing
    /// their files and taps so the new ones can open them. The new devices stay paused
    /// until `resume`.
    pub fn restore(&self, saved: &[SavedDevice], mem: &Mem) -> Result<(), VirtioError> {
        if saved.len() != self.slots.len() {
            return Err(VirtioError::State(format!(
                "{} devices saved, the VM has {}",
                saved.len(),
                self.slots.len()
            )));
        }
        for (slot, s) in self.slots.iter().zip(saved) {
            if (slot.id.as_str(), slot.base, slot.irq) != (s.id.as_str(), s.base, s.irq) {
                return Err(VirtioError::State(format!(
                    "device {} at {:#x} IRQ {} was saved, the VM has {} at {:#x} IRQ {}",
                    s.id, s.base, s.irq, slot.id, slot.base, slot.irq
                )));
            }
        }
        for (slot, s) in self.slots.iter().zip(saved) {
            let mut t = slot.transport.lock().expect("poisoned");
            t.retire();
            let device = build_device(&s.device)?;
            let irq = slot.irq_evt.try_clone().map_err(|e| VirtioError::Kvm {
                id: slot.id.clone(),
                reason: e.to_string(),
            })?;
            let mut rebuilt = MmioTransport::restore(device, mem.clone(), irq, &s.transport)
                .map_err(|e| VirtioError::State(format!("device {}: {e}", s.id)))?;
            rebuilt.set_notifiers(clone_all(&slot.queue_evts).map_err(|reason| {
                VirtioError::Kvm {
                    id: slot.id.clone(),
                    reason,
                }
            })?);
            rebuilt.pause();
            *t = rebuilt;
        }
        Ok(())
    }

    /// Points drive `id` at another backing file while the guest runs, and tells the
    /// guest its size may have changed.
    pub fn replace_drive_file(&self, id: &str, path: &Path) -> Result<(), VirtioError> {
        let not_found = || VirtioError::NotFound {
            kind: "drive",
            id: id.into(),
        };
        let slot = self
            .slots
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(not_found)?;
        let mut t = slot.transport.lock().expect("poisoned");
        let block = t
            .device_mut()
            .as_any_mut()
            .downcast_mut::<Block>()
            .ok_or_else(not_found)?;
        block.replace_file(path)?;
        t.config_changed();
        Ok(())
    }

    /// Whether a network interface `id` exists.
    pub fn has_net(&self, id: &str) -> bool {
        self.slots.iter().any(|s| {
            s.id == id
                && s.transport.lock().expect("poisoned").device().device_type() == VIRTIO_ID_NET
        })
    }

    /// Per-device counters, keyed by ID under "block" and "net".
    pub fn metrics(&self) -> serde_json::Value {
        let mut block = serde_json::Map::new();
        let mut net = serde_json::Map::new();
        for slot in &self.slots {
            let t = slot.transport.lock().expect("poisoned");
            let into = if t.device().device_type() == VIRTIO_ID_NET {
                &mut net
            } else {
                &mut block
            };
            into.insert(slot.id.clone(), t.metrics());
        }
        serde_json::json!({ "block": block, "net": net })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_mac() {
        assert_eq!(
            parse_mac("06:00:ac:10:00:02"),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        assert_eq!(parse_mac("06:00:ac:10:00"), None);
        assert_eq!(parse_mac("06:00:ac:10:00:02:03"), None);
    }
}
