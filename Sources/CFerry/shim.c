#define _GNU_SOURCE
#include "CFerry.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <pthread.h>

const unsigned long ferry_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
const unsigned long ferry_KVM_CREATE_VM = KVM_CREATE_VM;
const unsigned long ferry_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
const unsigned long ferry_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
const unsigned long ferry_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
const unsigned long ferry_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
const unsigned long ferry_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
const unsigned long ferry_KVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
const unsigned long ferry_KVM_RUN = KVM_RUN;
const unsigned long ferry_KVM_GET_REGS = KVM_GET_REGS;
const unsigned long ferry_KVM_SET_REGS = KVM_SET_REGS;
const unsigned long ferry_KVM_GET_SREGS = KVM_GET_SREGS;
const unsigned long ferry_KVM_SET_SREGS = KVM_SET_SREGS;
const unsigned long ferry_KVM_GET_FPU = KVM_GET_FPU;
const unsigned long ferry_KVM_SET_FPU = KVM_SET_FPU;
const unsigned long ferry_KVM_GET_XSAVE = KVM_GET_XSAVE;
#ifdef KVM_GET_XSAVE2
const unsigned long ferry_KVM_GET_XSAVE2 = KVM_GET_XSAVE2;
#else
const unsigned long ferry_KVM_GET_XSAVE2 = _IOR(KVMIO, 0xcf, struct kvm_xsave);
#endif
const unsigned long ferry_KVM_SET_XSAVE = KVM_SET_XSAVE;
const unsigned long ferry_KVM_GET_XCRS = KVM_GET_XCRS;
const unsigned long ferry_KVM_SET_XCRS = KVM_SET_XCRS;
const unsigned long ferry_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
const unsigned long ferry_KVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
const unsigned long ferry_KVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
const unsigned long ferry_KVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
const unsigned long ferry_KVM_GET_MP_STATE = KVM_GET_MP_STATE;
const unsigned long ferry_KVM_SET_MP_STATE = KVM_SET_MP_STATE;
const unsigned long ferry_KVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
#ifdef KVM_CLEAR_DIRTY_LOG
const unsigned long ferry_KVM_CLEAR_DIRTY_LOG = KVM_CLEAR_DIRTY_LOG;
#else
const unsigned long ferry_KVM_CLEAR_DIRTY_LOG = 0;
#endif
const unsigned long ferry_KVM_ENABLE_CAP = KVM_ENABLE_CAP;
const unsigned long ferry_KVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
const unsigned long ferry_KVM_CREATE_PIT2 = KVM_CREATE_PIT2;
const unsigned long ferry_KVM_IRQ_LINE = KVM_IRQ_LINE;
const unsigned long ferry_KVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
const unsigned long ferry_KVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
const unsigned long ferry_KVM_GET_PIT2 = KVM_GET_PIT2;
const unsigned long ferry_KVM_SET_PIT2 = KVM_SET_PIT2;
const unsigned long ferry_KVM_GET_LAPIC = KVM_GET_LAPIC;
const unsigned long ferry_KVM_SET_LAPIC = KVM_SET_LAPIC;
const unsigned long ferry_KVM_GET_CLOCK = KVM_GET_CLOCK;
const unsigned long ferry_KVM_SET_CLOCK = KVM_SET_CLOCK;
const unsigned long ferry_KVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
const unsigned long ferry_UFFDIO_API = UFFDIO_API;
const unsigned long ferry_UFFDIO_REGISTER = UFFDIO_REGISTER;
const unsigned long ferry_UFFDIO_UNREGISTER = UFFDIO_UNREGISTER;
const unsigned long ferry_UFFDIO_COPY = UFFDIO_COPY;
const unsigned long ferry_UFFDIO_ZEROPAGE = UFFDIO_ZEROPAGE;
const unsigned long ferry_UFFDIO_WAKE = UFFDIO_WAKE;
#ifdef USERFAULTFD_IOC_NEW
const unsigned long ferry_USERFAULTFD_IOC_NEW = USERFAULTFD_IOC_NEW;
#else
const unsigned long ferry_USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00);
#endif

int ferry_ioctl_ptr(int fd, unsigned long request, void *arg) {
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int ferry_ioctl_int(int fd, unsigned long request, unsigned long arg) {
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int ferry_userfaultfd_syscall(int flags) {
    long r = syscall(__NR_userfaultfd, flags);
    return r < 0 ? -errno : (int)r;
}

int ferry_open_rw_cloexec(const char *path) {
    int r = open(path, O_RDWR | O_CLOEXEC);
    return r < 0 ? -errno : r;
}

int ferry_kvm_msr_index_list(int kvm_fd, uint32_t *indices, int max) {
    size_t sz = sizeof(struct kvm_msr_list) + sizeof(uint32_t) * (size_t)max;
    struct kvm_msr_list *list = calloc(1, sz);
    if (!list) return -ENOMEM;
    list->nmsrs = (uint32_t)max;
    int r = ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, list);
    if (r < 0) { r = -errno; free(list); return r; }
    int n = (int)list->nmsrs;
    memcpy(indices, list->indices, sizeof(uint32_t) * (size_t)n);
    free(list);
    return n;
}

static struct kvm_msrs *msrs_alloc(int n) {
    return calloc(1, sizeof(struct kvm_msrs) + sizeof(struct kvm_msr_entry) * (size_t)n);
}

int ferry_kvm_get_msrs(int vcpu_fd, const uint32_t *indices, uint64_t *values, int n) {
    struct kvm_msrs *m = msrs_alloc(n);
    if (!m) return -ENOMEM;
    m->nmsrs = (uint32_t)n;
    for (int i = 0; i < n; i++) m->entries[i].index = indices[i];
    int r = ioctl(vcpu_fd, KVM_GET_MSRS, m);
    if (r < 0) { r = -errno; free(m); return r; }
    for (int i = 0; i < r; i++) values[i] = m->entries[i].data;
    free(m);
    return r;
}

int ferry_kvm_set_msrs(int vcpu_fd, const uint32_t *indices, const uint64_t *values, int n) {
    struct kvm_msrs *m = msrs_alloc(n);
    if (!m) return -ENOMEM;
    m->nmsrs = (uint32_t)n;
    for (int i = 0; i < n; i++) { m->entries[i].index = indices[i]; m->entries[i].data = values[i]; }
    int r = ioctl(vcpu_fd, KVM_SET_MSRS, m);
    if (r < 0) r = -errno;
    free(m);
    return r;
}

int ferry_kvm_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *entries, int max) {
    struct kvm_cpuid2 *c = calloc(1, sizeof(struct kvm_cpuid2) + sizeof(struct kvm_cpuid_entry2) * (size_t)max);
    if (!c) return -ENOMEM;
    c->nent = (uint32_t)max;
    int r = ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c);
    if (r < 0) { r = -errno; free(c); return r; }
    memcpy(entries, c->entries, sizeof(struct kvm_cpuid_entry2) * c->nent);
    r = (int)c->nent;
    free(c);
    return r;
}

int ferry_kvm_set_cpuid(int vcpu_fd, const struct kvm_cpuid_entry2 *entries, int n) {
    struct kvm_cpuid2 *c = calloc(1, sizeof(struct kvm_cpuid2) + sizeof(struct kvm_cpuid_entry2) * (size_t)n);
    if (!c) return -ENOMEM;
    c->nent = (uint32_t)n;
    memcpy(c->entries, entries, sizeof(struct kvm_cpuid_entry2) * (size_t)n);
    int r = ioctl(vcpu_fd, KVM_SET_CPUID2, c);
    if (r < 0) r = -errno;
    free(c);
    return r;
}

int ferry_kvm_get_dirty_log(int vm_fd, uint32_t slot, void *bitmap) {
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof log);
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    int r = ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log);
    return r < 0 ? -errno : r;
}

int ferry_kvm_clear_dirty_log(int vm_fd, uint32_t slot, uint64_t first_page, uint32_t num_pages, void *bitmap) {
#ifdef KVM_CLEAR_DIRTY_LOG
    struct kvm_clear_dirty_log c;
    memset(&c, 0, sizeof c);
    c.slot = slot;
    c.first_page = first_page;
    c.num_pages = num_pages;
    c.dirty_bitmap = bitmap;
    int r = ioctl(vm_fd, KVM_CLEAR_DIRTY_LOG, &c);
    return r < 0 ? -errno : r;
#else
    (void)vm_fd; (void)slot; (void)first_page; (void)num_pages; (void)bitmap;
    return -ENOTSUP;
#endif
}

int ferry_kvm_enable_cap(int fd, uint32_t cap, uint64_t arg0) {
    struct kvm_enable_cap c;
    memset(&c, 0, sizeof c);
    c.cap = cap;
    c.args[0] = arg0;
    int r = ioctl(fd, KVM_ENABLE_CAP, &c);
    return r < 0 ? -errno : r;
}

static void kick_handler(int signo) { (void)signo; }

int ferry_install_kick_handler(int signo) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

int ferry_block_signal(int signo) {
    sigset_t s; sigemptyset(&s); sigaddset(&s, signo);
    return -pthread_sigmask(SIG_BLOCK, &s, NULL);
}

int ferry_unblock_signal(int signo) {
    sigset_t s; sigemptyset(&s); sigaddset(&s, signo);
    return -pthread_sigmask(SIG_UNBLOCK, &s, NULL);
}

int ferry_page_is_zero(const void *page) {
    const uint64_t *w = page;
    uint64_t acc = 0;
    for (int i = 0; i < 512; i += 8) {
        acc |= w[i] | w[i+1] | w[i+2] | w[i+3] | w[i+4] | w[i+5] | w[i+6] | w[i+7];
        if (acc) return 0;
    }
    return 1;
}

static inline uint64_t ferry_splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void ferry_fill_page_random(void *page, uint64_t seed, uint64_t page_number) {
    uint64_t *w = page, x = seed ^ (page_number * 0xd1342543de82ef95ULL);
    for (int i = 1; i < 512; i++) w[i] = ferry_splitmix64(&x);
}

int ferry_check_page_random(const void *page, uint64_t seed, uint64_t page_number) {
    const uint64_t *w = page;
    uint64_t x = seed ^ (page_number * 0xd1342543de82ef95ULL);
    for (int i = 1; i < 512; i++) {
        uint64_t v = ferry_splitmix64(&x);
        if (w[i] != v) {
            for (int b = 0; b < 8; b++) if (((w[i] ^ v) >> (8 * b)) & 0xff) return i * 8 + b;
        }
    }
    return -1;
}

int ferry_set_thread_name(const char *name) {
    return -pthread_setname_np(pthread_self(), name);
}

#include <sys/eventfd.h>
int ferry_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC) == 0 ? 0 : -errno;
}

int ferry_eventfd(unsigned int initial) {
    int r = eventfd(initial, EFD_CLOEXEC);
    return r < 0 ? -errno : r;
}

int ferry_gettid(void) { return (int)syscall(SYS_gettid); }

#include <sched.h>
int ferry_setns_net(int fd) { return setns(fd, CLONE_NEWNET) == 0 ? 0 : -errno; }

#include <stddef.h>
size_t ferry_kvm_run_mmio_data_offset(void) { return offsetof(struct kvm_run, mmio.data); }
