//! x86_64 specifics: where boot structures go, CPUID, registers, the MP table and the
//! Linux boot protocol.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
