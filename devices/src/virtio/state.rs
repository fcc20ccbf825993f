//! The saved state of virtio devices, for snapshots and migration. Plain data with serde:
//! the receiving side treats it as untrusted and checks it as it rebuilds the device.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::{block::BlockState, net::NetState};

/// One virtqueue: its configuration and how far the device got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver finished configuring it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will take. Everything before it was
    /// completed; everything from it on is handled after restore.
    pub next_avail: u16,
    /// Next used-ring slot the device will fill.
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub event_idx: bool,
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    /// Rebuilds the queue; a size or alignment the queue would refuse is an error.
    pub fn to_queue(&self, max_size: u16) -> Result<Queue, String> {
        if self.max_size != max_size {
            return Err(format!(
                "queue max size {} does not match the device's {max_size}",
                self.max_size
            ));
        }
        let q = Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("invalid queue state: {e}"))?;
        Ok(q)
    }
}

/// The transport's registers and queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Interrupt status bits not yet acknowledged.
    pub interrupt_status: u32,
    /// Config generation counter.
    pub config_generation: u32,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
}

/// Device-specific state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
}
