//! The transport and devices driven through their registers, with guest memory built in
//! the test: what a driver sees, including when it misbehaves.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use memory::GuestRam;
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::block::{Block, BlockState};
use super::{Mem, MmioTransport};

const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const DATA: u64 = 0x20000;
const QSIZE: u16 = 16;
const NEEDS_RESET: u32 = 64;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct Disk(PathBuf);

impl Disk {
    fn new(bytes: usize) -> Disk {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ferry-dev-{}-{n}.img", std::process::id()));
        let mut f = File::create(&path).expect("create disk");
        f.write_all(&vec![0u8; bytes]).expect("fill disk");
        Disk(path)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Rig {
    _ram: GuestRam,
    mem: Mem,
    t: MmioTransport,
    irq: EventFd,
    avail: u16,
    _disk: Disk,
}

fn block(disk: &Disk, read_only: bool) -> Box<Block> {
    Box::new(
        Block::new(BlockState {
            id: "disk0".into(),
            path: disk.0.clone(),
            read_only,
            writeback: false,
        })
        .expect("open disk"),
    )
}

impl Rig {
    /// A block device on a 64 KiB disk, configured by a well-behaved driver.
    fn new(read_only: bool) -> Rig {
        let mut rig = Rig::raw(read_only);
        rig.configure();
        assert_eq!(rig.status() & NEEDS_RESET, 0);
        rig
    }

    fn raw(read_only: bool) -> Rig {
        let ram = GuestRam::new(16, 46).expect("ram");
        let mem = ram.memory().clone();
        let disk = Disk::new(64 << 10);
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let t = MmioTransport::new(
            block(&disk, read_only),
            mem.clone(),
            irq.try_clone().expect("clone"),
        )
        .expect("transport");
        Rig {
            _ram: ram,
            mem,
            t,
            irq,
            avail: 0,
            _disk: disk,
        }
    }

    fn w(&mut self, offset: u64, v: u32) {
        self.t.write(offset, &v.to_le_bytes());
    }

    fn r(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn status(&mut self) -> u32 {
        self.r(0x70)
    }

    fn configure(&mut self) {
        self.configure_until_driver_ok();
        self.w(0x70, 15);
    }

    fn configure_until_driver_ok(&mut self) {
        self.w(0x70, 1);
        self.w(0x70, 3);
        self.w(0x24, 1);
        self.w(0x20, 1); // VERSION_1
        self.w(0x70, 11);
        self.w(0x30, 0);
        self.w(0x38, u32::from(QSIZE));
        for (reg, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
            self.w(reg, addr as u32);
            self.w(reg + 4, 0);
        }
        self.w(0x44, 1);
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, d).expect("desc");
        self.mem
            .write_obj(len, GuestAddress(d.0 + 8))
            .expect("desc");
        self.mem
            .write_obj(flags, GuestAddress(d.0 + 12))
            .expect("desc");
        self.mem
            .write_obj(next, GuestAddress(d.0 + 14))
            .expect("desc");
    }

    /// Offers chain `head` without notifying.
    fn offer(&mut self, head: u16) {
        let slot = GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail % QSIZE));
        self.mem.write_obj(head, slot).expect("avail");
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail, GuestAddress(AVAIL + 2))
            .expect("avail");
    }

    fn notify(&mut self) {
        self.w(0x50, 0);
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).expect("used")
    }

    fn used(&self, i: u16) -> (u32, u32) {
        let e = USED + 4 + 8 * u64::from(i % QSIZE);
        (
            self.mem.read_obj(GuestAddress(e)).expect("used"),
            self.mem.read_obj(GuestAddress(e + 4)).expect("used"),
        )
    }

    /// A three-descriptor request in descriptors 3s..3s+2, data at DATA + s * 4 KiB.
    fn request(
        &mut self,
        s: u16,
        kind: u32,
        sector: u64,
        len: u32,
    ) -> (GuestAddress, GuestAddress) {
        let hdr = GuestAddress(0x30000 + 16 * u64::from(s));
        let status = GuestAddress(0x31000 + u64::from(s));
        let data = GuestAddress(DATA + 0x1000 * u64::from(s));
        self.mem.write_obj(kind, hdr).expect("hdr");
        self.mem
            .write_obj(sector, GuestAddress(hdr.0 + 8))
            .expect("hdr");
        self.mem.write_obj(0xffu8, status).expect("status");
        let d = 3 * s;
        let data_flags = if kind == 0 || kind == 8 { F_WRITE } else { 0 };
        self.desc(d, hdr.0, 16, F_NEXT, d + 1);
        self.desc(d + 1, data.0, len, F_NEXT | data_flags, d + 2);
        self.desc(d + 2, status.0, 1, F_WRITE, 0);
        self.offer(d);
        (data, status)
    }

    fn status_byte(&self, status: GuestAddress) -> u8 {
        self.mem.read_obj(status).expect("status")
    }
}

#[test]
fn test_write_then_read_back_with_interrupts() {
    let mut rig = Rig::new(false);
    let (data, status) = rig.request(0, 1, 8, 4096);
    rig.mem.write_slice(&[0xab; 4096], data).expect("fill");
    rig.notify();
    assert_eq!(rig.status_byte(status), 0);
    assert_eq!(rig.used(0), (0, 1));
    assert_eq!(rig.irq.read().expect("interrupt raised"), 1);
    assert_eq!(rig.r(0x60) & 1, 1);
    rig.w(0x64, 1);
    assert_eq!(rig.r(0x60), 0);

    let (data, status) = rig.request(1, 0, 8, 4096);
    rig.notify();
    assert_eq!(rig.status_byte(status), 0);
    assert_eq!(rig.used(1), (3, 4097));
    let mut back = [0u8; 4096];
    rig.mem.read_slice(&mut back, data).expect("read");
    assert!(back.iter().all(|b| *b == 0xab));
    let m = rig.t.metrics();
    assert_eq!(
        (m["read_bytes"].as_u64(), m["write_bytes"].as_u64()),
        (Some(4096), Some(4096))
    );
}

#[test]
fn test_get_id_flush_unsupported_and_out_of_range() {
    let mut rig = Rig::new(false);
    let (data, id_status) = rig.request(0, 8, 0, 20);
    let (_, flush_status) = rig.request(1, 4, 0, 0);
    let (_, unsupp_status) = rig.request(2, 11, 0, 512);
    // The disk has 128 sectors: 127 + 2 runs past the end, as does a huge sector.
    let (_, past_status) = rig.request(3, 0, 127, 1024);
    let (_, huge_status) = rig.request(4, 0, u64::MAX / 256, 512);
    rig.notify();
    let mut id = [0u8; 20];
    rig.mem.read_slice(&mut id, data).expect("id");
    assert_eq!(&id[..6], b"disk0\0");
    assert_eq!(rig.status_byte(id_status), 0);
    assert_eq!(rig.status_byte(flush_status), 0);
    assert_eq!(rig.status_byte(unsupp_status), 2);
    assert_eq!(rig.status_byte(past_status), 1);
    assert_eq!(rig.status_byte(huge_status), 1);
    assert_eq!(rig.used_idx(), 5);
    assert_eq!(
        rig.status() & NEEDS_RESET,
        0,
        "request errors do not stop the device"
    );
}

#[test]
fn test_flush_is_offered_only_when_it_reaches_the_disk() {
    let disk = Disk::new(4096);
    let features = |writeback| {
        use super::VirtioDevice;
        Block::new(BlockState {
            id: "d".into(),
            path: disk.0.clone(),
            read_only: false,
            writeback,
        })
        .expect("open")
        .features()
    };
    let flush = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
    assert_eq!(features(false) & flush, 0, "Unsafe: no FLUSH");
    assert_ne!(features(true) & flush, 0, "Writeback: FLUSH");
}

#[test]
fn test_read_only_drive_refuses_writes() {
    let mut rig = Rig::new(true);
    assert_ne!(rig.r(0x10) & (1 << 5), 0, "VIRTIO_BLK_F_RO is offered");
    let (_, status) = rig.request(0, 1, 0, 512);
    rig.notify();
    assert_eq!(rig.status_byte(status), 1);
}

#[test]
fn test_config_space_and_identity() {
    let mut rig = Rig::new(false);
    assert_eq!(rig.r(0x0), 0x7472_6976);
    assert_eq!(rig.r(0x4), 2);
    assert_eq!(rig.r(0x8), 2);
    assert_eq!(rig.r(0x100), 128, "capacity in sectors");
    let mut wide = [0u8; 8];
    rig.t.read(0x100, &mut wide);
    assert_eq!(u64::from_le_bytes(wide), 128);
    // Past the config space, and unaligned or narrow register reads: zeros.
    assert_eq!(rig.r(0x108), 0);
    let mut narrow = [0xffu8; 2];
    rig.t.read(0x70, &mut narrow);
    assert_eq!(narrow, [0, 0]);
    assert_eq!(rig.r(0x71), 0);
}

#[test]
fn test_features_without_version_1_are_refused() {
    let mut rig = Rig::raw(false);
    rig.w(0x70, 1);
    rig.w(0x70, 3);
    rig.w(0x70, 11);
    assert_eq!(rig.status() & 8, 0, "FEATURES_OK must not stick");
}

fn assert_needs_reset(rig: &mut Rig) {
    assert_ne!(
        rig.status() & NEEDS_RESET,
        0,
        "the device must need a reset"
    );
    assert_ne!(rig.r(0x60) & 2, 0, "a config interrupt tells the driver");
    assert_eq!(rig.t.metrics()["needs_reset"], true);
}

#[test]
fn test_descriptor_outside_ram_stops_the_device() {
    let mut rig = Rig::new(false);
    let (_, status) = rig.request(0, 0, 0, 512);
    // Data buffer in the MMIO hole, then one that runs off the end of RAM.
    rig.desc(1, 0xd000_0000, 512, F_NEXT | F_WRITE, 2);
    rig.notify();
    assert_needs_reset(&mut rig);
    assert_eq!(rig.status_byte(status), 0xff, "nothing was done");
    assert_eq!(rig.used_idx(), 0);

    let mut rig = Rig::new(false);
    rig.request(0, 0, 0, 512);
    rig.desc(1, (16 << 20) - 256, 512, F_NEXT | F_WRITE, 2);
    rig.notify();
    assert_needs_reset(&mut rig);
}

#[test]
fn test_looping_and_dangling_chains_stop_the_device() {
    let mut rig = Rig::new(false);
    rig.desc(0, 0x30000, 16, F_NEXT, 1);
    rig.desc(1, DATA, 512, F_NEXT | F_WRITE, 0);
    rig.offer(0);
    rig.notify();
    assert_needs_reset(&mut rig);

    let mut rig = Rig::new(false);
    rig.desc(0, 0x30000, 16, F_NEXT, 200);
    rig.offer(0);
    rig.notify();
    assert_needs_reset(&mut rig);

    // A head index past the table.
    let mut rig = Rig::new(false);
    rig.offer(QSIZE + 3);
    rig.notify();
    assert_needs_reset(&mut rig);
}

#[test]
fn test_malformed_requests_stop_the_device() {
    // Header too short, status not writable, data in the wrong direction.
    for (d, addr, len, flags) in [
        (0, 0x30000, 8, F_NEXT),
        (2, 0x31000, 1, 0),
        (1, DATA, 512, F_NEXT),
    ] {
        let mut rig = Rig::new(false);
        rig.request(0, 0, 0, 512);
        let next = if flags & F_NEXT != 0 { d + 1 } else { 0 };
        rig.desc(d, addr, len, flags, next);
        rig.notify();
        assert_needs_reset(&mut rig);
    }
}

#[test]
fn test_avail_index_running_ahead_stops_the_device() {
    let mut rig = Rig::new(false);
    rig.mem
        .write_obj(QSIZE + 1, GuestAddress(AVAIL + 2))
        .expect("avail");
    rig.notify();
    assert_needs_reset(&mut rig);
}

#[test]
fn test_bad_queue_setup_stops_the_device() {
    // Not a power of two; larger than the maximum.
    for size in [3u32, 512, 0x1_0000] {
        let mut rig = Rig::raw(false);
        rig.w(0x30, 0);
        rig.w(0x38, size);
        assert_needs_reset(&mut rig);
    }
    // A queue that does not exist.
    let mut rig = Rig::raw(false);
    rig.w(0x30, 7);
    assert_eq!(rig.r(0x34), 0);
    rig.w(0x38, 16);
    assert_needs_reset(&mut rig);
    // Rings outside RAM found at DRIVER_OK.
    let mut rig = Rig::raw(false);
    rig.w(0x70, 1);
    rig.w(0x70, 3);
    rig.w(0x24, 1);
    rig.w(0x20, 1);
    rig.w(0x70, 11);
    rig.w(0x38, 16);
    rig.w(0x90, 0xd000_0000);
    rig.w(0x44, 1);
    rig.w(0x70, 15);
    assert_needs_reset(&mut rig);
    assert_eq!(rig.status() & 4, 0, "DRIVER_OK is not accepted");
}

#[test]
fn test_bad_register_writes_stop_the_device_and_reset_recovers() {
    let mut rig = Rig::new(false);
    rig.t.write(0x70, &[1, 2]);
    assert_needs_reset(&mut rig);
    rig.w(0x70, 0);
    assert_eq!(rig.status(), 0);
    assert_eq!(rig.t.error(), None);
    rig.avail = 0;
    rig.configure();
    let (_, status) = rig.request(0, 4, 0, 0);
    rig.notify();
    assert_eq!(rig.status_byte(status), 0, "works again after reset");

    for (offset, value) in [(0x71u64, 1u32), (0x0, 5), (0x38, 16)] {
        let mut rig = Rig::new(false);
        rig.w(offset, value);
        assert_needs_reset(&mut rig);
    }
}

#[test]
fn test_paused_device_holds_requests_and_saved_state_completes_them_once() {
    let mut rig = Rig::new(false);
    // One request completed before the pause.
    let (data, status) = rig.request(0, 1, 0, 512);
    rig.mem.write_slice(&[7; 512], data).expect("fill");
    rig.notify();
    assert_eq!(rig.status_byte(status), 0);

    rig.t.pause();
    let (data, write_status) = rig.request(1, 1, 1, 512);
    rig.mem.write_slice(&[9; 512], data).expect("fill");
    rig.notify();
    let (_, read_status) = rig.request(2, 0, 0, 1024);
    rig.notify();
    assert_eq!(rig.status_byte(write_status), 0xff, "paused: not taken");
    assert_eq!(rig.t.pending_requests(), vec![2]);

    let (transport, device) = rig.t.state();
    let json = serde_json::to_string(&(transport, device)).expect("serialize");
    let (transport, device): (super::TransportState, super::DeviceState) =
        serde_json::from_str(&json).expect("deserialize");
    rig.t.retire();
    let super::DeviceState::Block(state) = device else {
        panic!("not a block device")
    };
    let irq = rig.irq.try_clone().expect("clone");
    rig.t = MmioTransport::restore(
        Box::new(Block::new(state).expect("reopen")),
        rig.mem.clone(),
        irq,
        &transport,
    )
    .expect("restore");
    rig.t.resume();
    assert_eq!(rig.status_byte(write_status), 0);
    assert_eq!(rig.status_byte(read_status), 0);
    assert_eq!(rig.used_idx(), 3, "each request completed exactly once");
    let mut back = [0u8; 1024];
    rig.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x2000))
        .expect("read");
    assert!(back[..512].iter().all(|b| *b == 7) && back[512..].iter().all(|b| *b == 9));
    rig.notify();
    assert_eq!(rig.used_idx(), 3, "nothing is done twice");
}

#[test]
fn test_restore_refuses_state_that_does_not_fit() {
    let mut rig = Rig::new(false);
    let (mut transport, device) = rig.t.state();
    let super::DeviceState::Block(state) = device else {
        panic!("not a block device")
    };
    transport.queues[0].used_ring = 0xd000_0000;
    rig.t.retire();
    let irq = rig.irq.try_clone().expect("clone");
    let err = MmioTransport::restore(
        Box::new(Block::new(state.clone()).expect("reopen")),
        rig.mem.clone(),
        irq,
        &transport,
    )
    .err()
    .expect("rings outside RAM must be refused");
    assert!(
        err.contains("queues[0] is ready but its rings") && err.contains("not all in guest RAM"),
        "{err}"
    );
    let mut offered_not = transport.clone();
    offered_not.queues[0].used_ring = 0x12000;
    offered_not.driver_features = 1 << 40;
    let irq = rig.irq.try_clone().expect("clone");
    let err = MmioTransport::restore(
        Box::new(Block::new(state.clone()).expect("reopen")),
        rig.mem.clone(),
        irq,
        &offered_not,
    )
    .err()
    .expect("features never offered must be refused");
    assert!(err.contains("which the device never offered"), "{err}");
    transport.queues.push(transport.queues[0]);
    let irq = rig.irq.try_clone().expect("clone");
    assert!(MmioTransport::restore(
        Box::new(Block::new(state).expect("reopen")),
        rig.mem.clone(),
        irq,
        &transport
    )
    .is_err());
}

#[test]
fn test_device_writes_are_marked_dirty() {
    let mut rig = Rig::new(false);
    let tracked = rig._ram.tracked();
    rig.request(0, 0, 0, 4096);
    // Subscribed after the test's own writes (descriptors, header), which are marked too.
    let writes = tracked.writes.subscribe();
    rig.notify();
    let mut bitmap = memory::dirty::DirtyBitmap::new(&tracked.regions);
    writes.take_into(&mut bitmap);
    let pages: Vec<u64> = bitmap.guest_pages().map(|a| a.0).collect();
    assert!(pages.contains(&DATA), "the read's data page: {pages:x?}");
    assert!(pages.contains(&0x31000), "the status byte's page");
    assert!(pages.contains(&USED), "the used ring");
    assert_eq!(pages.len(), 3, "nothing else: {pages:x?}");
}

#[test]
fn test_a_trapped_notify_does_one_budget_and_leaves_the_rest_to_the_event_loop() {
    let mut rig = Rig::new(false);
    let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    rig.t.set_notifiers(vec![evt.try_clone().expect("clone")]);
    rig.t.set_budget(4);
    let (_, status) = rig.request(0, 4, 0, 0);
    for _ in 1..10 {
        rig.offer(0);
    }
    rig.notify();
    assert_eq!(rig.used_idx(), 4, "the vCPU does one budget");
    assert_eq!(evt.read().expect("the rest is handed on"), 1);
    // The event loop, as vmm::virtio does it on the ioeventfd.
    let mut rounds = 0;
    while evt.read().is_ok() || rounds == 0 {
        let more = rig.t.notify(0);
        rig.t.requeue(more);
        rounds += 1;
    }
    assert_eq!(rig.used_idx(), 10);
    assert_eq!(rounds, 2, "4 + 4 + 2, one budget per event");
    assert_eq!(rig.status_byte(status), 0);
}

#[test]
fn test_driver_ok_with_requests_waiting_does_one_budget() {
    let mut rig = Rig::raw(false);
    let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    rig.t.set_notifiers(vec![evt.try_clone().expect("clone")]);
    rig.t.set_budget(3);
    rig.configure_until_driver_ok();
    rig.request(0, 4, 0, 0);
    for _ in 1..7 {
        rig.offer(0);
    }
    rig.w(0x70, 15);
    assert_eq!(rig.used_idx(), 3);
    assert_eq!(evt.read().expect("the rest is handed on"), 1);
}

#[test]
fn test_config_space_writes_are_ignored_and_counted() {
    let mut rig = Rig::new(false);
    let before = rig.t.metrics()["guest_errors"].as_u64();
    rig.w(0x100, 0xdead);
    rig.w(0x200, 1);
    assert_eq!(rig.r(0x100), 128, "capacity is read-only");
    assert_eq!(
        rig.t.metrics()["guest_errors"].as_u64(),
        before.map(|b| b + 2)
    );
    assert_eq!(rig.status() & NEEDS_RESET, 0);
    let (_, status) = rig.request(0, 4, 0, 0);
    rig.notify();
    assert_eq!(rig.status_byte(status), 0, "the device still works");
}

/// Where fuzzed buffers mostly point: 128 KiB of data pages, after the headers.
const WINDOW: std::ops::Range<u64> = 0x30000..0x64000;

/// A descriptor address: mostly in the data window, sometimes hostile.
fn fuzz_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        9 => 0x40000u64..0x60000,
        1 => prop::sample::select(vec![
            0xd000_0000u64,
            0xc000_0000 - 8,
            (16 << 20) - 100,
            1 << 40,
            u64::MAX - 10,
            !0xfffu64,
        ]),
    ]
}

/// A buffer length: mostly whole sectors, as requests need, sometimes anything.
fn fuzz_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => (0u32..24).prop_map(|n| n * 512),
        1 => prop::sample::select(vec![1u32, 16]),
        1 => 0u32..0x3000,
    ]
}

/// The chain at `head` as the test's model reads it from the table: its buffers, and
/// whether it ends properly within the table.
fn model_chain(descs: &[(u64, u32, u16, u16)], head: u16) -> Vec<(u64, u32, bool)> {
    let mut out = Vec::new();
    let mut i = head;
    for _ in 0..QSIZE {
        let Some(&(addr, len, flags, next)) = descs.get(usize::from(i)) else {
            break;
        };
        out.push((addr, len, flags & F_WRITE != 0));
        if flags & F_NEXT == 0 {
            break;
        }
        i = next;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    /// Arbitrary descriptor tables and available rings, with mostly plausible buffers:
    /// every used element names a chain the guest offered, with no more bytes than its
    /// writable buffers hold, and no byte changes outside the writable buffers of the
    /// chains the device completed (and the used ring). It never panics.
    #[test]
    fn fuzz_descriptor_chains(
        descs in proptest::collection::vec((fuzz_addr(), fuzz_len(), 0u16..4, 0u16..20), 16),
        heads in proptest::collection::vec(0u16..20, 0..20),
        kinds in proptest::collection::vec((prop::sample::select(vec![0u32, 1, 4, 8, 11]), 0u64..140), 16),
    ) {
        let mut rig = Rig::new(false);
        let mut descs = descs;
        for (i, (kind, sector)) in kinds.iter().enumerate() {
            let hdr = GuestAddress(0x30000 + 16 * i as u64);
            rig.mem.write_obj(*kind, hdr).expect("hdr");
            rig.mem.write_obj(*sector, GuestAddress(hdr.0 + 8)).expect("hdr");
        }
        for (i, d) in descs.iter_mut().enumerate() {
            // Every other descriptor starts a plausible request: a header first.
            if i % 2 == 0 {
                d.0 = 0x30000 + 16 * (i as u64 / 2);
                d.1 = 16;
                d.2 = (d.2 | F_NEXT) & !F_WRITE;
            }
        }
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            rig.desc(i as u16, *addr, *len, *flags, *next);
        }
        let window_len = (WINDOW.end - WINDOW.start) as usize;
        let mut before = vec![0u8; window_len];
        rig.mem.read_slice(&mut before, GuestAddress(WINDOW.start)).expect("window");
        rig.mem.write_slice(&[0x5a; 4096], GuestAddress(0x80_0000)).expect("canary");
        for h in &heads {
            rig.offer(*h);
        }
        rig.notify();
        let used = rig.used_idx();
        prop_assert!(used <= rig.avail);
        let mut allowed: Vec<(u64, u64)> = Vec::new();
        for u in 0..used {
            let (id, len) = rig.used(u);
            let head = u16::try_from(id).expect("a descriptor index");
            prop_assert!(heads.contains(&head), "used id {id} was never offered");
            let chain = model_chain(&descs, head);
            let writable: u64 = chain.iter().filter(|c| c.2).map(|c| u64::from(c.1)).sum();
            prop_assert!(u64::from(len) <= writable, "used len {len} > writable {writable}");
            allowed.extend(chain.iter().filter(|c| c.2).map(|c| (c.0, c.0.saturating_add(u64::from(c.1)))));
        }
        let mut after = vec![0u8; window_len];
        rig.mem.read_slice(&mut after, GuestAddress(WINDOW.start)).expect("window");
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            if b != a {
                let addr = WINDOW.start + i as u64;
                prop_assert!(
                    allowed.iter().any(|(s, e)| addr >= *s && addr < *e),
                    "byte {addr:#x} changed outside every completed chain's writable buffers"
                );
            }
        }
        let mut canary = [0u8; 4096];
        rig.mem.read_slice(&mut canary, GuestAddress(0x80_0000)).expect("canary");
        prop_assert!(canary.iter().all(|b| *b == 0x5a));
    }

    /// Arbitrary register accesses of any width never panic and never leave the device
    /// in a state a driver could not see or leave: negotiated features are ones it
    /// offered, DRIVER_OK stands only on FEATURES_OK, and a reset always brings back a
    /// working device.
    #[test]
    fn fuzz_mmio_accesses(ops in proptest::collection::vec((0u64..0x140, 0usize..9, any::<u64>(), any::<bool>()), 1..64)) {
        let mut rig = Rig::raw(false);
        for (offset, width, value, write) in ops {
            let bytes = value.to_le_bytes();
            if write {
                rig.t.write(offset, &bytes[..width]);
            } else {
                let mut buf = vec![0u8; width];
                rig.t.read(offset, &mut buf);
            }
        }
        prop_assert_eq!(rig.r(0), 0x7472_6976);
        prop_assert_eq!(rig.r(0x8), 2, "still a block device");
        let status = rig.status();
        if status & 4 != 0 {
            prop_assert!(status & 8 != 0, "DRIVER_OK without FEATURES_OK: {:#x}", status);
        }
        rig.w(0x30, 0);
        prop_assert_eq!(rig.r(0x34), 256, "queue 0's maximum");
        rig.w(0x70, 0);
        prop_assert_eq!(rig.status(), 0);
        rig.avail = 0;
        rig.configure();
        prop_assert_eq!(rig.status() & NEEDS_RESET, 0);
        let (_, flushed) = rig.request(0, 4, 0, 0);
        rig.notify();
        prop_assert_eq!(rig.status_byte(flushed), 0, "a reset brings the device back");
    }
}
