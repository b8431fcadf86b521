/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared between every BPF source in bpf/ and the Python side: the kinds of
 * event, the record layouts streamed to user space and the helpers that count
 * and stream them.  tracer/fields.py parses `enum oc_kind` from this file, so
 * a new kind is declared here once.  The loader inlines this file where a
 * source includes it: bcc rewrites map calls only in its main file.
 *
 * Settings are constants #defined before the source (tracer/probes.py):
 *   OC_STREAM_EVENTS      1: also stream every high-rate event
 *   OC_FILTER_PIDS        1: count/stream only tgids present in pid_filter
 *   OC_MM_OWNER_OFFSET    offsetof(struct mm_struct, owner), -1 if absent
 *   OC_TASK_TGID_OFFSET   offsetof(struct task_struct, tgid)
 *   OC_TASK_MM_OFFSET     offsetof(struct task_struct, mm)
 *   OC_VMA_MM_OFFSET      offsetof(struct vm_area_struct, vm_mm)
 *   OC_VMEMMAP_BASE(_SYM) the struct page array (x86_64), or the variable
 *                         holding it
 *   OC_STRUCT_PAGE_SIZE   sizeof(struct page)
 * and, per concern, which attach variant is compiled in (OC_KSM_TRACEPOINT,
 * OC_BALLOON_KPROBE, ...; see each source).
 * Offsets come from /sys/kernel/btf/vmlinux (tracer/btf.py), so the same
 * object is right on any kernel layout, whatever headers bcc compiles with.
 */
#ifndef OVERCOMMIT_H
#define OVERCOMMIT_H

#include <uapi/linux/ptrace.h>	/* struct pt_regs for kprobe programs */

enum oc_kind {
	OC_NONE = 0,
	/* ksmd merging (ksmd context, attributed through rmap_item->mm) */
	OC_MERGE_WITH_KSM_PAGE = 1,	/* page now maps an existing KSM page: a frame freed */
	OC_NEW_KSM_PAGE = 2,		/* page became a KSM page and its partner merged into it */
	OC_NEW_KSM_PAGE_BROKEN = 3,	/* page became a KSM page but its partner failed: break_cow() */
	OC_MERGE_FAILED = 4,		/* try_to_merge_with_ksm_page() returned an error */
	OC_MERGE_ZERO_PAGE = 5,		/* use_zero_pages: page replaced by the zero page */
	OC_MERGE_ZERO_PAGE_FAILED = 6,
	/* unmerging */
	OC_REMOVE_RMAP_ITEM = 7,	/* a sharer left a stale stable node */
	OC_REMOVE_KSM_PAGE = 8,		/* a stable node (KSM page) went away */
	OC_BREAK_KSM = 9,		/* break_ksm(): COW-unshare by madvise/prctl (kprobe) */
	/* lifecycle and scanning: rare, always streamed */
	OC_KSM_ENTER = 10,
	OC_KSM_EXIT = 11,
	OC_FULL_SCAN = 12,		/* one full pass of ksmd: seq, duration */
	OC_KSM_ADVISOR = 13,
	/* ballooning */
	OC_BALLOON_INFLATE = 14,	/* guest: page enqueued into the balloon */
	OC_BALLOON_DEFLATE = 15,	/* guest: page dequeued from the balloon */
	OC_HOST_DISCARD = 16,		/* host: VMM discarded guest RAM (madvise/fallocate) */
	OC_HOST_WILLNEED = 17,		/* host: VMM asked guest RAM back (MADV_WILLNEED) */
	OC_KIND_MAX = 18,
};

/* Key of the in-kernel counts: cumulative, user space takes differences. */
struct oc_count_key {
	__u32 tgid;
	__u32 kind;
};

/* High-rate event, streamed only with --events: 32 bytes. */
struct oc_event {
	__u64 ts_ns;
	__u64 pfn;		/* KSM: the KSM page's frame; discards: first page */
	__u32 tgid;
	__u16 kind;
	__s16 err;
	__u32 pages;		/* pages this event stands for (1 for KSM) */
	__u32 pad;
};

/* Rare event, always streamed. */
struct oc_rare {
	__u64 ts_ns;
	__u64 a;		/* scan: rmap_entries; advisor: pages_to_scan */
	__s64 b;		/* scan: duration ns; advisor: scan_time */
	__u32 tgid;
	__u32 kind;
	__s32 seq;		/* scan: seq; advisor: cpu_percent */
	__u32 pad;
	char comm[16];
};

#ifndef OC_STREAM_EVENTS
#define OC_STREAM_EVENTS 0
#endif
#ifndef OC_FILTER_PIDS
#define OC_FILTER_PIDS 0
#endif
#ifndef OC_MM_OWNER_OFFSET
#define OC_MM_OWNER_OFFSET -1
#endif
#ifndef OC_EVENTS_RINGBUF_PAGES
#define OC_EVENTS_RINGBUF_PAGES 4096
#endif

/* Per CPU: no atomic add on the hot path; user space sums the CPUs. */
BPF_PERCPU_HASH(counts, struct oc_count_key, u64, 16384);
BPF_ARRAY(lost, u64, OC_KIND_MAX);
/*
 * mm -> tgid, learnt at ksm_enter (owner's context) or through mm->owner.
 * A plain hash (an LRU hash costs more per lookup, on every merge); entries
 * stay after ksm_exit because ksmd cleans up an exited mm's pages later.
 */
BPF_HASH(mm_tgid, u64, u32, 65536);

/*
 * ksmd works through one mm's pages at a time, so the last answer is nearly
 * always the next one: a per-CPU cache in front of mm_tgid, invalidated by a
 * generation that every change of mm_tgid by ksm_enter bumps.
 */
struct oc_mm_cache {
	u64 mm;
	u64 gen;
	u32 tgid;
	u32 pad;
};
BPF_PERCPU_ARRAY(mm_cache, struct oc_mm_cache, 1);
BPF_ARRAY(mm_gen, u64, 1);
BPF_HASH(pid_filter, u32, u8, 1024);
BPF_RINGBUF_OUTPUT(rare, 64);
#if OC_STREAM_EVENTS
BPF_RINGBUF_OUTPUT(events, OC_EVENTS_RINGBUF_PAGES);
#endif

static __always_inline void oc_lost(u32 kind)
{
	u64 *n = lost.lookup(&kind);
	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline int oc_wanted(u32 tgid)
{
#if OC_FILTER_PIDS
	return pid_filter.lookup(&tgid) != NULL;
#else
	return 1;
#endif
}

/*
 * Merges run in ksmd's context, so `current` says nothing about whose page it
 * is.  ksm_enter runs in the owner's context and teaches us mm -> tgid; for
 * an mm registered before tracing began, follow mm->owner (CONFIG_MEMCG),
 * which points to a thread of the owning process, and cache the answer.
 */
static __always_inline u32 oc_mm_tgid_slow(u64 mm)
{
	u32 *known = mm_tgid.lookup(&mm);
	if (known)
		return *known;
#if OC_MM_OWNER_OFFSET >= 0
	{
		u64 owner = 0;
		u32 tgid = 0;
		bpf_probe_read_kernel(&owner, sizeof(owner),
				      (void *)(mm + OC_MM_OWNER_OFFSET));
		if (!owner)
			return 0;
		bpf_probe_read_kernel(&tgid, sizeof(tgid),
				      (void *)(owner + OC_TASK_TGID_OFFSET));
		if (tgid)
			mm_tgid.update(&mm, &tgid);
		return tgid;
	}
#else
	return 0;
#endif
}

static __always_inline u32 oc_mm_tgid(u64 mm)
{
	u32 zero = 0, tgid;
	u64 *gen = mm_gen.lookup(&zero);
	struct oc_mm_cache *c = mm_cache.lookup(&zero);

	if (!gen || !c)
		return oc_mm_tgid_slow(mm);
	if (c->mm == mm && c->gen == *gen)
		return c->tgid;
	tgid = oc_mm_tgid_slow(mm);
	if (tgid) {	/* an owner not found now may be found next time */
		c->mm = mm;
		c->gen = *gen;
		c->tgid = tgid;
	}
	return tgid;
}

/* ksm_enter learnt (tgid) or unlearnt (0) who owns an mm. */
static __always_inline void oc_mm_tgid_set(u64 mm, u32 tgid)
{
	u32 zero = 0;
	u64 *gen = mm_gen.lookup(&zero);

	if (tgid)
		mm_tgid.update(&mm, &tgid);
	else
		mm_tgid.delete(&mm);
	if (gen)
		__sync_fetch_and_add(gen, 1);
}

static __always_inline void oc_count(u32 tgid, u32 kind, u64 pages)
{
	struct oc_count_key key = { .tgid = tgid, .kind = kind };
	u64 zero = 0, *n = counts.lookup_or_try_init(&key, &zero);
	if (n)
		*n += pages;
	else
		oc_lost(kind);	/* counts map full: say so rather than undercount */
}

/* Count `pages` pages of one event and, with --events, stream it. */
static __always_inline void oc_event_n(u32 tgid, u32 kind, u64 pfn, s32 err, u64 pages)
{
	if (!oc_wanted(tgid))
		return;
	oc_count(tgid, kind, pages);
#if OC_STREAM_EVENTS
	struct oc_event *e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		oc_lost(kind);
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->pfn = pfn;
	e->tgid = tgid;
	e->kind = kind;
	e->err = err;
	e->pages = pages;
	e->pad = 0;
	events.ringbuf_submit(e, 0);
#endif
}

static __always_inline void oc_event(u32 tgid, u32 kind, u64 pfn, s32 err)
{
	oc_event_n(tgid, kind, pfn, err, 1);
}

static __always_inline void oc_rare(u32 tgid, u32 kind, u64 a, s64 b, s32 seq)
{
	struct oc_rare *r = rare.ringbuf_reserve(sizeof(*r));
	if (!r) {
		oc_lost(kind);
		return;
	}
	r->ts_ns = bpf_ktime_get_ns();
	r->a = a;
	r->b = b;
	r->tgid = tgid;
	r->kind = kind;
	r->seq = seq;
	r->pad = 0;
	bpf_get_current_comm(&r->comm, sizeof(r->comm));
	rare.ringbuf_submit(r, 0);
}

#ifdef OC_STRUCT_PAGE_SIZE
/*
 * kprobe/fentry programs get struct page pointers.  Frame numbers follow
 * from the vmemmap array (x86_64 SPARSEMEM_VMEMMAP): vmemmap_base is a
 * variable under CONFIG_RANDOMIZE_MEMORY, a constant otherwise.
 */
static __always_inline u64 oc_page_to_pfn(u64 page)
{
	u64 base = OC_VMEMMAP_BASE, addr = 0;
#if OC_VMEMMAP_BASE_SYM
	bpf_probe_read_kernel(&base, sizeof(base), (void *)OC_VMEMMAP_BASE_SYM);
#endif
#if OC_KSM_FENTRY || OC_BALLOON_FENTRY
	/*
	 * fentry/fexit arguments are typed by BTF: the verifier knows `page` as
	 * a struct page pointer whatever C type we give it, and refuses
	 * arithmetic with an unbounded number ("math between ptr_ pointer and
	 * register with unbounded min value", Linux 6.1).  Copied through a
	 * helper it is a plain number.
	 */
	bpf_probe_read_kernel(&addr, sizeof(addr), &page);
#else
	addr = page;
#endif
	return (addr - base) / OC_STRUCT_PAGE_SIZE;
}
#endif

#endif /* OVERCOMMIT_H */
