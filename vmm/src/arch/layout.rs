//! Guest-physical addresses of the structures ferry writes before the guest runs, sorted
//! by address. RAM itself is laid out by `memory::layout`.

use vm_memory::GuestAddress;

/// The boot GDT.
pub const BOOT_GDT: GuestAddress = GuestAddress(0x500);
/// The boot IDT (empty; the guest installs its own).
pub const BOOT_IDT: GuestAddress = GuestAddress(0x520);
/// Linux's `boot_params`, the "zero page"; RSI points here at entry.
pub const ZERO_PAGE: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK: GuestAddress = GuestAddress(0x8ff0);
/// Boot page tables: PML4, then one PDPT, then one PD (identity map of 1 GiB).
pub const PML4: GuestAddress = GuestAddress(0x9000);
/// The boot PDPT.
pub const PDPT: GuestAddress = GuestAddress(0xa000);
/// The boot PD.
pub const PD: GuestAddress = GuestAddress(0xb000);
/// The kernel command line.
pub const CMDLINE: GuestAddress = GuestAddress(0x20000);
/// Longest command line ferry passes; Linux x86's COMMAND_LINE_SIZE.
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA: GuestAddress = GuestAddress(0x9fc00);
/// End of conventional memory.
pub const EBDA_END: GuestAddress = GuestAddress(0xa0000);
/// Where the kernel is loaded: 1 MiB.
pub const HIMEM: GuestAddress = GuestAddress(0x10_0000);
