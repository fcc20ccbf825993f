//! virtio-net backed by a tap device: one receive and one transmit queue, no offloads,
//! so any driver works without options.
//!
//! Frames cross as they are: ferry strips the 12-byte virtio-net header on transmit and
//! writes an all-zero one on receive. A frame is read from the tap only once a receive
//! buffer is there to take it, so nothing is held inside ferry: what the guest has not
//! received yet waits in the tap's own queue, across a pause or a snapshot.

use std::any::Any;
use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::chain::{Chain, ChainError};
use super::queue::{for_each_chain, next_chain, ring_error};
use super::tap::{Tap, TapError};
use super::{DeviceError, DeviceState, Mem, Progress, VirtioDevice};

/// `struct virtio_net_hdr_v1`: what precedes every frame in a virtio 1.x queue.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame ferry moves: a 64 KiB IP packet plus its Ethernet header.
pub const MAX_FRAME: usize = 65_535 + 14;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: &[u16] = &[256, 256];

/// How to build a network device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Interface ID.
    pub id: String,
    /// Host tap device.
    pub host_dev_name: String,
    /// The MAC address the guest gets, if set.
    pub guest_mac: Option<[u8; 6]>,
}

#[derive(Default)]
struct Counters {
    rx_frames: u64,
    rx_bytes: u64,
    rx_dropped: u64,
    tx_frames: u64,
    tx_bytes: u64,
    tx_dropped: u64,
}

/// A virtio-net device.
pub struct Net {
    state: NetState,
    tap: Tap,
    /// The tap may have frames: set by its (edge-triggered) readiness, cleared when a
    /// read finds nothing.
    tap_readable: bool,
    buf: Vec<u8>,
    counters: Counters,
}

impl Net {
    /// Attaches to the tap named in `state`.
    pub fn new(state: NetState) -> Result<Self, TapError> {
        let tap = Tap::open(&state.host_dev_name)?;
        Ok(Net {
            state,
            tap,
            tap_readable: true,
            buf: vec![0; NET_HDR_LEN + MAX_FRAME],
            counters: Counters::default(),
        })
    }

    /// The interface ID.
    pub fn id(&self) -> &str {
        &self.state.id
    }

    fn transmit(&mut self, chain: &Chain, mem: &Mem) -> Result<u32, ChainError> {
        let head = chain.head;
        if chain.descs.iter().any(|d| d.writable) {
            return Err(ChainError::Layout {
                head,
                reason: "a transmit buffer is device-writable",
            });
        }
        let mut len = 0usize;
        for d in &chain.descs {
            let n = d.len as usize;
            let Some(dst) = self.buf.get_mut(len..len + n) else {
                // Longer than any frame: drop it, the guest gets its buffers back.
                self.counters.tx_dropped += 1;
                return Ok(0);
            };
            mem.read_slice(dst, d.addr)
                .map_err(|_| ChainError::Layout {
                    head,
                    reason: "unreadable transmit buffer",
                })?;
            len += n;
        }
        if len < NET_HDR_LEN {
            return Err(ChainError::Layout {
                head,
                reason: "transmit chain shorter than the virtio-net header",
            });
        }
        match self.tap.write_frame(&self.buf[NET_HDR_LEN..len]) {
            Ok(_) => {
                self.counters.tx_frames += 1;
                self.counters.tx_bytes += (len - NET_HDR_LEN) as u64;
            }
            Err(e) => {
                tracing::debug!("net {}: tap write: {e}", self.state.id);
                self.counters.tx_dropped += 1;
            }
        }
        Ok(0)
    }

    /// Moves frames from the tap into receive buffers until one side runs out.
    fn receive(
        &mut self,
        queues: &mut [Queue],
        mem: &Mem,
        budget: usize,
    ) -> Result<Progress, DeviceError> {
        let mut progress = Progress::default();
        let err = |source| DeviceError::Chain { queue: RX, source };
        let q = &mut queues[RX];
        let mut frames = 0;
        while self.tap_readable {
            if frames == budget {
                // More may wait: come back through the receive queue's notification.
                progress.more_on(RX);
                break;
            }
            frames += 1;
            let Some(desc_chain) = next_chain(RX, q, mem)? else {
                // No buffer: ask the guest to say when it adds one.
                if q.enable_notification(mem).map_err(|e| ring_error(RX, e))? {
                    continue;
                }
                break;
            };
            let chain = Chain::read(desc_chain, mem).map_err(err)?;
            if chain.descs.iter().any(|d| !d.writable) {
                return Err(err(ChainError::Layout {
                    head: chain.head,
                    reason: "a receive buffer is device-readable",
                }));
            }
            let n = match self.tap.read_frame(&mut self.buf[NET_HDR_LEN..]) {
                Ok(n) => n,
                Err(e) => {
                    // Nothing waiting (or the tap went away): the chain goes back.
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::debug!("net {}: tap read: {e}", self.state.id);
                    }
                    q.go_to_previous_position();
                    self.tap_readable = false;
                    break;
                }
            };
            let total = NET_HDR_LEN + n;
            if chain.writable_len() < total as u64 {
                self.counters.rx_dropped += 1;
                q.add_used(mem, chain.head, 0)
                    .map_err(|e| ring_error(RX, e))?;
                progress.used_on(RX);
                continue;
            }
            // virtio 1.x header: no offloads; num_buffers = 1.
            self.buf[..NET_HDR_LEN].fill(0);
            self.buf[10] = 1;
            let mut done = 0usize;
            for d in &chain.descs {
                if done == total {
                    break;
                }
                let n = (d.len as usize).min(total - done);
                mem.write_slice(&self.buf[done..done + n], d.addr)
                    .map_err(|_| {
                        err(ChainError::Layout {
                            head: chain.head,
                            reason: "unwritable receive buffer",
                        })
                    })?;
                done += n;
            }
            q.add_used(mem, chain.head, u32::try_from(total).unwrap_or(0))
                .map_err(|e| ring_error(RX, e))?;
            self.counters.rx_frames += 1;
            self.counters.rx_bytes += n as u64;
            progress.used_on(RX);
        }
        Ok(progress)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mac = if self.state.guest_mac.is_some() {
            1 << VIRTIO_NET_F_MAC
        } else {
            0
        };
        mac | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn config_space(&self) -> Vec<u8> {
        // `mac`; `status` and the rest depend on features ferry does not offer.
        self.state.guest_mac.unwrap_or_default().to_vec()
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &Mem,
        budget: usize,
    ) -> Result<Progress, DeviceError> {
        match index {
            RX => self.receive(queues, mem, budget),
            TX => for_each_chain(TX, queues, mem, budget, |chain| self.transmit(chain, mem)),
            _ => Ok(Progress::default()),
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.fd())
    }

    fn process_backend(
        &mut self,
        queues: &mut [Queue],
        mem: &Mem,
        budget: usize,
    ) -> Result<Progress, DeviceError> {
        self.tap_readable = true;
        self.receive(queues, mem, budget)
    }

    fn state(&self) -> DeviceState {
        DeviceState::Net(self.state.clone())
    }

    fn metrics(&self) -> serde_json::Value {
        let c = &self.counters;
        serde_json::json!({
            "rx_frames": c.rx_frames,
            "rx_bytes": c.rx_bytes,
            "rx_dropped": c.rx_dropped,
            "tx_frames": c.tx_frames,
            "tx_bytes": c.tx_bytes,
            "tx_dropped": c.tx_dropped,
        })
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
