/* SPDX-License-Identifier: GPL-2.0 */
/*
 * KSM: what ksmd merges and unmerges, per process, and its scan passes.
 *
 * One source, three attach variants, chosen by tracer/kernel.py:
 *   OC_KSM_TRACEPOINT  include/trace/events/ksm.h (Linux 6.4+)
 *   OC_KSM_KPROBE      older kernels with kprobes
 *   OC_KSM_FENTRY      older kernels with BPF trampolines
 * Before 6.4 ksm_do_scan() is always inlined by distribution compilers, so
 * the kprobe/fentry variants have no scan-pass hook: full passes then come
 * from /sys/kernel/mm/ksm/full_scans.
 */
#include "overcommit.h"

/*
 * try_to_merge_two_pages() first turns a page into a KSM page (kpage NULL),
 * then merges its partner into it.  Only if the partner merges too does
 * stable_tree_append() count both in ksm_merging_pages; otherwise break_cow()
 * undoes the first.  So the first outcome is held until the partner's is
 * known.  ksmd is one thread but may change CPU between the two calls, hence
 * a single global slot rather than a per-CPU one.
 */
struct oc_pending {
	u64 page;	/* pfn (tracepoint) or struct page * (kprobe/fentry) */
	u64 pfn;
	u32 tgid;
	u32 valid;
};
BPF_ARRAY(pending, struct oc_pending, 1);

/*
 * One outcome of merging a page.  `kpage` names the KSM page it was merged
 * with, 0 when the page itself was made a KSM page; `page` names the page
 * (the partner's next call then has kpage == page).  Names are frame numbers
 * for tracepoints, struct page pointers for kprobe/fentry.
 */
static __always_inline void oc_merge_outcome(u32 tgid, u64 kpage, u64 page,
					     u64 pfn, int err)
{
	u32 zero = 0;
	struct oc_pending *p = pending.lookup(&zero);

	if (!p)
		return;
	if (!kpage) {
		if (err) {
			oc_event(tgid, OC_MERGE_FAILED, pfn, err);
			return;
		}
		p->page = page;
		p->pfn = pfn;
		p->tgid = tgid;
		p->valid = 1;
		return;
	}
	if (p->valid && p->page == kpage) {
		p->valid = 0;
		oc_event(p->tgid, err ? OC_NEW_KSM_PAGE_BROKEN : OC_NEW_KSM_PAGE,
			 p->pfn, 0);
	}
	oc_event(tgid, err ? OC_MERGE_FAILED : OC_MERGE_WITH_KSM_PAGE, pfn, err);
}

#if OC_KSM_TRACEPOINT

TRACEPOINT_PROBE(ksm, ksm_merge_with_ksm_page)
{
	/*
	 * pfn is page_to_pfn(ksm_page ?: page): the page's own frame when it is
	 * made a KSM page, the KSM page's frame when merged into one.  So the
	 * partner's pfn names the page the first call made a KSM page.
	 */
	u64 pfn = args->pfn;

	oc_merge_outcome(oc_mm_tgid((u64)args->mm), args->ksm_page ? pfn : 0,
			 pfn, pfn, args->err);
	return 0;
}

/* Only the use_zero_pages path emits this one. */
TRACEPOINT_PROBE(ksm, ksm_merge_one_page)
{
	oc_event(oc_mm_tgid((u64)args->mm),
		 args->err ? OC_MERGE_ZERO_PAGE_FAILED : OC_MERGE_ZERO_PAGE,
		 args->pfn, args->err);
	return 0;
}

/*
 * remove_node_from_stable_tree() emits this for every sharer of a stale KSM
 * page but the last one (the "shared" page), and the common path,
 * remove_rmap_item_from_tree() after a COW break, emits nothing: these are
 * the unmerges that can be seen, the rest is derived from ksm_merging_pages.
 */
TRACEPOINT_PROBE(ksm, ksm_remove_rmap_item)
{
	oc_event(oc_mm_tgid((u64)args->mm), OC_REMOVE_RMAP_ITEM, args->pfn, 0);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_remove_ksm_page)
{
	/* a stable node has no owner: host-wide */
	oc_event(0, OC_REMOVE_KSM_PAGE, args->pfn, 0);
	return 0;
}

/*
 * ksm_enter runs in the registering task's context, except from ksm_fork(),
 * where the parent registers the child's mm before the child has its own
 * tgid.  Learn mm -> tgid only when the mm is current's own; otherwise forget
 * any stale entry and let mm->owner answer once ksmd gets to the child.
 */
TRACEPOINT_PROBE(ksm, ksm_enter)
{
	u64 mm = (u64)args->mm;
	u64 cur_mm = 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	bpf_probe_read_kernel(&cur_mm, sizeof(cur_mm),
			      (void *)((u64)task + OC_TASK_MM_OFFSET));
	if (cur_mm != mm)
		tgid = 0;
	oc_mm_tgid_set(mm, tgid);
	if (oc_wanted(tgid) || !tgid)
		oc_rare(tgid, OC_KSM_ENTER, mm, 0, 0);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_exit)
{
	/* the entry stays: ksmd cleans up this mm's rmap items later */
	u32 tgid = oc_mm_tgid((u64)args->mm);

	if (oc_wanted(tgid))
		oc_rare(tgid, OC_KSM_EXIT, (u64)args->mm, 0, 0);
	return 0;
}

struct oc_scan {
	u64 start_ns;
	s32 seq;
	u32 valid;
};
BPF_ARRAY(scan, struct oc_scan, 1);

/*
 * ksmd emits a start each time it comes back to the head of its mm list; if
 * no mm is left to scan it goes back to sleep without a stop, so starts can
 * repeat.  The latest start with the stop's seq opens the pass.
 */
TRACEPOINT_PROBE(ksm, ksm_start_scan)
{
	u32 zero = 0;
	struct oc_scan *s = scan.lookup(&zero);

	if (s) {
		s->start_ns = bpf_ktime_get_ns();
		s->seq = args->seq;
		s->valid = 1;
	}
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_stop_scan)
{
	u32 zero = 0;
	s64 duration = -1;
	struct oc_scan *s = scan.lookup(&zero);

	if (s && s->valid && s->seq == args->seq) {
		duration = bpf_ktime_get_ns() - s->start_ns;
		s->valid = 0;
	}
	oc_rare(0, OC_FULL_SCAN, args->rmap_entries, duration, args->seq);
	return 0;
}

#if OC_HAVE_KSM_ADVISOR	/* Linux 6.8+ */
TRACEPOINT_PROBE(ksm, ksm_advisor)
{
	oc_rare(0, OC_KSM_ADVISOR, args->pages_to_scan, args->scan_time,
		args->cpu_percent);
	return 0;
}
#endif

#elif OC_KSM_KPROBE || OC_KSM_FENTRY	/* Linux 4.10 .. 6.3 */

static __always_inline u64 oc_vma_mm(u64 vma)
{
	u64 mm = 0;

	bpf_probe_read_kernel(&mm, sizeof(mm), (void *)(vma + OC_VMA_MM_OFFSET));
	return mm;
}

/*
 * try_to_merge_one_page(vma, page, kpage) returns 0 when merged.  kpage is
 * NULL to make page a KSM page, and ZERO_PAGE() on the use_zero_pages path,
 * which is therefore counted with merges here.
 */
static __always_inline void oc_merge_one(u64 vma, u64 page, u64 kpage, int err)
{
	u32 tgid = oc_mm_tgid(oc_vma_mm(vma));

	oc_merge_outcome(tgid, kpage, page, oc_page_to_pfn(kpage ? kpage : page),
			 err);
}

/*
 * remove_rmap_item_from_tree() drops a sharer from the stable tree when its
 * address carries STABLE_FLAG: exactly where mm->ksm_merging_pages falls.
 */
#define OC_STABLE_FLAG 0x200
static __always_inline void oc_remove_rmap_item(u64 rmap_item)
{
	u64 mm = 0, address = 0;

	bpf_probe_read_kernel(&mm, sizeof(mm),
			      (void *)(rmap_item + OC_RMAP_ITEM_MM_OFFSET));
	bpf_probe_read_kernel(&address, sizeof(address),
			      (void *)(rmap_item + OC_RMAP_ITEM_ADDRESS_OFFSET));
	if (address & OC_STABLE_FLAG)
		oc_event(oc_mm_tgid(mm), OC_REMOVE_RMAP_ITEM, 0, 0);
}

static __always_inline void oc_break_ksm_vma(u64 vma)
{
	oc_event(oc_mm_tgid(oc_vma_mm(vma)), OC_BREAK_KSM, 0, 0);
}

#if OC_KSM_KPROBE

struct oc_merge_args {
	u64 vma;
	u64 page;
	u64 kpage;
};
BPF_HASH(merge_args, u32, struct oc_merge_args, 64);

int oc_try_to_merge_one_page(struct pt_regs *ctx)
{
	u32 tid = bpf_get_current_pid_tgid();
	struct oc_merge_args a = {
		.vma = PT_REGS_PARM1(ctx),
		.page = PT_REGS_PARM2(ctx),
		.kpage = PT_REGS_PARM3(ctx),
	};

	merge_args.update(&tid, &a);
	return 0;
}

int oc_try_to_merge_one_page_ret(struct pt_regs *ctx)
{
	u32 tid = bpf_get_current_pid_tgid();
	struct oc_merge_args *a = merge_args.lookup(&tid);

	if (!a)
		return 0;
	oc_merge_one(a->vma, a->page, a->kpage, (int)PT_REGS_RC(ctx));
	merge_args.delete(&tid);
	return 0;
}

int oc_remove_rmap_item_from_tree(struct pt_regs *ctx)
{
	oc_remove_rmap_item(PT_REGS_PARM1(ctx));
	return 0;
}

int oc_break_ksm(struct pt_regs *ctx)
{
	oc_break_ksm_vma(PT_REGS_PARM1(ctx));
	return 0;
}

#elif OC_KSM_FENTRY

KRETFUNC_PROBE(try_to_merge_one_page, u64 vma, u64 page, u64 kpage, int ret)
{
	oc_merge_one(vma, page, kpage, ret);
	return 0;
}

#if OC_HOOK_REMOVE_RMAP_ITEM_FROM_TREE	/* inlined on some builds */
KFUNC_PROBE(remove_rmap_item_from_tree, u64 rmap_item)
{
	oc_remove_rmap_item(rmap_item);
	return 0;
}
#endif

#if OC_HOOK_BREAK_KSM
KFUNC_PROBE(break_ksm, u64 vma)
{
	oc_break_ksm_vma(vma);
	return 0;
}
#endif

#endif
#endif
