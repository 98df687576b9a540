; Ferry's test guest: a 512-byte boot sector.
;
; Loaded at 0000:7c00 in real mode (as a BIOS hands over, DL = boot drive), it
;   1. enables A20 through port 0x92 and enters 32-bit protected mode with flat
;      4 GiB code and data segments;
;   2. writes 'A' to COM1 (port 0x3f8);
;   3. zeroes the first byte of every 4 KiB page from 1 MiB up to TOP;
;   4. forever: increments the first byte of every page from 1 MiB up to TOP in
;      ascending order, then writes 'B' to COM1 (one 'B' per full pass).
; Memory therefore always satisfies the migration memory check: every page byte
; equal, except one step where the guest currently is (see MemoryChecker.swift).
;
; TOP is a little-endian 32-bit field at image offset 0x1f8, right after the
; 8-byte tag "FERRYTOP" at 0x1f0. Ferry fills it from the guest's RAM size;
; `ferry guest-image --memory 512M --output PATH` writes a copy for other VMMs.
; The committed image has TOP = 512 MiB.
;
; Build: nasm -f bin -o testguest.img testguest.asm   (guest/build.sh)

bits 16
org 0x7c00

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    in al, 0x92             ; fast A20 gate; never set bit 0 (that resets the machine)
    or al, 2
    and al, 0xfe
    out 0x92, al
    lgdt [gdt_descriptor]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp dword 0x08:protected

bits 32
protected:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    mov esp, 0x7c00
    mov dx, 0x3f8
    mov al, 'A'
    out dx, al
    mov ebx, [top]
    mov eax, 0x100000
.zero:
    mov byte [eax], 0
    add eax, 4096
    cmp eax, ebx
    jb .zero
.pass:
    mov eax, 0x100000
.increment:
    inc byte [eax]
    add eax, 4096
    cmp eax, ebx
    jb .increment
    mov al, 'B'
    out dx, al
    jmp .pass

align 8
gdt:
    dq 0                        ; null
    dq 0x00cf9a000000ffff       ; 0x08: code, base 0, limit 4 GiB, 32-bit
    dq 0x00cf92000000ffff       ; 0x10: data, base 0, limit 4 GiB
gdt_descriptor:
    dw gdt_descriptor - gdt - 1
    dd gdt

times 0x1f0 - ($ - $$) db 0
    db "FERRYTOP"
top:
    dd 0x20000000               ; TOP: 512 MiB
    dw 0
    dw 0xaa55
