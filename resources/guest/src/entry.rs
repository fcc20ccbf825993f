//! CPL0 entry: the only code that runs in kernel mode, which this machine emulates one
//! instruction at a time. It loads our own page tables (user bit set) and GDT (user
//! segments), enables SSE, and drops to CPL3 with IOPL=3 so user code can do port I/O.
//!
//! Under kvm_pvm a non-PVM guest cannot get from CPL3 back to CPL0 (interrupt gates
//! fail to emulate; a SYSCALL target cannot HLT; a loaded TSS breaks CPL3 port I/O). So
//! the one workload that needs CPL0, `idle` (HLT), is recognised here, before the drop,
//! with string instructions, which the emulator runs fast.
//!
//! Both boot protocols reach `common64` with rdi = boot kind (0 Linux, 1 PVH) and rsi =
//! the boot information pointer. `iretq` hands these unchanged to `guest_main`, with
//! rdx = the TSC frequency in kHz (0 when the VMM does not say).

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a"
    .balign 4
    .long 4                 /* name size: "Xen\0" */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start32

    .section .rodata.boot, "a"
key_rest:
    .ascii "orkload="
idle_value:
    .ascii "idle"
idle_banner_linux:
    .ascii "ferry-guest: start boot=linux64\nferry-guest: idle\n"
idle_banner_linux_end:
idle_banner_pvh:
    .ascii "ferry-guest: start boot=pvh\nferry-guest: idle\n"
idle_banner_pvh_end:
    .set IDLE_LINUX_LEN, idle_banner_linux_end - idle_banner_linux
    .set IDLE_PVH_LEN, idle_banner_pvh_end - idle_banner_pvh

    .section .text.boot, "ax"
    .code32
    .global _start32
_start32:                   /* PVH: 32-bit protected mode, paging off, ebx = start_info */
    mov esi, ebx
    mov eax, offset pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20            /* PAE */
    mov cr4, eax
    mov ecx, 0xc0000080     /* EFER */
    rdmsr
    or eax, 0x100           /* LME */
    wrmsr
    mov eax, cr0
    or eax, 0x80000001      /* PG | PE */
    mov cr0, eax
    lgdt [gdt_ptr]
    .byte 0xea              /* ljmp 0x08:pvh64 */
    .long pvh64
    .word 0x08

    .code64
pvh64:
    mov esi, esi            /* upper halves are undefined after the mode switch */
    mov edi, 1              /* boot kind: PVH */
    jmp common64

    .global _start64
_start64:                   /* Linux 64-bit boot protocol: rsi = boot_params */
    xor edi, edi            /* boot kind: Linux */
common64:
    lea rax, [rip + pml4]
    mov cr3, rax
    lgdt [rip + gdt_ptr]
    mov eax, 0x10
    mov ds, eax
    mov es, eax
    mov ss, eax
    mov fs, eax
    mov gs, eax
    mov rax, cr4
    or eax, 0x620           /* PAE | OSFXSR | OSXMMEXCPT: user code uses SSE */
    mov cr4, rax
    mov rax, cr0
    and eax, 0xfffffffb     /* clear EM */
    or eax, 0x2             /* MP */
    mov cr0, rax
    mov r12, rdi
    mov r13, rsi

    /* The command line: boot_params.hdr.cmd_line_ptr (+ ext_cmd_line_ptr), or
       hvm_start_info.cmdline_paddr. */
    test edi, edi
    jnz 2f
    mov eax, [rsi + 0x228]
    mov edx, [rsi + 0xc8]
    shl rdx, 32
    or rax, rdx
    jmp 3f
2:
    mov rax, [rsi + 24]
3:
    /* Idle unless "workload=" names something else. */
    test rax, rax
    jz idle
    mov r14, rax
    mov rdi, rax
    xor eax, eax
    mov ecx, 4096
    repne scasb             /* rdi = one past the NUL */
    mov rcx, rdi
    mov rdi, r14
    sub rcx, rdi            /* bytes to search, NUL included */
find_key:
    mov al, 'w'
    repne scasb
    jne idle                /* no "workload=": idle */
    mov r15, rcx
    mov rbx, rdi
    lea rsi, [rip + key_rest]
    mov ecx, 8              /* "orkload=" */
    repe cmpsb
    je key_found
    mov rdi, rbx
    mov rcx, r15
    jmp find_key
key_found:
    lea rsi, [rip + idle_value]
    mov ecx, 4              /* "idle" */
    repe cmpsb
    jne to_user
    mov al, [rdi]
    test al, al
    jz idle
    cmp al, ' '
    je idle
    jmp to_user

idle:
    lea rsi, [rip + idle_banner_linux]
    mov ecx, offset IDLE_LINUX_LEN
    test r12, r12
    jz 6f
    lea rsi, [rip + idle_banner_pvh]
    mov ecx, offset IDLE_PVH_LEN
6:
    mov edx, 0x3f8
    rep outsb
halt_forever:
    cli
    hlt
    jmp halt_forever

to_user:
    /* CPUID at CPL3 runs natively on the host CPU here, so the VMM's table is only
       visible from CPL0: read the hypervisor timing leaf (TSC kHz) now. */
    xor r9d, r9d
    mov eax, 0x40000000
    xor ecx, ecx
    cpuid
    cmp eax, 0x40000010
    jb 7f
    mov eax, 0x40000010
    xor ecx, ecx
    cpuid
    mov r9d, eax
7:
    mov rdx, r9
    mov rdi, r12
    mov rsi, r13
    push 0x1b               /* SS: user data */
    lea rax, [rip + user_stack_top - 8]
    push rax
    push 0x3002             /* RFLAGS: IOPL=3, IF=0 */
    push 0x23               /* CS: user code */
    lea rax, [rip + {main}]
    push rax
    iretq


    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .set gib, 0
    .rept 8
    .quad pd + gib * 0x1000 + 0x7
    .set gib, gib + 1
    .endr
    .fill 504, 8, 0
pd:                         /* identity map of the first 8 GiB, 2 MiB pages, P|W|U|PS */
    .set page, 0
    .rept 4096
    .quad (page << 21) | 0x87
    .set page, page + 1
    .endr

    .balign 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf93000000ffff    /* 0x10 kernel data */
    .quad 0x00cff3000000ffff    /* 0x18 user data */
    .quad 0x00affb000000ffff    /* 0x20 user code, 64-bit */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .section .bss
    .balign 16
    .skip 65536
user_stack_top:
    "#,
    main = sym crate::guest_main,
);

/// Highest guest-physical address (exclusive) that our page tables map.
pub const MAPPED_LIMIT: u64 = 8 << 30;
