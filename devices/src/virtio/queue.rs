//! Taking requests off a virtqueue, with notifications held off while the device works.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::chain::{Chain, ChainError};
use super::{DeviceError, Mem, Progress};

pub fn ring_error(queue: usize, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Ring {
        queue,
        reason: e.to_string(),
    }
}

/// The next chain the guest made available on `q`, or `None` when the ring is empty.
pub fn next_chain<'m>(
    index: usize,
    q: &mut Queue,
    mem: &'m Mem,
) -> Result<Option<DescriptorChain<&'m Mem>>, DeviceError> {
    let mut iter = q.iter(mem).map_err(|e| ring_error(index, e))?;
    Ok(iter.next())
}

/// Runs `handle` on every chain available on queue `index`, up to `budget`, and returns
/// each to the used ring with the length `handle` reports. Notifications stay off while
/// the device works and are checked again after, so a request added meanwhile is not
/// missed. When the budget runs out, notifications stay off and `more` says so.
pub fn for_each_chain(
    index: usize,
    queues: &mut [Queue],
    mem: &Mem,
    budget: usize,
    mut handle: impl FnMut(&Chain) -> Result<u32, ChainError>,
) -> Result<Progress, DeviceError> {
    let mut progress = Progress::default();
    let mut done = 0;
    let q = queues
        .get_mut(index)
        .ok_or_else(|| ring_error(index, "no such queue"))?;
    loop {
        q.disable_notification(mem)
            .map_err(|e| ring_error(index, e))?;
        while let Some(desc_chain) = next_chain(index, q, mem)? {
            if done == budget {
                q.go_to_previous_position();
                progress.more_on(index);
                return Ok(progress);
            }
            done += 1;
            let chain = Chain::read(desc_chain, mem).map_err(|source| DeviceError::Chain {
                queue: index,
                source,
            })?;
            let len = handle(&chain).map_err(|source| DeviceError::Chain {
                queue: index,
                source,
            })?;
            q.add_used(mem, chain.head, len)
                .map_err(|e| ring_error(index, e))?;
            progress.used_on(index);
        }
        if !q
            .enable_notification(mem)
            .map_err(|e| ring_error(index, e))?
        {
            return Ok(progress);
        }
    }
}
