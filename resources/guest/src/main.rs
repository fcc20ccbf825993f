//! ferry's test guest. It enters through the Linux 64-bit boot protocol (or PVH), does a
//! few dozen instructions at CPL0 (`entry.rs`), then runs everything else at CPL3, where
//! this machine's KVM runs guest code natively. Parameters come from the kernel command
//! line; results go to the serial console as plain lines.
//!
//! Command line (all optional):
//!   workload=idle|verify|dirty|rounds|fault   what to run (default idle). idle prints two
//!                                lines and halts at CPL0; fault ends the guest with a
//!                                triple fault, as every error does
//!   start=ADDR size=BYTES        the memory range to work on (K/M/G suffixes, 0x hex);
//!                                default: from 4 MiB to the end of that RAM range
//!   rate=PAGES                   pages written per second, 0 = as fast as possible
//!   passes=N                     stop after N passes and reboot, 0 = run forever
//!   mailbox=ADDR                 workload=rounds: the page the host uses to start rounds
//!
//! Device workloads (driver memory is the work range):
//!   workload=blk                 write a pattern over the first virtio-blk disk, read it
//!                                back and check it, `passes` times; then check that a
//!                                read past the end fails. With `op=read`, only read and
//!                                check: the host wrote pass 1's pattern
//!   workload=blk-bench           time `total` bytes of sequential `op=read|write`
//!   req=BYTES depth=N            request size (default 64K) and requests in flight
//!                                (default 16) for both
//!   hold=US                      blk: queue `depth` requests, wait this long, notify the
//!                                device and wait for every answer, as a driver batching
//!                                its notifications does
//!   workload=net                 echo frames on the first virtio-net device until
//!                                `passes` test frames went back (0 = forever)

#![no_std]
#![no_main]

mod blk;
mod boot;
mod console;
mod entry;
mod mem;
mod mptable;
mod net;
mod virtio;
mod workload;

use boot::{parse_size, BootInfo, BootKind};

extern "C" {
    static image_end: u8;
}

/// The i8042 command port; writing 0xfe pulses the CPU reset line.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Asks the VMM to end the VM the way a PC reboots, and waits for it to do so.
pub fn reboot() -> ! {
    console::outb(I8042_COMMAND, I8042_RESET);
    loop {
        core::hint::spin_loop();
    }
}

/// Ends the guest with a triple fault after an error has been printed: user code has no
/// way back to CPL0 here (see entry.rs), and the VMM reports a triple fault as a failure,
/// with a non-zero exit, which is what a broken guest run is.
pub fn fail() -> ! {
    // SAFETY: deliberately ends the guest; no IDT is loaded, so #UD escalates.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

fn arg_size(info: &BootInfo, key: &str, default: u64) -> Result<u64, &'static str> {
    match info.arg(key) {
        None => Ok(default),
        Some(v) => parse_size(v).ok_or(key_error(key)),
    }
}

fn key_error(key: &str) -> &'static str {
    match key {
        "start" => "start= is not a number",
        "size" => "size= is not a number",
        "rate" => "rate= is not a number",
        "mailbox" => "mailbox= is not a number",
        "req" => "req= is not a number",
        "depth" => "depth= is not a number",
        "total" => "total= is not a number",
        "hold" => "hold= is not a number",
        _ => "passes= is not a number",
    }
}

/// Finds the RAM range for the workload and checks it lies in usable, mapped RAM above
/// the guest image.
fn work_range(info: &BootInfo) -> Result<(u64, u64), &'static str> {
    let image_top = core::ptr::addr_of!(image_end) as u64;
    let start = arg_size(info, "start", 4 << 20)?;
    let ram = info
        .ranges()
        .iter()
        .find(|r| r.kind == 1 && r.start <= start && start < r.start + r.len)
        .ok_or("start= is not in usable RAM")?;
    let ram_end = (ram.start + ram.len).min(entry::MAPPED_LIMIT);
    let size = arg_size(info, "size", ram_end.saturating_sub(start))?;
    let end = start.checked_add(size).ok_or("start+size overflows")?;
    if start % 4096 != 0 || size % 4096 != 0 || size == 0 {
        return Err("start= and size= must be non-zero multiples of 4096");
    }
    if start < image_top {
        return Err("the range overlaps the guest image");
    }
    if end > ram_end {
        return Err("the range runs past usable, mapped RAM");
    }
    Ok((start, size))
}

/// The `rounds` workload's mailbox: a usable, mapped page outside the work range.
fn mailbox(info: &BootInfo, p: &workload::Params) -> Result<u64, &'static str> {
    let addr = arg_size(info, "mailbox", u64::MAX)?;
    if addr == u64::MAX {
        return Err("workload=rounds needs mailbox=ADDR");
    }
    let usable = info
        .ranges()
        .iter()
        .any(|r| r.kind == 1 && r.start <= addr && addr + 4096 <= r.start + r.len);
    let image_top = core::ptr::addr_of!(image_end) as u64;
    if addr % 4096 != 0 || !usable || addr + 4096 > entry::MAPPED_LIMIT || addr < image_top {
        return Err("mailbox= must be a page of usable RAM above the guest image");
    }
    if addr + 4096 > p.start && addr < p.start + p.size {
        return Err("mailbox= must lie outside the work range");
    }
    println!("ferry-guest: mailbox {addr:#x}");
    Ok(addr)
}

fn blk_params(info: &BootInfo, p: &workload::Params) -> Result<blk::BlkParams, &'static str> {
    let depth = arg_size(info, "depth", 16)?;
    if depth == 0 || depth > blk::MAX_DEPTH as u64 {
        return Err("depth= must be 1 to 85");
    }
    let write = match info.arg("op") {
        None | Some(b"read") => false,
        Some(b"write") => true,
        Some(_) => return Err("op= must be read or write"),
    };
    let hold = arg_size(info, "hold", 0)?;
    if hold != 0 && p.tsc_khz == 0 {
        return Err("hold= needs the TSC frequency, which the VMM did not give");
    }
    if hold > 1_000_000 {
        return Err("hold= must be at most 1000000 (one second)");
    }
    Ok(blk::BlkParams {
        start: p.start,
        size: p.size,
        req: arg_size(info, "req", 64 << 10)?,
        depth: depth as usize,
        passes: p.passes,
        total: arg_size(info, "total", 256 << 20)?,
        write,
        readonly: info.arg("op") == Some(b"read"),
        early: info.arg("early") == Some(b"1"),
        hold_cycles: hold * p.tsc_khz / 1000,
    })
}

/// Entered at CPL3 from `entry.rs`.
/// `tsc_khz` comes from the hypervisor timing leaf 0x40000010, read at CPL0.
extern "C" fn guest_main(kind: u64, ptr: u64, tsc_khz: u64) -> ! {
    let kind = if kind == 1 {
        BootKind::Pvh
    } else {
        BootKind::Linux
    };
    println!(
        "ferry-guest: start boot={}",
        if kind == BootKind::Pvh {
            "pvh"
        } else {
            "linux64"
        }
    );
    let Some(info) = BootInfo::parse(kind, ptr) else {
        println!("ferry-guest: error: bad boot information at {ptr:#x}");
        fail();
    };
    let cmdline = core::str::from_utf8(info.cmdline).unwrap_or("<not utf-8>");
    println!("ferry-guest: cmdline {cmdline}");
    for r in info.ranges() {
        let kind = if r.kind == 1 { "ram" } else { "reserved" };
        println!(
            "ferry-guest: e820 {:#x}-{:#x} {kind}",
            r.start,
            r.start + r.len
        );
    }
    match mptable::count_cpus() {
        mptable::MpResult::Cpus(n) => println!("ferry-guest: cpus {n}"),
        mptable::MpResult::Missing => println!("ferry-guest: cpus unknown (no MP table)"),
        mptable::MpResult::Corrupt => println!("ferry-guest: error: MP table is corrupt"),
    }
    let khz = tsc_khz;
    println!("ferry-guest: tsc_khz {khz}");

    // entry.rs has already handled `idle` (and a missing workload) at CPL0.
    let workload = info.arg("workload").unwrap_or(b"");
    if workload == b"fault" {
        // The VMM must report the triple fault, naming the vCPU and RIP.
        println!("ferry-guest: triple fault on purpose");
        fail();
    }
    let params = work_range(&info).and_then(|(start, size)| {
        let rate = arg_size(&info, "rate", 0)?;
        let passes = arg_size(&info, "passes", 0)?;
        if rate != 0 && khz == 0 {
            return Err("rate= needs the TSC frequency, which the VMM did not give");
        }
        Ok(workload::Params {
            start,
            size,
            rate,
            passes,
            tsc_khz: khz,
        })
    });
    let params = match params {
        Ok(p) => p,
        Err(e) => {
            println!("ferry-guest: error: {e}");
            fail();
        }
    };
    let name = core::str::from_utf8(workload).unwrap_or("?");
    println!(
        "ferry-guest: workload {name} start={:#x} size={:#x} rate={} passes={}",
        params.start, params.size, params.rate, params.passes
    );
    match workload {
        b"verify" => workload::verify(&params),
        b"dirty" => workload::dirty(&params),
        b"blk" | b"blk-bench" => {
            let blk = blk_params(&info, &params).unwrap_or_else(|e| {
                println!("ferry-guest: error: {e}");
                fail();
            });
            if workload == b"blk" {
                blk::run(info.cmdline, &blk);
            } else {
                blk::bench(info.cmdline, &blk, khz);
            }
        }
        b"net" => net::run(info.cmdline, params.start, params.size, params.passes),
        b"rounds" => match mailbox(&info, &params) {
            Ok(addr) => workload::rounds(&params, addr),
            Err(e) => {
                println!("ferry-guest: error: {e}");
                fail();
            }
        },
        _ => {
            println!("ferry-guest: error: unknown workload {name}");
            fail();
        }
    }
    println!("ferry-guest: done");
    reboot();
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("ferry-guest: panic: {info}");
    fail();
}
