/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Ballooning seen from inside a guest: the balloon core (mm/balloon_compaction.c)
 * that virtio_balloon and vmw_balloon share.  No upstream tracepoints, so
 * kprobe or fentry variants (OC_BALLOON_KPROBE, OC_BALLOON_FENTRY); where
 * neither attaches, user space samples /proc/vmstat balloon_inflate and
 * balloon_deflate instead.
 *
 * Inflate: virtio's fill_balloon() enqueues page by page with
 * balloon_page_enqueue(); vmw_balloon uses balloon_page_list_enqueue(),
 * which does not go through balloon_page_enqueue(): hook both.
 * Deflate: balloon_page_dequeue() is a wrapper of balloon_page_list_dequeue()
 * (Linux 5.2+), so where the list function exists only it is hooked, and its
 * return value counts the pages: each page once.
 */
#include "overcommit.h"

#if OC_BALLOON_KPROBE

int oc_balloon_page_enqueue(struct pt_regs *ctx)
{
	oc_event(0, OC_BALLOON_INFLATE, oc_page_to_pfn(PT_REGS_PARM2(ctx)), 0);
	return 0;
}

int oc_balloon_page_list_enqueue_ret(struct pt_regs *ctx)
{
	u64 n = PT_REGS_RC(ctx);

	if (n)
		oc_event_n(0, OC_BALLOON_INFLATE, 0, 0, n);
	return 0;
}

int oc_balloon_page_list_dequeue_ret(struct pt_regs *ctx)
{
	u64 n = PT_REGS_RC(ctx);

	if (n)
		oc_event_n(0, OC_BALLOON_DEFLATE, 0, 0, n);
	return 0;
}

/* Before 5.2: one page per call, NULL when the balloon is empty. */
int oc_balloon_page_dequeue_ret(struct pt_regs *ctx)
{
	u64 page = PT_REGS_RC(ctx);

	if (page)
		oc_event(0, OC_BALLOON_DEFLATE, oc_page_to_pfn(page), 0);
	return 0;
}

#elif OC_BALLOON_FENTRY

KFUNC_PROBE(balloon_page_enqueue, u64 b_dev_info, u64 page)
{
	oc_event(0, OC_BALLOON_INFLATE, oc_page_to_pfn(page), 0);
	return 0;
}

#if OC_HOOK_BALLOON_PAGE_LIST_ENQUEUE
KRETFUNC_PROBE(balloon_page_list_enqueue, u64 b_dev_info, u64 pages, u64 n)
{
	if (n)
		oc_event_n(0, OC_BALLOON_INFLATE, 0, 0, n);
	return 0;
}
#endif

#if OC_HOOK_BALLOON_PAGE_LIST_DEQUEUE
KRETFUNC_PROBE(balloon_page_list_dequeue, u64 b_dev_info, u64 pages, u64 n_req, u64 n)
{
	if (n)
		oc_event_n(0, OC_BALLOON_DEFLATE, 0, 0, n);
	return 0;
}
#else
KRETFUNC_PROBE(balloon_page_dequeue, u64 b_dev_info, u64 page)
{
	if (page)
		oc_event(0, OC_BALLOON_DEFLATE, oc_page_to_pfn(page), 0);
	return 0;
}
#endif

#endif
