"""`overcommit summary FILE`: the terminal view of a recording."""
from __future__ import annotations

import json

from .aggregate import summarize
from .fields import PAGE_SIZE
from .recording import read


def _mib(pages: int | None) -> str:
    return "-" if pages is None else f"{pages * PAGE_SIZE / 2**20:.1f} MiB"


def render(s: dict) -> str:
    k, b, x = s["ksm"], s["balloon"], s["crosscheck"]
    lines = [
        f"{s['host']}  kernel {s['kernel']}  {s['started_at']}  "
        f"{s['duration_s']:.1f}s in {s['intervals']} intervals",
        *[f"note: {n}" for n in s["notes"]],
        f"lost events: {s['lost_events']}   attach: "
        + ", ".join(f"{e}={m}" for e, m in s["attach"].items()),
        "",
        "KSM",
        f"  merged pages       {k['merged_pages']:>10}  ({k['new_ksm_pages']} new KSM pages, "
        f"{k['merged_pages'] - k['new_ksm_pages']} frames freed)",
        f"  zero-page merges   {k['zero_page_merges']:>10}",
        f"  merge failures     {k['merge_failures']:>10}",
        f"  unmerged pages     {k['unmerged_pages']:>10}  ({k['unmerged_pages_seen']} seen as "
        f"events, {k['unmerged_pages_derived']} derived from ksm_merging_pages)",
        f"  full scans         {k['full_scans']:>10}"
        + (f"  (mean {k['scan_duration_s_mean']:.3f}s)" if k["scan_duration_s_mean"] else ""),
        f"  at end: pages_shared {k['pages_shared_end']}, pages_sharing "
        f"{k['pages_sharing_end']} ({_mib(k['pages_sharing_end'])} saved), general_profit "
        f"{k['general_profit_end']}",
        "",
        "Balloon",
        f"  this kernel's balloon (as a guest): inflated {b['inflated_pages']}, deflated "
        f"{b['deflated_pages']} pages ({s['attach'].get('balloon', '-')})",
        f"  VMs' balloons (as a host): guest RAM discarded {b['host_discarded_pages']}, "
        f"asked back {b['host_willneed_pages']} pages",
        "",
        f"{'PID':>7} {'COMM':<16} {'VM':<14} {'MERGED':>9} {'UNMERGED':>9} "
        f"{'MERGING':>9} {'DISCARD':>9}",
    ]
    for p in sorted(s["processes"], key=lambda p: -p["merged_pages"]):
        lines.append(f"{p['pid']:>7} {(p['comm'] or '?')[:16]:<16} {(p['vm'] or '-')[:14]:<14} "
                     f"{p['merged_pages']:>9} {p['unmerged_pages']:>9} "
                     f"{p['ksm_merging_pages_end']:>9} {p['host_discarded_pages']:>9}"
                     + ("  (exited)" if p["exited"] else ""))
    shared = x["pages_shared_plus_sharing_change"]
    lines += [
        "",
        "Cross-check (events vs kernel counters)",
        f"  merged - unmerged {x['merged_minus_unmerged']:>9}   change of pages_shared + "
        f"pages_sharing {shared if shared is not None else '-':>9}",
    ]
    if x["pages_of_no_process_start"] or x["pages_of_no_process_end"]:
        lines.append(f"  KSM pages of no running process (exited before): "
                     f"{x['pages_of_no_process_start']} at start, "
                     f"{x['pages_of_no_process_end']} at end")
    lines += [
        f"  full scans traced {x['full_scans_traced']:>9}   change of full_scans "
        f"{x['full_scans_counter_change'] if x['full_scans_counter_change'] is not None else '-':>9}",
        f"  cow_ksm change    {x['cow_ksm_change'] if x['cow_ksm_change'] is not None else '-':>9}",
    ]
    return "\n".join(lines)


def run(path, as_json: bool) -> str:
    s = summarize(read(path))
    return json.dumps(s, indent=2, default=str) if as_json else render(s)
