; Ferry's test guest: an SMP, interrupt-driven, self-checking raw disk image.
;
; Loaded at 0000:7c00 in real mode. Ferry loads the whole image; under a BIOS (QEMU)
; the boot sector reads the rest with INT 13h. The boot vCPU then
;   1. enters 32-bit protected mode, builds identity page tables (2 MiB pages) for the
;      first CFG_MAP_GIB GiB and enters long mode;
;   2. fills the IDT, routes COM1 (IRQ 4) and the PIT (IRQ 0) through the IOAPIC to
;      itself, masks the 8259s, starts the PIT at 100 Hz, sets up the UART with receive
;      interrupts and wakes the other vCPUs (INIT, SIPI, SIPI to the trampoline at 0x9000);
; and every vCPU (the others arrive through the trampoline, their APIC id their index)
;   3. enables its local APIC with a periodic timer (CFG_TICK ns, vector 0x40);
;   4. zeroes the first byte of every page of its stripe, then forever: increments the
;      first byte of every page of its stripe in ascending order (skipping the hole below
;      4 GiB), counts the pass in its own counter and, with `lock inc`, in the shared
;      total, and halts until its timer wakes it. vCPU 0 also queues a 'B' per pass for
;      the interrupt-driven serial output (the first byte is 'A').
; Interrupts: the LAPIC timer counts ticks per vCPU; the PIT counts ticks (the TSC is
; recorded when it starts and at the latest tick); COM1 sends the queued bytes on transmitter-empty
; interrupts and, on receive interrupts, counts each byte, keeps the last and echoes it.
; The memory check (TestGuestChecker.swift) reads it all back; the layout is
; TestGuestLayout.swift's. Ferry fills the configuration block at image offset 0x208
; (tag "FERRYSMP") for the machine it boots; `ferry guest-image --smp N --memory M`
; writes a copy for other VMMs. The committed image is for 1 vCPU and 512 MiB.
;
; Avoided because this host's nested KVM cannot emulate them: nothing needed so far.
;
; Build: guest/build.sh (nasm -f bin).

%define DATA        0x80000          ; shared counters (one page)
%define TOTAL       DATA + 0x00      ; qword: passes of all vCPUs (lock inc)
%define CPUS_UP     DATA + 0x08      ; qword: vCPUs that reached long mode
%define RX_COUNT    DATA + 0x10      ; qword: bytes received on COM1
%define RX_LAST     DATA + 0x18      ; byte: the last one
%define TX_HEAD     DATA + 0x20      ; byte: ring write index
%define TX_TAIL     DATA + 0x21      ; byte: ring read index
%define EXCEPTION   DATA + 0x38      ; qword: set when the guest took an exception
%define PIT_TICKS   DATA + 0x40      ; qword
%define PIT_FIRST   DATA + 0x48      ; qword: TSC when the PIT was started
%define PIT_LAST    DATA + 0x50      ; qword: TSC at the latest PIT tick
%define PERCPU      DATA + 0x100     ; 64 bytes per vCPU: passes, LAPIC ticks, halts
%define TX_RING     DATA + 0x800     ; 256 bytes
%define IDT         0x81000
%define PML4        0x10000
%define PDPT        0x11000
%define PD          0x12000
%define STACKS      0x60000          ; 4 KiB per vCPU
%define LAPIC       0xfee00000
%define IOAPIC      0xfec00000
%define COM1        0x3f8
%define AP_START    0x9000           ; the trampoline (image offset 0x1400)

bits 16
org 0x7c00

boot:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    cmp dword [stage2_sig], 'FRY2'
    je .loaded
    mov ax, 0x0200 + (image_end - stage2 + 511) / 512   ; BIOS: read the other sectors
    mov cx, 0x0002
    xor dh, dh
    mov bx, stage2
    int 0x13
.loaded:
    jmp stage2_code

times 510 - ($ - $$) db 0
    dw 0xaa55

stage2:
stage2_sig:     db "FRY2"
                dd 0
                db "FERRYSMP"
cfg_ncpus:      dd 1
cfg_tick:       dd 10000000          ; LAPIC timer initial count (KVM: 1 ns per count)
cfg_low_top:    dq 0x20000000        ; end of RAM below 4 GiB: the walk jumps to 4 GiB there
cfg_map_gib:    dd 4
                dd 0
cfg_stripes:    dq 0x100000, 0x20000000   ; per vCPU: first page, end (16 entries)
                times 15 dq 0, 0

align 8
gdt:
    dq 0                        ; null
    dq 0x00af9a000000ffff       ; 0x08: 64-bit code
    dq 0x00cf92000000ffff       ; 0x10: data, 4 GiB
    dq 0x00cf9a000000ffff       ; 0x18: 32-bit code
gdt_desc:
    dw gdt_desc - gdt - 1
    dd gdt
idt_desc:
    dw 256 * 16 - 1
    dq IDT

stage2_code:
    in al, 0x92                 ; fast A20; never set bit 0 (that resets the machine)
    or al, 2
    and al, 0xfe
    out 0x92, al
    lgdt [gdt_desc]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp dword 0x18:prot32

bits 32
prot32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x7c00
    mov edi, PML4               ; PML4 and PDPT
    mov ecx, 0x2000 / 4
    xor eax, eax
    rep stosd
    mov dword [PML4], PDPT | 3
    mov ecx, [cfg_map_gib]
    xor ebx, ebx
.pdpt:
    mov eax, ebx
    shl eax, 12
    add eax, PD | 3
    mov [PDPT + ebx * 8], eax
    inc ebx
    cmp ebx, ecx
    jb .pdpt
    shl ecx, 9                  ; 512 2-MiB entries per GiB
    xor ebx, ebx
.pd:
    mov eax, ebx
    shl eax, 21
    or eax, 0x83                ; present, writable, 2 MiB
    mov [PD + ebx * 8], eax
    mov eax, ebx
    shr eax, 11
    mov [PD + ebx * 8 + 4], eax
    inc ebx
    cmp ebx, ecx
    jb .pd
    xor esi, esi                ; the boot vCPU
enter_long:
    mov eax, cr4
    or eax, 0x20                ; PAE
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, 0xc0000080         ; EFER.LME
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    jmp 0x08:long64

bits 64
long64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    test esi, esi
    jnz ap64
    ; --- the boot vCPU sets up the machine ---
    mov rsp, STACKS + 0x1000
    xor ecx, ecx
.idt:
    lea rax, [default_isr]
    call set_gate
    inc ecx
    cmp ecx, 256
    jb .idt
    mov ecx, 0x20
    lea rax, [pit_isr]
    call set_gate
    mov ecx, 0x24
    lea rax, [serial_isr]
    call set_gate
    mov ecx, 0x40
    lea rax, [timer_isr]
    call set_gate
    mov ecx, 0xff
    lea rax, [spurious_isr]
    call set_gate
    mov ebx, LAPIC              ; the local APIC on first: a disabled one drops interrupts
    mov dword [rbx + 0xf0], 0x1ff
    mov al, 0xff                ; mask both 8259s: interrupts come through the IOAPIC
    out 0x21, al
    out 0xa1, al
    mov ebx, IOAPIC
    mov dword [rbx], 0x10       ; pin 0 (PIT) -> vector 0x20, fixed, APIC 0
    mov dword [rbx + 0x10], 0x20
    mov dword [rbx], 0x11
    mov dword [rbx + 0x10], 0
    mov dword [rbx], 0x18       ; pin 4 (COM1) -> vector 0x24, fixed, APIC 0
    mov dword [rbx + 0x10], 0x24
    mov dword [rbx], 0x19
    mov dword [rbx + 0x10], 0
    mov al, 0x34                ; PIT channel 0, mode 2, 100 Hz
    out 0x43, al
    mov al, 11932 & 0xff
    out 0x40, al
    mov al, 11932 >> 8
    out 0x40, al
    rdtsc                       ; the TSC when the PIT started: ticks count from here
    shl rdx, 32
    or rax, rdx
    mov [PIT_FIRST], rax
    mov dx, COM1 + 3            ; 8N1
    mov al, 0x03
    out dx, al
    mov dx, COM1 + 2            ; FIFO on, cleared
    mov al, 0x07
    out dx, al
    mov dx, COM1 + 4            ; DTR, RTS, OUT2
    mov al, 0x0b
    out dx, al
    mov dx, COM1 + 1            ; receive interrupts
    mov al, 0x01
    out dx, al
    mov al, 'A'
    call tx_enqueue
    cmp dword [cfg_ncpus], 1
    jbe .alone
    mov ebx, LAPIC + 0x300      ; ICR: INIT, then SIPI twice, to all but self
    mov dword [rbx], 0x000c4500
    call short_wait
    mov dword [rbx], 0x000c4600 | (AP_START >> 12)
    call short_wait
    mov dword [rbx], 0x000c4600 | (AP_START >> 12)
.alone:
    xor r14d, r14d
    jmp cpu_common

ap64:
    mov eax, LAPIC + 0x20       ; APIC id = vCPU index
    mov r14d, [rax]
    shr r14d, 24
    mov eax, r14d
    inc eax
    shl eax, 12
    add eax, STACKS
    mov rsp, rax

cpu_common:                     ; r14 = index, r15 = per-vCPU counters (both kept by the ISRs)
    mov r15, r14
    shl r15, 6
    add r15, PERCPU
    lidt [idt_desc]
    mov ebx, LAPIC
    mov dword [rbx + 0xf0], 0x1ff       ; enabled, spurious vector 0xff
    mov dword [rbx + 0x350], 0x10000    ; LINT0 masked
    mov dword [rbx + 0x3e0], 0x0b       ; divide by 1
    mov dword [rbx + 0x320], 0x20040    ; periodic, vector 0x40
    mov eax, [cfg_tick]
    mov [rbx + 0x380], eax
    lock inc qword [CPUS_UP]
    mov rsi, r14
    shl rsi, 4
    add rsi, cfg_stripes
    mov rcx, [cfg_low_top]
    mov rdx, 0x100000000
    mov rax, [rsi]
    mov rbx, [rsi + 8]
    cmp rax, rbx
    jae .zeroed
.zero:
    mov byte [rax], 0
    add rax, 4096
    cmp rax, rcx
    jne .zskip
    mov rax, rdx
.zskip:
    cmp rax, rbx
    jb .zero
.zeroed:
    sti
.pass:
    mov rax, [rsi]
    mov rbx, [rsi + 8]
    cmp rax, rbx
    jae .counted
.walk:
    inc byte [rax]
    add rax, 4096
    cmp rax, rcx
    jne .wskip
    mov rax, rdx
.wskip:
    cmp rax, rbx
    jb .walk
.counted:
    inc qword [r15]             ; this vCPU's passes
    lock inc qword [TOTAL]      ; everyone's
    test r14, r14
    jnz .halt
    push rdx
    mov al, 'B'
    cli
    call tx_enqueue
    sti
    pop rdx
.halt:
    inc qword [r15 + 16]
    hlt                         ; until the timer (or a device) interrupts
    jmp .pass

; rcx = vector, rax = handler (below 64 KiB): an interrupt gate in the IDT.
set_gate:
    push rbx
    push rdx
    mov rbx, rax
    and ebx, 0xffff
    mov rdx, 0x00008e0000080000
    or rbx, rdx
    mov rdx, rax
    shr rdx, 16
    shl rdx, 48
    or rbx, rdx
    mov rdx, rcx
    shl rdx, 4
    mov [IDT + rdx], rbx
    mov qword [IDT + rdx + 8], 0
    pop rdx
    pop rbx
    ret

short_wait:
    mov ecx, 2000
.w: dec ecx
    jnz .w
    ret

; al = byte: queue it for COM1 and enable transmitter-empty interrupts. Interrupts off.
tx_enqueue:
    push rbx
    push rdx
    movzx ebx, byte [TX_HEAD]
    mov [TX_RING + rbx], al
    inc bl
    cmp bl, [TX_TAIL]
    je .full                    ; ring full: the byte is dropped
    mov [TX_HEAD], bl
.full:
    mov dx, COM1 + 1
    mov al, 0x03
    out dx, al
    pop rdx
    pop rbx
    ret

eoi:
    push rax
    mov eax, LAPIC + 0xb0
    mov dword [rax], 0
    pop rax
    ret

timer_isr:
    inc qword [r15 + 8]
    call eoi
    iretq

pit_isr:
    push rax
    push rdx
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [PIT_LAST], rax
    inc qword [PIT_TICKS]
    call eoi
    pop rdx
    pop rax
    iretq

serial_isr:
    push rax
    push rbx
    push rdx
.next:
    mov dx, COM1 + 2
    in al, dx
    test al, 1
    jnz .done                   ; nothing pending
    and al, 0x0e
    cmp al, 0x04
    jne .thre
    mov dx, COM1                ; received: count, keep, echo
    in al, dx
    inc qword [RX_COUNT]
    mov [RX_LAST], al
    call tx_enqueue
    jmp .next
.thre:
    cmp al, 0x02
    jne .done
    movzx ebx, byte [TX_TAIL]
    cmp bl, [TX_HEAD]
    je .empty
    mov al, [TX_RING + rbx]
    mov dx, COM1
    out dx, al
    inc byte [TX_TAIL]
    jmp .next
.empty:
    mov dx, COM1 + 1            ; nothing to send: receive interrupts only
    mov al, 0x01
    out dx, al
    jmp .next
.done:
    call eoi
    pop rdx
    pop rbx
    pop rax
    iretq

spurious_isr:
    iretq

default_isr:                    ; an exception: mark it, say '!', stop this vCPU
    mov qword [EXCEPTION], 1
    mov dx, COM1
    mov al, '!'
    out dx, al
.stop:
    cli
    hlt
    jmp .stop

; --- the other vCPUs start here (SIPI vector 0x09) in real mode, CS = 0x0900 ---
times AP_START - 0x7c00 - ($ - $$) db 0
bits 16
ap_start:
    cli
    xor ax, ax
    mov ds, ax
    lgdt [gdt_desc]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp dword 0x18:ap_prot32
bits 32
ap_prot32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esi, 1
    jmp enter_long

align 512, db 0
image_end:
