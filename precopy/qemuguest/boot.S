/* Multiboot (v1) entry of the precopy QEMU test guest: 32-bit protected
 * mode, no paging.  QEMU's -kernel loads this ELF and jumps to _start
 * with EAX = multiboot magic and EBX = the multiboot info. */
        .section .multiboot, "a"
        .align 4
        .long 0x1BADB002                /* magic */
        .long 0x00000002                /* flags: give us the memory map */
        .long -(0x1BADB002 + 0x00000002)

        .section .text
        .globl _start
_start:
        cli
        mov $stack_top, %esp
        push %ebx                       /* multiboot info */
        push %eax                       /* multiboot magic */
        call guest_main
1:      hlt
        jmp 1b

        .section .bss
        .align 16
stack:  .space 16384
stack_top:
