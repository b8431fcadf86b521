/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Ballooning seen from the host: a VMM hands guest RAM back when the guest
 * inflates its balloon, and touches it again when the guest deflates.
 * QEMU's virtio-balloon turns each inflated page into
 * madvise(MADV_DONTNEED) on anonymous guest RAM (MADV_REMOVE or
 * fallocate(FALLOC_FL_PUNCH_HOLE) on shared or file-backed RAM) and each
 * deflated one into MADV_WILLNEED.  The same calls also serve the VMM's own
 * heap, so only the parts that fall inside guest RAM count: user space finds
 * guest RAM (the VMM's mergeable mappings, `mg` in smaps, and the files its
 * large shared mappings come from) and keeps guest_ram / guest_ram_fds up to
 * date.  Syscall tracepoints exist on every kernel with BPF tracepoints and
 * CONFIG_FTRACE_SYSCALLS, so there is only one variant.
 */
#include "overcommit.h"

#if OC_VMM

#define OC_MAX_RANGES 16
#define OC_MADV_WILLNEED 3
#define OC_MADV_DONTNEED 4
#define OC_MADV_REMOVE 9
#define OC_FALLOC_FL_PUNCH_HOLE 0x02

struct oc_range_key {
	u32 tgid;
	u32 idx;
};
struct oc_range {
	u64 start;
	u64 end;
};
struct oc_fd_key {
	u32 tgid;
	s32 fd;
};
struct oc_syscall {
	u64 start;
	u64 len;
	u32 kind;
	u32 file;	/* 1: fallocate on a guest RAM file, start is an offset */
};

BPF_HASH(vmm_ranges, u32, u32, 1024);		/* VMM tgid -> number of ranges */
BPF_HASH(guest_ram, struct oc_range_key, struct oc_range, 16384);
BPF_HASH(guest_ram_fds, struct oc_fd_key, u8, 4096);
BPF_HASH(vmm_calls, u32, struct oc_syscall, 4096);	/* by thread, entry to exit */

static __always_inline u64 oc_guest_pages(u32 tgid, u64 start, u64 len)
{
	u32 *n = vmm_ranges.lookup(&tgid);
	u64 end = start + len, pages = 0;

	if (!n)
		return 0;
	for (u32 i = 0; i < OC_MAX_RANGES; i++) {
		struct oc_range_key k = { .tgid = tgid, .idx = i };
		struct oc_range *r;
		u64 lo, hi;

		if (i >= *n)
			break;
		r = guest_ram.lookup(&k);
		if (!r)
			continue;
		lo = start > r->start ? start : r->start;
		hi = end < r->end ? end : r->end;
		if (hi > lo)
			pages += (hi - lo) >> 12;
	}
	return pages;
}

TRACEPOINT_PROBE(syscalls, sys_enter_madvise)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = id;
	struct oc_syscall c = { .start = args->start, .len = args->len_in };

	if (!vmm_ranges.lookup(&tgid))
		return 0;
	switch (args->behavior) {
	case OC_MADV_DONTNEED:
	case OC_MADV_REMOVE:
		c.kind = OC_HOST_DISCARD;
		break;
	case OC_MADV_WILLNEED:
		c.kind = OC_HOST_WILLNEED;
		break;
	default:
		return 0;
	}
	vmm_calls.update(&tid, &c);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_fallocate)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = id;
	struct oc_fd_key fk = { .tgid = tgid, .fd = args->fd };
	struct oc_syscall c = { .start = args->offset, .len = args->len,
				.kind = OC_HOST_DISCARD, .file = 1 };

	if (!(args->mode & OC_FALLOC_FL_PUNCH_HOLE) || !guest_ram_fds.lookup(&fk))
		return 0;
	vmm_calls.update(&tid, &c);
	return 0;
}

/* Count on exit: a refused call (EINVAL, EAGAIN) gave nothing back. */
static __always_inline void oc_vmm_exit(long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = id;
	struct oc_syscall *c = vmm_calls.lookup(&tid);
	u64 pages;

	if (!c)
		return;
	if (ret == 0) {
		pages = c->file ? c->len >> 12 : oc_guest_pages(tgid, c->start, c->len);
		if (pages)
			oc_event_n(tgid, c->kind, c->start >> 12, 0, pages);
	}
	vmm_calls.delete(&tid);
}

TRACEPOINT_PROBE(syscalls, sys_exit_madvise)
{
	oc_vmm_exit(args->ret);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_fallocate)
{
	oc_vmm_exit(args->ret);
	return 0;
}

#endif
