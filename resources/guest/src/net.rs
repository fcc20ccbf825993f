//! The virtio-net workload: echo every frame back to its sender, from our own MAC.
//! Frames of EtherType 0x88b5 (the IEEE "local experimental" type the host test sends)
//! count toward `passes`; anything else the host stack sends is echoed and not counted.

use crate::println;
use crate::virtio::{r8, w8, Device};

const DEVICE_NET: u32 = 1;
const F_MAC: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 64;
const BUF: u64 = 2048;
/// The virtio-net header before every frame (virtio 1.x).
const HDR: u64 = 12;
const TEST_ETHERTYPE: u16 = 0x88b5;

fn error(msg: core::fmt::Arguments) -> ! {
    println!("ferry-guest: error: net: {msg}");
    crate::fail();
}

/// Echoes frames until `passes` test frames went back (0 = forever).
pub fn run(cmdline: &[u8], start: u64, size: u64, passes: u64) {
    let rx_bufs = start + 8 * 4096;
    let tx_bufs = rx_bufs + QUEUE_SIZE as u64 * BUF;
    if tx_bufs + QUEUE_SIZE as u64 * BUF > start + size {
        error(format_args!("size= is too small for the net buffers"));
    }
    let Some(dev) = crate::virtio::devices(cmdline).find_map(|b| Device::probe(b, DEVICE_NET))
    else {
        error(format_args!("no virtio-net device on the command line"));
    };
    let Some(features) = dev.negotiate(F_MAC) else {
        error(format_args!("the device refused our features"));
    };
    let (Some(mut rx), Some(mut tx)) = (
        dev.queue(0, QUEUE_SIZE, start),
        dev.queue(1, QUEUE_SIZE, start + 3 * 4096),
    ) else {
        error(format_args!("the device lacks a queue of {QUEUE_SIZE}"));
    };
    if !dev.driver_ok() {
        error(format_args!(
            "the device failed to start (status {:#x})",
            dev.status()
        ));
    }
    let mut mac = [0x02, 0, 0, 0, 0, 0x99];
    if features & F_MAC != 0 {
        for (i, b) in mac.iter_mut().enumerate() {
            *b = dev.config8(i as u64);
        }
    }
    println!(
        "ferry-guest: net mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );
    for i in 0..QUEUE_SIZE {
        rx.set_desc(i, rx_bufs + i as u64 * BUF, BUF as u32, true, None);
        rx.push(i);
    }
    rx.kick_always();
    println!("ferry-guest: net ready");

    let mut echoed = 0u64;
    let mut tx_next = 0u16;
    let mut tx_in_flight = 0u16;
    let mut spins = 0u32;
    while passes == 0 || echoed < passes {
        while tx.pop().is_some() {
            tx_in_flight -= 1;
        }
        let Some((head, len)) = rx.pop() else {
            // A register read traps to the VMM: look only now and then.
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1 << 20)
                && dev.status() & crate::virtio::STATUS_NEEDS_RESET != 0
            {
                error(format_args!("the device needs a reset"));
            }
            core::hint::spin_loop();
            continue;
        };
        if head >= QUEUE_SIZE || (len as u64) < HDR + 14 || len as u64 > BUF {
            error(format_args!(
                "bad receive completion: chain {head}, {len} bytes"
            ));
        }
        let frame = rx_bufs + head as u64 * BUF + HDR;
        let frame_len = len as u64 - HDR;
        let ethertype = ((r8(frame + 12) as u16) << 8) | r8(frame + 13) as u16;
        while tx_in_flight == QUEUE_SIZE {
            if tx.pop().is_some() {
                tx_in_flight -= 1;
            }
        }
        let slot = tx_next;
        tx_next = (tx_next + 1) % QUEUE_SIZE;
        let out = tx_bufs + slot as u64 * BUF;
        for i in 0..HDR {
            w8(out + i, 0);
        }
        let body = out + HDR;
        for i in 0..frame_len {
            w8(body + i, r8(frame + i));
        }
        // To the sender, from us.
        for i in 0..6 {
            w8(body + i, r8(frame + 6 + i));
            w8(body + 6 + i, mac[i as usize]);
        }
        tx.set_desc(slot, out, (HDR + frame_len) as u32, false, None);
        tx.push(slot);
        tx_in_flight += 1;
        tx.kick();
        rx.push(head);
        rx.kick();
        if ethertype == TEST_ETHERTYPE {
            echoed += 1;
        }
    }
    println!("ferry-guest: net echoed {echoed} frames");
}
