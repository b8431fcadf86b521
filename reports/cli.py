"""`overcommit report FILE... [-o report.html]`: recordings to one HTML file.

Registered in tracer/cli.py.  Unreadable recordings raise
tracer.recording.RecordingError, which the `overcommit` group prints as one
line with a non-zero exit.
"""
from __future__ import annotations

import time
from pathlib import Path

import click

from tracer.errors import UserError


@click.command("report", epilog="""\b
Examples:
  overcommit report ksm.arrow                      # writes report.html
  overcommit report ksm.arrow -o /tmp/ksm.html
  overcommit report host1.arrow host2.arrow        # fleet view, one section per host
Record with --events to see who shares pages with whom:
  overcommit record -d 60 --events -o ksm.arrow""")
@click.argument("files", metavar="FILE...", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("report.html"), show_default=True, help="HTML file to write.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def report_command(files, output, quiet):
    """One self-contained HTML report (opens offline) from recordings.

    What KSM saved and ballooning returned, event rates against the kernel's
    counters, ksmd's passes with findings and the setting to change, a
    sortable table per VM/process, who shares pages with whom, and the
    recording's integrity.  Several recordings (hosts) give a fleet view.
    """
    from . import html, model

    start = time.monotonic()

    def progress(line: str) -> None:
        if not quiet:
            click.echo(f"report: {line} [{time.monotonic() - start:.1f}s]", err=True)

    m = model.from_recordings(files, progress)
    if any(p.stat().st_size >= model.LARGE_BYTES for p in files):
        progress("rendering")
    try:
        size = html.write(m, output)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from e
    if not quiet:
        click.echo(f"Wrote {output} ({size / 2**20:.1f} MiB, {len(m.hosts)} recording"
                   f"{'s' if len(m.hosts) != 1 else ''}) in {time.monotonic() - start:.1f}s.",
                   err=True)
