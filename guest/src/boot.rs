//! Boot path and ring-0 code: the multiboot header, the 32-bit entry stub, the switch to long mode,
//! the exception stubs and the tiny ring-0 trap handler.
//!
//! Everything here runs in ring 0, which this machine's KVM *emulates* (~2 µs per instruction), so it
//! is kept to a few hundred instructions: the page tables, GDT and TSS are static data (no loops
//! build them), only the IDT (32 gates) and the TSS descriptor's base are filled at run time.
//!
//! Ring-3 → ring-0 calls use `ud2` with a magic value in RAX (see [`crate::sys`]); the #UD handler
//! honours them only when the saved CS is a ring-3 selector. Any other exception prints its vector,
//! error code, RIP, CS, RSP and CR2 on the serial port and halts.

use core::arch::global_asm;

/// RAX value of a `ud2` print request: RDI = pointer, RSI = length. Clobbers RAX, RDX, RDI, RSI.
pub const MAGIC_PRINT: u64 = 0x5050_0001;
/// RAX value of a `ud2` halt request: the vCPU stops (`cli; hlt`) for good.
pub const MAGIC_HALT: u64 = 0x5050_0002;
/// RAX value of a `ud2` map request: identity-map (2 MiB pages) from 4 GiB up to RDI (bytes), at
/// most [`MAPPED_LIMIT`]. Clobbers RAX, RDX, RDI, RSI.
pub const MAGIC_MAP: u64 = 0x5050_0003;

/// The static page tables identity-map the first 4 GiB; a map request can extend that to this limit.
pub const MAPPED_LIMIT: u64 = 64 << 30;
/// Always mapped by the static page tables.
pub const STATIC_MAPPED: u64 = 4 << 30;

/// COM1 data register (16550 THR).
const COM1: u16 = 0x3f8;
/// GDT selectors.
const KERNEL_CS: u16 = 0x08;
const KERNEL_DS: u16 = 0x10;
const USER_DS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;

extern "C" {
    static __bss_end: u8;
}

/// First byte after the guest image (its `.bss` included), page-aligned by the linker script.
pub fn image_end() -> u64 {
    // Only the address of the linker-defined symbol is taken (safe); it is never read.
    core::ptr::addr_of!(__bss_end) as u64
}

global_asm!(
    r#"
/* ---------------------------------------------------------------- multiboot (v1) header ---- */
    .pushsection .multiboot, "a"
    .balign 4
pp_mb_header:
    .long 0x1BADB002                                  /* magic */
    .long 0x00010003                                  /* page-align modules | memory info | address fields (a.out kludge) */
    .long (0 - (0x1BADB002 + 0x00010003)) & 0xffffffff /* checksum */
    .long pp_mb_header                                /* header_addr */
    .long __image_start                               /* load_addr */
    .long __load_end                                  /* load_end_addr */
    .long __bss_end                                   /* bss_end_addr */
    .long _start32                                    /* entry_addr */
    .popsection

/* ---------------------------------------------------------------- 32-bit entry -------------- */
/* Entered in flat 32-bit protected mode, paging off, EAX = 0x2BADB002, EBX = multiboot info.    */
    .pushsection .text.boot32, "ax"
    .code32
    .global _start32
_start32:
    cli
    movl %eax, %edi                 /* multiboot magic -> first argument of the ring-3 entry */
    movl %ebx, %esi                 /* multiboot info  -> second argument */
    lgdt pp_gdt_ptr
    movl %cr4, %eax
    orl $0x20, %eax                 /* CR4.PAE */
    movl %eax, %cr4
    movl $pp_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    ljmp ${kernel_cs}, $pp_start64

/* ---------------------------------------------------------------- 64-bit, ring 0 ------------ */
    .code64
pp_start64:
    movl ${kernel_ds}, %eax
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %fs
    movl %eax, %gs
    movq $pp_kstack_top, %rsp
    movl %edi, %edi                 /* upper halves are undefined after the mode switch */
    movl %esi, %esi

    /* TSS descriptor base (bits 63:32 are 0: the image is below 4 GiB). */
    movl $pp_tss, %eax
    movw %ax, pp_gdt_tss + 2
    shrl $16, %eax
    movb %al, pp_gdt_tss + 4
    movb %ah, pp_gdt_tss + 7
    movw ${tss_sel}, %ax
    ltr %ax

    /* IDT: 32 interrupt gates (DPL 0, IST 0) from the table of stub addresses. */
    movq $pp_idt, %rbx
    movq $pp_isr_table, %rcx
    movl $32, %edx
1:  movq (%rcx), %rax
    movw %ax, (%rbx)
    movw ${kernel_cs}, 2(%rbx)
    movw $0x8E00, 4(%rbx)
    shrq $16, %rax
    movw %ax, 6(%rbx)
    addq $16, %rbx
    addq $8, %rcx
    decl %edx
    jnz 1b
    lidt pp_idt_ptr

    /* iretq into ring 3 with IF = 0, IOPL = 0; RDI = magic, RSI = multiboot info. */
    pushq ${user_ds}
    pushq $pp_ustack_top - 8
    pushq $0x2
    pushq ${user_cs}
    pushq ${user_main}
    iretq

/* ---------------------------------------------------------------- exceptions ---------------- */
    .macro PP_ISR_NOERR v
pp_isr_\v:
    pushq $0
    pushq $\v
    jmp pp_isr_fatal
    .endm
    .macro PP_ISR_ERR v
pp_isr_\v:
    pushq $\v
    jmp pp_isr_fatal
    .endm

    PP_ISR_NOERR 0
    PP_ISR_NOERR 1
    PP_ISR_NOERR 2
    PP_ISR_NOERR 3
    PP_ISR_NOERR 4
    PP_ISR_NOERR 5
    PP_ISR_NOERR 7
    PP_ISR_ERR 8
    PP_ISR_NOERR 9
    PP_ISR_ERR 10
    PP_ISR_ERR 11
    PP_ISR_ERR 12
    PP_ISR_ERR 13
    PP_ISR_ERR 14
    PP_ISR_NOERR 15
    PP_ISR_NOERR 16
    PP_ISR_ERR 17
    PP_ISR_NOERR 18
    PP_ISR_NOERR 19
    PP_ISR_NOERR 20
    PP_ISR_ERR 21
    PP_ISR_NOERR 22
    PP_ISR_NOERR 23
    PP_ISR_NOERR 24
    PP_ISR_NOERR 25
    PP_ISR_NOERR 26
    PP_ISR_NOERR 27
    PP_ISR_NOERR 28
    PP_ISR_ERR 29
    PP_ISR_ERR 30
    PP_ISR_NOERR 31

/* #UD: a ring-3 `ud2` with a magic RAX is a request; anything else is fatal. */
pp_isr_6:
    testb $3, 8(%rsp)               /* saved CS: ring 3? */
    jz 9f
    cmpq ${magic_print}, %rax
    je 2f
    cmpq ${magic_map}, %rax
    je 4f
    cmpq ${magic_halt}, %rax
    je pp_halt
9:  pushq $0
    pushq $6
    jmp pp_isr_fatal

    /* print: RDI = pointer, RSI = length */
2:  movw ${com1}, %dx
3:  testq %rsi, %rsi
    jz 8f
    movb (%rdi), %al
    outb %al, %dx
    incq %rdi
    decq %rsi
    jmp 3b

    /* map: 2 MiB identity pages from 4 GiB up to min(RDI, 64 GiB) */
4:  movabsq ${mapped_limit}, %rsi
    cmpq %rsi, %rdi
    cmovaq %rsi, %rdi
    movabsq ${static_mapped}, %rax
    movq $pp_pd_high, %rdx
5:  cmpq %rdi, %rax
    jae 6f
    leaq 0x87(%rax), %rsi           /* present | writable | user | 2 MiB */
    movq %rsi, (%rdx)
    addq $8, %rdx
    addq $0x200000, %rax
    jmp 5b
6:  movq %cr3, %rax
    movq %rax, %cr3

8:  addq $2, (%rsp)                 /* skip the ud2 */
    iretq

pp_halt:
    cli
    hlt
    jmp pp_halt

/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. Prints them (and CR2), then halts. */
pp_isr_fatal:
    movq $pp_msg_exc, %rsi
    movl $pp_msg_exc_end - pp_msg_exc, %ecx
    call pp_put_str
    movq 0(%rsp), %rbx
    movl $2, %ecx
    call pp_put_hex
    movq $pp_msg_err, %rsi
    movl $5, %ecx
    call pp_put_str
    movq 8(%rsp), %rbx
    movl $16, %ecx
    call pp_put_hex
    movq $pp_msg_rip, %rsi
    movl $5, %ecx
    call pp_put_str
    movq 16(%rsp), %rbx
    movl $16, %ecx
    call pp_put_hex
    movq $pp_msg_cs, %rsi
    movl $4, %ecx
    call pp_put_str
    movq 24(%rsp), %rbx
    movl $4, %ecx
    call pp_put_hex
    movq $pp_msg_rsp, %rsi
    movl $5, %ecx
    call pp_put_str
    movq 40(%rsp), %rbx
    movl $16, %ecx
    call pp_put_hex
    movq $pp_msg_cr2, %rsi
    movl $5, %ecx
    call pp_put_str
    movq %cr2, %rbx
    movl $16, %ecx
    call pp_put_hex
    movq $pp_msg_nl, %rsi
    movl $2, %ecx
    call pp_put_str
    jmp pp_halt

/* RSI = string, RCX = length. Clobbers RAX, RDX, RSI, RCX. */
pp_put_str:
    movw ${com1}, %dx
1:  testq %rcx, %rcx
    jz 2f
    movb (%rsi), %al
    outb %al, %dx
    incq %rsi
    decq %rcx
    jmp 1b
2:  ret

/* RBX = value, RCX = number of low hex digits to print. Clobbers RAX, RBX, RCX, RDX. */
pp_put_hex:
    movl $16, %eax
    subl %ecx, %eax
    shll $2, %eax
    xchgl %eax, %ecx
    rolq %cl, %rbx
    movl %eax, %ecx
    movw ${com1}, %dx
1:  rolq $4, %rbx
    movl %ebx, %eax
    andl $15, %eax
    addl $48, %eax
    cmpl $58, %eax
    jb 2f
    addl $39, %eax
2:  outb %al, %dx
    decl %ecx
    jnz 1b
    ret
    .popsection

/* ---------------------------------------------------------------- read-only data ------------ */
    .pushsection .rodata.pp_boot, "a"
    .balign 8
pp_isr_table:
    .quad pp_isr_0, pp_isr_1, pp_isr_2, pp_isr_3, pp_isr_4, pp_isr_5, pp_isr_6, pp_isr_7
    .quad pp_isr_8, pp_isr_9, pp_isr_10, pp_isr_11, pp_isr_12, pp_isr_13, pp_isr_14, pp_isr_15
    .quad pp_isr_16, pp_isr_17, pp_isr_18, pp_isr_19, pp_isr_20, pp_isr_21, pp_isr_22, pp_isr_23
    .quad pp_isr_24, pp_isr_25, pp_isr_26, pp_isr_27, pp_isr_28, pp_isr_29, pp_isr_30, pp_isr_31
pp_msg_exc:
    .ascii "\r\nperfplus-guest: FATAL exception vector=0x"
pp_msg_exc_end:
pp_msg_err:
    .ascii " err="
pp_msg_rip:
    .ascii " rip="
pp_msg_cs:
    .ascii " cs="
pp_msg_rsp:
    .ascii " rsp="
pp_msg_cr2:
    .ascii " cr2="
pp_msg_nl:
    .ascii "\r\n"
    .popsection

/* ---------------------------------------------------------------- descriptor tables --------- */
    .pushsection .data.pp_boot, "aw"
    .balign 16
pp_gdt:
    .quad 0                         /* 0x00 null */
    .quad 0x00209A0000000000        /* 0x08 ring-0 code, 64-bit */
    .quad 0x00CF92000000FFFF        /* 0x10 ring-0 data */
    .quad 0x00CFF2000000FFFF        /* 0x18 ring-3 data */
    .quad 0x0020FA0000000000        /* 0x20 ring-3 code, 64-bit */
pp_gdt_tss:
    .quad 0x0000890000000067        /* 0x28 64-bit TSS, limit 103; base filled at boot */
    .quad 0
pp_gdt_end:
pp_gdt_ptr:
    .word pp_gdt_end - pp_gdt - 1
    .quad pp_gdt
pp_idt_ptr:
    .word 32 * 16 - 1
    .quad pp_idt
    .balign 16
pp_tss:
    .long 0
    .quad pp_kstack_top             /* RSP0: the stack traps from ring 3 land on */
    .quad 0, 0                      /* RSP1, RSP2 */
    .quad 0
    .quad 0, 0, 0, 0, 0, 0, 0       /* IST1..7 */
    .quad 0
    .word 0
    .word 104                       /* no I/O permission bitmap */
    .popsection

/* Identity map, 2 MiB pages, user-accessible: PML4[0] -> PDPT; PDPT[0..4] -> static PDs covering
   0..4 GiB; PDPT[4..64] -> zeroed PDs in .bss that a map request fills. */
    .pushsection .data.pagetables, "aw"
    .balign 4096
pp_pml4:
    .quad pp_pdpt + 7
    .fill 511, 8, 0
pp_pdpt:
    .set pp_i, 0
    .rept 4
    .quad pp_pd_low + pp_i * 4096 + 7
    .set pp_i, pp_i + 1
    .endr
    .set pp_i, 0
    .rept 60
    .quad pp_pd_high + pp_i * 4096 + 7
    .set pp_i, pp_i + 1
    .endr
    .fill 448, 8, 0
pp_pd_low:
    .set pp_a, 0
    .rept 2048
    .quad pp_a + 0x87
    .set pp_a, pp_a + 0x200000
    .endr
    .popsection

    .pushsection .bss.pagetables, "aw", @nobits
    .balign 4096
pp_pd_high:
    .skip 60 * 4096
pp_idt:
    .skip 32 * 16
    .balign 16
    .skip 16384
pp_kstack_top:
    .skip 256 * 1024
pp_ustack_top:
    .popsection
"#,
    kernel_cs = const KERNEL_CS,
    kernel_ds = const KERNEL_DS,
    user_cs = const USER_CS,
    user_ds = const USER_DS,
    tss_sel = const TSS_SEL,
    com1 = const COM1,
    magic_print = const MAGIC_PRINT,
    magic_map = const MAGIC_MAP,
    magic_halt = const MAGIC_HALT,
    mapped_limit = const MAPPED_LIMIT,
    static_mapped = const STATIC_MAPPED,
    user_main = sym crate::user_main,
    options(att_syntax)
);
