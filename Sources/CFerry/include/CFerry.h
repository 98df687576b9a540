// What Swift cannot import by itself: kernel UAPI request numbers built with _IO*
// macros, variadic ioctl/syscall, flexible-array structs and signal plumbing.
// Every function returns >= 0 on success or -errno, never touching errno for the caller.
#ifndef CFERRY_H
#define CFERRY_H

#include <stdint.h>
#include <stddef.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>

// ---- request numbers (exported as constants; the macros do not import) ----
extern const unsigned long ferry_KVM_GET_API_VERSION;
extern const unsigned long ferry_KVM_CREATE_VM;
extern const unsigned long ferry_KVM_CHECK_EXTENSION;
extern const unsigned long ferry_KVM_GET_VCPU_MMAP_SIZE;
extern const unsigned long ferry_KVM_CREATE_VCPU;
extern const unsigned long ferry_KVM_SET_USER_MEMORY_REGION;
extern const unsigned long ferry_KVM_SET_TSS_ADDR;
extern const unsigned long ferry_KVM_SET_IDENTITY_MAP_ADDR;
extern const unsigned long ferry_KVM_RUN;
extern const unsigned long ferry_KVM_GET_REGS;
extern const unsigned long ferry_KVM_SET_REGS;
extern const unsigned long ferry_KVM_GET_SREGS;
extern const unsigned long ferry_KVM_SET_SREGS;
extern const unsigned long ferry_KVM_GET_FPU;
extern const unsigned long ferry_KVM_SET_FPU;
extern const unsigned long ferry_KVM_GET_XSAVE;
extern const unsigned long ferry_KVM_GET_XSAVE2;
extern const unsigned long ferry_KVM_SET_XSAVE;
extern const unsigned long ferry_KVM_GET_XCRS;
extern const unsigned long ferry_KVM_SET_XCRS;
extern const unsigned long ferry_KVM_GET_VCPU_EVENTS;
extern const unsigned long ferry_KVM_SET_VCPU_EVENTS;
extern const unsigned long ferry_KVM_GET_DEBUGREGS;
extern const unsigned long ferry_KVM_SET_DEBUGREGS;
extern const unsigned long ferry_KVM_GET_MP_STATE;
extern const unsigned long ferry_KVM_SET_MP_STATE;
extern const unsigned long ferry_KVM_GET_DIRTY_LOG;
extern const unsigned long ferry_KVM_CLEAR_DIRTY_LOG;
extern const unsigned long ferry_KVM_ENABLE_CAP;
extern const unsigned long ferry_KVM_CREATE_IRQCHIP;
extern const unsigned long ferry_KVM_CREATE_PIT2;
extern const unsigned long ferry_KVM_IRQ_LINE;
extern const unsigned long ferry_KVM_GET_IRQCHIP;
extern const unsigned long ferry_KVM_SET_IRQCHIP;
extern const unsigned long ferry_KVM_GET_PIT2;
extern const unsigned long ferry_KVM_SET_PIT2;
extern const unsigned long ferry_KVM_GET_LAPIC;
extern const unsigned long ferry_KVM_SET_LAPIC;
extern const unsigned long ferry_KVM_GET_CLOCK;
extern const unsigned long ferry_KVM_SET_CLOCK;
extern const unsigned long ferry_KVM_GET_TSC_KHZ;
extern const unsigned long ferry_UFFDIO_API;
extern const unsigned long ferry_UFFDIO_REGISTER;
extern const unsigned long ferry_UFFDIO_UNREGISTER;
extern const unsigned long ferry_UFFDIO_COPY;
extern const unsigned long ferry_UFFDIO_ZEROPAGE;
extern const unsigned long ferry_UFFDIO_WAKE;
extern const unsigned long ferry_USERFAULTFD_IOC_NEW;

// Capabilities that the installed (6.1) headers may lack.
#ifndef KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 168
#endif
#ifndef KVM_CAP_XSAVE2
#define KVM_CAP_XSAVE2 208
#endif
#ifndef KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE (1 << 0)
#endif
static const int ferry_KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
static const int ferry_KVM_CAP_XSAVE2 = KVM_CAP_XSAVE2;
static const int ferry_KVM_CAP_IMMEDIATE_EXIT = KVM_CAP_IMMEDIATE_EXIT;

// ---- non-variadic wrappers ----
int ferry_ioctl_ptr(int fd, unsigned long request, void *arg);
int ferry_ioctl_int(int fd, unsigned long request, unsigned long arg);
int ferry_userfaultfd_syscall(int flags);
int ferry_open_rw_cloexec(const char *path);

// ---- flexible-array structs ----
// Fills `indices` (capacity `max`) with the MSRs KVM saves for migration; returns count.
int ferry_kvm_msr_index_list(int kvm_fd, uint32_t *indices, int max);
// Reads/writes `n` MSRs; returns the number processed.
int ferry_kvm_get_msrs(int vcpu_fd, const uint32_t *indices, uint64_t *values, int n);
int ferry_kvm_set_msrs(int vcpu_fd, const uint32_t *indices, const uint64_t *values, int n);
// KVM_GET_SUPPORTED_CPUID into `entries` (capacity `max`); returns the count.
int ferry_kvm_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *entries, int max);
// KVM_SET_CPUID2 on the vCPU with `n` entries.
int ferry_kvm_set_cpuid(int vcpu_fd, const struct kvm_cpuid_entry2 *entries, int n);
// KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG on one slot.
int ferry_kvm_get_dirty_log(int vm_fd, uint32_t slot, void *bitmap);
int ferry_kvm_clear_dirty_log(int vm_fd, uint32_t slot, uint64_t first_page, uint32_t num_pages, void *bitmap);
int ferry_kvm_enable_cap(int fd, uint32_t cap, uint64_t arg0);

// ---- signals: a no-op handler whose only job is to interrupt KVM_RUN ----
int ferry_install_kick_handler(int signo);
int ferry_block_signal(int signo);
int ferry_unblock_signal(int signo);

// ---- atomics on plain memory (bitmaps shared between threads) ----
static inline uint64_t ferry_atomic_or64(uint64_t *p, uint64_t v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t ferry_atomic_and64(uint64_t *p, uint64_t v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t ferry_atomic_load64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline uint64_t ferry_atomic_exchange64(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline void ferry_atomic_store8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }

int ferry_set_thread_name(const char *name);
/// The calling thread's kernel thread id (what userfaultfd reports as the faulting thread).
int ferry_gettid(void);
/// Byte offset of kvm_run.mmio.data (inside an anonymous union Swift cannot take a key path through).
size_t ferry_kvm_run_mmio_data_offset(void);
/// Moves the calling thread into the network namespace open at `fd` (setns CLONE_NEWNET).
int ferry_setns_net(int fd);
int ferry_eventfd(unsigned int initial);
/* pipe2(fds, O_CLOEXEC): both ends close-on-exec from the start (no window for a
 * concurrent posix_spawn to inherit them). Returns 0 or -errno. */
int ferry_pipe_cloexec(int fds[2]);

// True when every byte of the 4 KiB page is zero (vectorised by the compiler).
int ferry_page_is_zero(const void *page);

// The test guest's "random" page contents: bytes 8..4095 of a page from a splitmix64
// stream seeded by (seed, page number); the first 8 bytes are the guest's (left alone).
void ferry_fill_page_random(void *page, uint64_t seed, uint64_t page_number);
// The first byte offset (8..4095) where `page` differs from that fill, or -1.
int ferry_check_page_random(const void *page, uint64_t seed, uint64_t page_number);

#endif
