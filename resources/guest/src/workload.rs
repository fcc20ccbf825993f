//! The memory workloads. Everything here runs at CPL3, natively.

use crate::println;

const PAGE: u64 = 4096;

/// What a workload works on.
pub struct Params {
    /// First byte of the range.
    pub start: u64,
    /// Length of the range.
    pub size: u64,
    /// Pages per second, 0 = unthrottled.
    pub rate: u64,
    /// Passes before stopping, 0 = forever.
    pub passes: u64,
    /// TSC frequency, 0 = unknown.
    pub tsc_khz: u64,
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter; CR4.TSD is clear.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Holds page writes to `rate` pages per second by spinning on the TSC.
struct Throttle {
    cycles_per_page: u64,
    deadline: u64,
}

impl Throttle {
    fn new(p: &Params) -> Throttle {
        // 0 (unthrottled) when rate is 0.
        let cycles_per_page = (p.tsc_khz * 1000)
            .checked_div(p.rate)
            .map_or(0, |c| c.max(1));
        Throttle {
            cycles_per_page,
            deadline: rdtsc(),
        }
    }

    fn page_done(&mut self) {
        if self.cycles_per_page == 0 {
            return;
        }
        self.deadline += self.cycles_per_page;
        let mut now = rdtsc();
        // After a long stop (pause, migration) do not burst to catch up.
        if now > self.deadline + self.cycles_per_page * 1024 {
            self.deadline = now;
        }
        while now < self.deadline {
            core::hint::spin_loop();
            now = rdtsc();
        }
    }
}

fn read(addr: u64) -> u64 {
    // SAFETY: `work_range` checked that the range is usable RAM that our page tables map.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn write(addr: u64, v: u64) {
    // SAFETY: as in `read`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// The per-page check word for `page` in `pass` (splitmix64), never equal for two passes.
pub fn check(page: u64, pass: u64) -> u64 {
    let mut z = page ^ (pass << 48) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Reboots on Ctrl-Alt-Del, as a PC guest does; polled once per pass.
pub fn check_keyboard() {
    if crate::console::ctrl_alt_del_pressed() {
        println!("ferry-guest: ctrl-alt-del, rebooting");
        crate::reboot();
    }
}

/// Each pass checks that every page still holds what the previous pass wrote (pass
/// number at the start, the check word just after it and again in the last word), then
/// writes this pass's values. A page that lost a write shows up as a corruption.
pub fn verify(p: &Params) {
    let mut throttle = Throttle::new(p);
    let mut pass = 1;
    loop {
        let mut bad = 0u64;
        let mut first = (0, 0, 0, 0);
        let mut page = p.start;
        while page < p.start + p.size {
            let held = (read(page), read(page + 8), read(page + PAGE - 8));
            let prev = pass - 1;
            let want = if prev == 0 { 0 } else { check(page, prev) };
            if held != (prev, want, want) {
                if bad == 0 {
                    first = (page, held.0, held.1, held.2);
                }
                bad += 1;
            }
            let now = check(page, pass);
            write(page, pass);
            write(page + 8, now);
            write(page + PAGE - 8, now);
            throttle.page_done();
            page += PAGE;
        }
        check_keyboard();
        if bad == 0 {
            println!("pass {pass} ok");
        } else {
            let (addr, h0, h1, h2) = first;
            println!(
                "pass {pass} corrupt page {addr:#x} held {h0:#x} {h1:#x} {h2:#x} expected {:#x} {:#x} ({bad} pages bad)",
                pass - 1,
                if pass == 1 { 0 } else { check(addr, pass - 1) }
            );
        }
        if pass == p.passes {
            return;
        }
        pass += 1;
    }
}

/// Whether `page` is written in `round` of the `rounds` workload: a pseudo-random
/// quarter of the pages. Tests compute the same set (vmm/tests/dirty.rs).
pub fn in_round(page: u64, round: u64) -> bool {
    check(page, round).is_multiple_of(4)
}

/// Rounds driven by the host, for exact dirty-tracking tests: the guest waits until the
/// mailbox word holds a round number it has not done, writes that round's pages, then
/// stores the round number in the mailbox's second word.
pub fn rounds(p: &Params, mailbox: u64) {
    let mut done = 0;
    loop {
        let round = read(mailbox);
        if round <= done {
            core::hint::spin_loop();
            continue;
        }
        let mut page = p.start;
        while page < p.start + p.size {
            if in_round(page, round) {
                write(page, round);
            }
            page += PAGE;
        }
        write(mailbox + 8, round);
        done = round;
    }
}

/// Writes one word per page, sweeping the range, at the given rate. Reports progress at
/// most once a second (every 1024 sweeps when the TSC rate is unknown).
pub fn dirty(p: &Params) {
    let mut throttle = Throttle::new(p);
    let report_every = p.tsc_khz * 1000;
    let mut last_report = rdtsc();
    let mut pass = 1;
    loop {
        let mut page = p.start;
        while page < p.start + p.size {
            write(page, pass);
            throttle.page_done();
            page += PAGE;
        }
        check_keyboard();
        let now = rdtsc();
        let due = if report_every == 0 {
            pass % 1024 == 0
        } else {
            now - last_report >= report_every
        };
        if due || pass == p.passes || p.rate != 0 {
            println!("dirty pass {pass} pages {}", p.size / PAGE);
            last_report = now;
        }
        if pass == p.passes {
            return;
        }
        pass += 1;
    }
}
