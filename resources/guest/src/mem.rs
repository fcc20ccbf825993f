//! The memory primitives `core` expects. Written in assembly because a Rust loop here
//! may itself be turned into a call to the function being defined.

core::arch::global_asm!(
    r#"
    .section .text
    .global memcpy
    .global memmove
memcpy:
memmove:
    mov rax, rdi
    cmp rdi, rsi
    jbe 2f
    lea r8, [rsi + rdx]
    cmp rdi, r8
    jae 2f
    lea rsi, [rsi + rdx - 1]    /* overlapping, destination above: copy backwards */
    lea rdi, [rdi + rdx - 1]
    mov rcx, rdx
    std
    rep movsb
    cld
    ret
2:
    mov rcx, rdx
    rep movsb
    ret

    .global memset
memset:
    mov r8, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r8
    ret

    .global memcmp
    .global bcmp
memcmp:
bcmp:
    xor eax, eax
    test rdx, rdx
    jz 4f
3:
    movzx eax, byte ptr [rdi]
    movzx ecx, byte ptr [rsi]
    sub eax, ecx
    jnz 4f
    inc rdi
    inc rsi
    dec rdx
    jnz 3b
4:
    ret
    "#
);
