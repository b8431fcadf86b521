"""The `overcommit` command line (contract in DESIGN.md)."""
from __future__ import annotations

import importlib
import sys
from datetime import datetime
from pathlib import Path

import click

from . import __version__
from .errors import UserError


def _fail(message: str, code: int = 1):
    click.echo(f"overcommit: {message}", err=True)
    sys.exit(code)


# Commands in modules of their own, imported only when run: `record` must not
# pay for plotly or QEMU handling at start-up.
LAZY = {
    "workload": "tracer.workload:workload_command",
    "report": "reports.cli:report_command",
    "top": "tracer.top:top_command",
    "serve": "tracer.serve:serve_command",
    "lab": "tracer.lab:lab_command",
}


class _Group(click.Group):
    """Every command: a user's mistake is one line and a non-zero exit."""

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *LAZY])

    def get_command(self, ctx, name):
        if name in LAZY:
            module, _, attr = LAZY[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        from .counters import KsmUnavailable
        from .probes import ProbeError
        from .recording import RecordingError
        try:
            return super().invoke(ctx)
        except UserError as e:
            _fail(str(e), e.code)
        except (RecordingError, ProbeError, KsmUnavailable) as e:
            _fail(str(e))
        except BrokenPipeError:
            sys.exit(0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="overcommit")
def main():
    """Trace how this host overcommits memory: KSM merging and ballooning.

    \b
    Start with:  overcommit doctor
    Then:        overcommit record -d 60 -o ksm.arrow && overcommit summary ksm.arrow
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def doctor(as_json):
    """What this host offers: privileges, bcc, headers, KSM, and for every
    traced event its attach mode (tracepoint, fentry, kprobe, counters) and why.

    Exits 1 when something needed for `record` is missing; each problem comes
    with the command or setting that fixes it.
    """
    from . import doctor as d
    text, code = d.run(as_json)
    click.echo(text)
    sys.exit(code)


@main.command(epilog="""\b
Examples:
  overcommit record -d 60                  # one minute, all processes
  overcommit record -o vm.arrow -p 4242    # only PID 4242, until Ctrl-C
  overcommit record -i 0.5 --events        # every event, with exact loss count
Read it back:  overcommit summary ksm-*.arrow
In Python:     pandas.read_feather("ksm.arrow")""")
@click.option("-d", "--duration", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to record (default: until Ctrl-C or SIGTERM).")
@click.option("-i", "--interval", type=click.FloatRange(min=0.05), default=1.0,
              show_default=True, help="Seconds per interval (one record batch each).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Recording file [default: ksm-YYYYmmdd-HHMMSS.arrow].")
@click.option("-p", "--pid", "pids", type=int, multiple=True,
              help="Only this process (repeatable).")
@click.option("--events", is_flag=True,
              help="Also stream every merge/unmerge event, not only counts.")
@click.option("--ebpf", is_flag=True, hidden=True, help="Print the BPF program and exit.")
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
def record(duration, interval, output, pids, events, ebpf, quiet):
    """Trace KSM (and ballooning) into a recording file.

    Merges and unmerges are counted in the kernel per process and interval;
    each interval the kernel's own counters (/sys/kernel/mm/ksm, /proc/vmstat,
    /proc/PID/ksm_stat) are stored beside them.  Ctrl-C or SIGTERM end it
    cleanly; after kill -9 the file is still readable, less the last interval.
    """
    from . import kernel
    if ebpf:
        from . import probes
        plan = kernel.plan(kernel.capabilities())
        d = dict(plan.defines, OC_STREAM_EVENTS=int(events), OC_FILTER_PIDS=int(bool(pids)))
        click.echo(probes.final_text(d))
        return
    from . import record as rec
    output = output or Path(datetime.now().strftime("ksm-%Y%m%d-%H%M%S.arrow"))
    rec.run(output, duration, interval, list(pids), events, progress=not quiet)


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object (keys in DESIGN.md).")
def summary(file, as_json):
    """What a recording says: KSM and balloon totals, per process and VM, and
    the events cross-checked against the kernel's counters."""
    from . import summary as s
    click.echo(s.run(file, as_json))
