//! Virtio devices over the virtio-mmio transport (virtio 1.x, modern interface only).
//!
//! `MmioTransport` holds what every device shares: the register file, feature
//! negotiation, the queues and the interrupt. A `VirtioDevice` is the device-specific
//! part: its config space and what it does with a queue's requests. Everything the
//! guest controls (register offsets and widths, queue sizes and addresses, descriptor
//! chains, request fields) is checked here, and a bad value puts the device into the
//! `DEVICE_NEEDS_RESET` state, which the guest can read, instead of reaching ferry.

pub mod block;
mod chain;
mod mmio;
pub mod net;
mod queue;
mod state;
mod tap;

use std::os::fd::RawFd;

use virtio_queue::Queue;

pub use chain::ChainError;
pub use mmio::{MmioTransport, NOTIFY_OFFSET};
pub use state::{DeviceState, QueueSnapshot, TransportState};
pub use tap::{Tap, TapError};

/// Guest memory as devices see it: writes through it are marked for dirty tracking.
pub type Mem = memory::GuestMemoryMmap;

/// Bytes of guest-physical address space each virtio-mmio device takes.
pub const MMIO_SIZE: u64 = 0x1000;

/// Feature bit: the device follows virtio 1.x (required: ferry has no legacy interface).
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Chains a device handles per event before it lets the event loop serve others (the
/// API, other devices). A guest that keeps a queue full cannot hold the loop.
pub const BUDGET: usize = 256;

/// What the device did with its queues, so the transport knows whether to interrupt.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Chains were returned on these queues (bit per queue).
    pub used: u32,
    /// These queues still have work: the budget ran out (bit per queue).
    pub more: u32,
}

impl Progress {
    /// Records that queue `index` got used buffers.
    pub fn used_on(&mut self, index: usize) {
        self.used |= 1 << index;
    }

    /// Records that queue `index` has work left.
    pub fn more_on(&mut self, index: usize) {
        self.more |= 1 << index;
    }
}

/// A guest mistake that stops the device until the guest resets it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// A descriptor chain broke the rules.
    #[error("queue {queue}: {source}")]
    Chain {
        /// Which queue.
        queue: usize,
        /// What was wrong.
        #[source]
        source: ChainError,
    },
    /// The available ring cannot be read or claims more entries than the queue holds.
    #[error("queue {queue}: bad available ring: {reason}")]
    Ring {
        /// Which queue.
        queue: usize,
        /// What was wrong.
        reason: String,
    },
}

/// The device-specific half of a virtio device.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 net, 2 block).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the count is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// The device's config space.
    fn config_space(&self) -> Vec<u8>;
    /// Handles the requests waiting on queue `index`, at most `budget` of them.
    /// `queues` are all ready and valid.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &Mem,
        budget: usize,
    ) -> Result<Progress, DeviceError>;
    /// The host-side fd the device waits on (a tap), if any, and whether it is watched
    /// edge-triggered.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// Handles readiness of `backend_fd`, at most `budget` requests.
    fn process_backend(
        &mut self,
        _queues: &mut [Queue],
        _mem: &Mem,
        _budget: usize,
    ) -> Result<Progress, DeviceError> {
        Ok(Progress::default())
    }
    /// Forgets everything negotiated with the driver (status written 0).
    fn reset(&mut self) {}
    /// Device-specific state, enough to build the device again.
    fn state(&self) -> DeviceState;
    /// Counters for the metrics endpoint.
    fn metrics(&self) -> serde_json::Value;
    /// The concrete device, for changes only it knows (a drive's backing file).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

#[cfg(test)]
// Test addresses and indexes are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests;
