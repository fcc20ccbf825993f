//! The virtio-blk workloads: `blk` writes a pattern over the disk, reads it back and
//! checks it, pass after pass; `blk-bench` times sequential reads or writes.

use crate::println;
use crate::virtio::{r8, w8, Device, Queue};
use crate::workload::{check, check_keyboard, rdtsc};

const DEVICE_BLOCK: u32 = 2;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
/// Status value meaning "the device has not answered yet".
const S_PENDING: u8 = 0xff;
const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Three descriptors per request.
pub const MAX_DEPTH: usize = (QUEUE_SIZE / 3) as usize;

/// What the blk workloads work with.
pub struct BlkParams {
    /// Driver memory: queues, headers, buffers.
    pub start: u64,
    /// Its size.
    pub size: u64,
    /// Bytes per request.
    pub req: u64,
    /// Requests in flight.
    pub depth: usize,
    /// Passes (blk) before stopping, 0 = forever.
    pub passes: u64,
    /// blk-bench: bytes to move.
    pub total: u64,
    /// blk-bench: write (else read).
    pub write: bool,
    /// blk with `op=read`: only read the disk, which the host filled with pass 1's
    /// pattern, and check it every pass.
    pub readonly: bool,
    /// `early=1`: queue one read before `DRIVER_OK`, as the virtio spec lets a driver
    /// do; the device must serve it once `DRIVER_OK` is set.
    pub early: bool,
    /// `hold=US`: TSC cycles new requests wait in the ring before the notification; the
    /// driver then waits for all of them before it queues more, as a driver batching
    /// its notifications does. The device has work it has not taken most of the time,
    /// which tests that pause with requests in flight need.
    pub hold_cycles: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    kind: u32,
    offset: u64,
}

struct Blk {
    dev: Device,
    q: Queue,
    /// The device offered FLUSH.
    flush: bool,
    capacity: u64,
    headers: u64,
    statuses: u64,
    data: u64,
    req: u64,
    depth: usize,
    hold_cycles: u64,
    slots: [Slot; MAX_DEPTH],
    in_flight: usize,
}

fn error(msg: core::fmt::Arguments) -> ! {
    println!("ferry-guest: error: blk: {msg}");
    crate::fail();
}

impl Blk {
    fn open(cmdline: &[u8], p: &BlkParams) -> Blk {
        if p.req == 0 || !p.req.is_multiple_of(SECTOR) || p.req > u32::MAX as u64 {
            error(format_args!("req= must be a non-zero multiple of 512"));
        }
        if p.depth == 0 || p.depth > MAX_DEPTH {
            error(format_args!("depth= must be 1 to {MAX_DEPTH}"));
        }
        let need = 4 * 4096 + p.depth as u64 * p.req;
        if need > p.size {
            error(format_args!(
                "{need:#x} bytes of driver memory do not fit size="
            ));
        }
        let Some(dev) =
            crate::virtio::devices(cmdline).find_map(|b| Device::probe(b, DEVICE_BLOCK))
        else {
            error(format_args!("no virtio-blk device on the command line"));
        };
        // A device offers FLUSH only when flushes reach its disk (Writeback).
        let Some(features) = dev.negotiate(F_FLUSH) else {
            error(format_args!("the device refused our features"));
        };
        let Some(q) = dev.queue(0, QUEUE_SIZE, p.start) else {
            error(format_args!("the device has no queue of {QUEUE_SIZE}"));
        };
        let capacity = dev.config32(0) as u64 | ((dev.config32(4) as u64) << 32);
        let mut blk = Blk {
            dev,
            q,
            flush: features & F_FLUSH != 0,
            capacity,
            headers: p.start + 3 * 4096,
            statuses: p.start + 3 * 4096 + 2048,
            data: p.start + 4 * 4096,
            req: p.req,
            depth: p.depth,
            hold_cycles: p.hold_cycles,
            slots: [Slot {
                busy: false,
                kind: 0,
                offset: 0,
            }; MAX_DEPTH],
            in_flight: 0,
        };
        if p.early {
            blk.submit(0, T_IN, 0, p.req as u32);
            blk.q.kick();
        }
        if !blk.dev.driver_ok() {
            error(format_args!(
                "the device failed to start (status {:#x})",
                blk.dev.status()
            ));
        }
        if p.early {
            let (_, status) = blk.complete();
            if status != 0 {
                error(format_args!(
                    "the request queued before DRIVER_OK failed: {status}"
                ));
            }
            println!("ferry-guest: blk request queued before DRIVER_OK completed");
        }
        println!(
            "ferry-guest: blk capacity {} sectors req={} depth={}",
            capacity, p.req, p.depth
        );
        blk
    }

    fn buffer(&self, slot: usize) -> u64 {
        self.data + slot as u64 * self.req
    }

    /// Offers a request in `slot`: `len` bytes at disk byte `offset`.
    fn submit(&mut self, slot: usize, kind: u32, offset: u64, len: u32) {
        let hdr = self.headers + 16 * slot as u64;
        // SAFETY: the header area is driver memory inside the checked work range.
        unsafe {
            core::ptr::write_volatile(hdr as *mut u32, kind);
            core::ptr::write_volatile((hdr + 4) as *mut u32, 0);
            core::ptr::write_volatile((hdr + 8) as *mut u64, offset / SECTOR);
        }
        let status = self.statuses + slot as u64;
        w8(status, S_PENDING);
        let d = 3 * slot as u16;
        self.q.set_desc(d, hdr, 16, false, Some(d + 1));
        let to_guest = kind == T_IN || kind == T_GET_ID;
        self.q
            .set_desc(d + 1, self.buffer(slot), len, to_guest, Some(d + 2));
        self.q.set_desc(d + 2, status, 1, true, None);
        self.slots[slot] = Slot {
            busy: true,
            kind,
            offset,
        };
        self.in_flight += 1;
        self.q.push(d);
    }

    /// Waits for one completion; returns its slot and status.
    fn complete(&mut self) -> (usize, u8) {
        let mut spins = 0u32;
        loop {
            if let Some((head, _len)) = self.q.pop() {
                let slot = head as usize / 3;
                if slot >= self.depth || !self.slots[slot].busy {
                    error(format_args!("the device completed unknown chain {head}"));
                }
                self.slots[slot].busy = false;
                self.in_flight -= 1;
                return (slot, r8(self.statuses + slot as u64));
            }
            // Reading a register traps to the VMM and waits for the device's lock, so
            // look only now and then.
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1 << 20)
                && self.dev.status() & crate::virtio::STATUS_NEEDS_RESET != 0
            {
                error(format_args!("the device needs a reset"));
            }
            core::hint::spin_loop();
        }
    }

    /// One request, waited for.
    fn single(&mut self, kind: u32, offset: u64, len: u32) -> u8 {
        self.submit(0, kind, offset, len);
        self.q.kick();
        self.complete().1
    }

    fn free_slot(&self) -> usize {
        self.slots[..self.depth]
            .iter()
            .position(|s| !s.busy)
            .unwrap_or(0)
    }

    fn fill(&self, slot: usize, offset: u64, pass: u64) {
        let buf = self.buffer(slot);
        for w in 0..self.req / 8 {
            // SAFETY: the data buffers are driver memory inside the checked work range.
            unsafe {
                core::ptr::write_volatile((buf + 8 * w) as *mut u64, check(offset / 8 + w, pass))
            };
        }
    }

    fn verify(&self, slot: usize, offset: u64, pass: u64) {
        let buf = self.buffer(slot);
        for w in 0..self.req / 8 {
            // SAFETY: as in `fill`.
            let got = unsafe { core::ptr::read_volatile((buf + 8 * w) as *const u64) };
            let want = check(offset / 8 + w, pass);
            if got != want {
                error(format_args!(
                    "pass {pass}: disk byte {:#x} reads {got:#x}, wrote {want:#x}",
                    offset + 8 * w
                ));
            }
        }
    }

    /// Runs `kind` requests over disk bytes `0..bytes`, keeping `depth` in flight.
    /// `before` runs as a slot is filled, `after` as it completes.
    fn stream(
        &mut self,
        kind: u32,
        bytes: u64,
        mut before: impl FnMut(&Blk, usize, u64),
        mut after: impl FnMut(&Blk, usize, u64),
    ) {
        let disk = self.capacity * SECTOR / self.req * self.req;
        let mut next = 0u64;
        while next < bytes || self.in_flight > 0 {
            while next < bytes && self.in_flight < self.depth {
                let slot = self.free_slot();
                let offset = next % disk;
                before(self, slot, offset);
                self.submit(slot, kind, offset, self.req as u32);
                next += self.req;
            }
            if self.hold_cycles != 0 {
                let held = rdtsc();
                while rdtsc().wrapping_sub(held) < self.hold_cycles {
                    core::hint::spin_loop();
                }
            }
            self.q.kick();
            // Holding, wait for every answer before queueing more: a request queued
            // while the device still works on the last notification is taken at once,
            // and would never wait in the ring.
            loop {
                let (slot, status) = self.complete();
                if status != S_OK {
                    let s = self.slots[slot];
                    error(format_args!(
                        "request type {} at byte {:#x} failed with status {status}",
                        s.kind, s.offset
                    ));
                }
                after(self, slot, self.slots[slot].offset);
                if self.hold_cycles == 0 || self.in_flight == 0 {
                    break;
                }
            }
        }
    }
}

/// Writes the pattern of each pass over the disk, reads it back and checks it.
pub fn run(cmdline: &[u8], p: &BlkParams) {
    let mut blk = Blk::open(cmdline, p);
    if blk.capacity * SECTOR < blk.req {
        error(format_args!("the disk is smaller than one request"));
    }
    let status = blk.single(T_GET_ID, 0, 20);
    if status != S_OK {
        error(format_args!("GET_ID failed with status {status}"));
    }
    let mut id = [0u8; 20];
    for (i, b) in id.iter_mut().enumerate() {
        *b = r8(blk.buffer(0) + i as u64);
    }
    let len = id.iter().position(|b| *b == 0).unwrap_or(20);
    println!(
        "ferry-guest: blk id {}",
        core::str::from_utf8(&id[..len]).unwrap_or("?")
    );
    let disk = blk.capacity * SECTOR / blk.req * blk.req;
    let mut pass = 1;
    loop {
        // Read-only: the pattern of pass 1 is on the disk already.
        let pattern = if p.readonly { 1 } else { pass };
        if !p.readonly {
            blk.stream(
                T_OUT,
                disk,
                |b, slot, off| b.fill(slot, off, pass),
                |_, _, _| {},
            );
        }
        if blk.flush && !p.readonly {
            let status = blk.single(T_FLUSH, 0, 0);
            if status != S_OK {
                error(format_args!("flush failed with status {status}"));
            }
        }
        blk.stream(
            T_IN,
            disk,
            |_, _, _| {},
            |b, slot, off| b.verify(slot, off, pattern),
        );
        println!("ferry-guest: blk pass {pass} ok ({disk} bytes)");
        check_keyboard();
        if p.passes != 0 && pass >= p.passes {
            break;
        }
        pass += 1;
    }
    // A read past the end must fail, not wrap or crash the VMM.
    let status = blk.single(T_IN, blk.capacity * SECTOR, SECTOR as u32);
    if status != S_IOERR {
        error(format_args!(
            "a read past the end returned status {status}, not IOERR"
        ));
    }
    println!("ferry-guest: blk read past the end: ioerr");
}

/// Times `total` bytes of sequential reads or writes.
pub fn bench(cmdline: &[u8], p: &BlkParams, tsc_khz: u64) {
    let mut blk = Blk::open(cmdline, p);
    if blk.capacity * SECTOR < blk.req {
        error(format_args!("the disk is smaller than one request"));
    }
    let kind = if p.write { T_OUT } else { T_IN };
    let t0 = rdtsc();
    blk.stream(kind, p.total, |_, _, _| {}, |_, _, _| {});
    let cycles = rdtsc() - t0;
    let ns = (cycles as u128 * 1_000_000 / tsc_khz.max(1) as u128) as u64;
    println!(
        "ferry-guest: blk-bench op={} req={} depth={} bytes={} ns={ns}",
        if p.write { "write" } else { "read" },
        p.req,
        p.depth,
        p.total
    );
}
