"""The HTML report in a real browser: headless Chromium (Debian's package),
driven through the DevTools protocol over a pipe (--remote-debugging-pipe:
NUL-separated JSON on fds 3 and 4, so no websocket client and no port).

Checks: no console error or uncaught exception, every plot drawn (an SVG with
traces in each plot div), the per-VM table present and sortable, names from
the recording shown as text and never run; a screenshot is saved under
tests/artifacts/.

The report comes from a REAL recording made on this kernel: the
`real_recording` fixture (tests/conftest.py).  To use an existing recording
instead (e.g. while developing, without root or touching KSM):

    OVERCOMMIT_REAL_RECORDING=/tmp/fixtures/host1-events.arrow \\
        .venv/bin/python -m pytest tests/test_report_browser.py
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from reports import html, model
from tracer.recording import read

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio",
         "--hide-scrollbars", "--remote-debugging-pipe"]

if not Path(CHROMIUM).exists():
    pytestmark = [pytest.mark.browser, pytest.mark.skip(
        reason=f"{CHROMIUM} is absent: apt-get install chromium (Debian) for browser tests")]

if os.environ.get("OVERCOMMIT_REAL_RECORDING"):
    # Overrides the conftest fixture: report an existing real recording.
    @pytest.fixture(scope="session")
    def real_recording():
        path = Path(os.environ["OVERCOMMIT_REAL_RECORDING"])
        if not path.exists():
            pytest.fail(f"OVERCOMMIT_REAL_RECORDING={path}: no such file")
        return path


class Browser:
    """Headless Chromium with one page, spoken to over the DevTools pipe."""

    def __init__(self, width: int = 1400, height: int = 3000):
        self.profile = tempfile.mkdtemp(prefix="overcommit-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds():  # Chromium reads commands on fd 3 and writes replies on fd 4
            r, w = os.dup(to_chrome_r), os.dup(from_chrome_w)   # out of the way of 3, 4
            os.dup2(r, 3)
            os.dup2(w, 4)

        # Chromium's own log goes to a file: a pipe nobody reads would fill up.
        self.log = Path(self.profile) / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}",
                 f"--window-size={width},{height}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=fds, pass_fds=(3, 4))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        pages = [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        target = pages[0]["targetId"] if pages else \
            self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width,
                  height=height, deviceScaleFactor=1, mobile=False)

    def _read(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                return None
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe: "
                                   + self.log.read_text(errors="replace")[-2000:])
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(max(0.0, deadline - time.monotonic()))
            if reply is None:
                raise TimeoutError(f"{method}: no reply in {timeout}s")
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ev = self._read(end - time.monotonic())
            if ev is not None:
                self.events.append(ev)

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", session=True, expression=expression,
                      returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, url: str, ready: str, timeout: float = 90) -> None:
        """Navigate, then wait until the JS expression `ready` is truthy."""
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(ready):
                return
            self.pump(0.2)
        raise TimeoutError(f"{url}: `{ready}` still false after {timeout}s")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries so far."""
        out = []
        for ev in self.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console.error: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def requests_off_file(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"
                and not e["params"]["request"]["url"].startswith(("file:", "data:", "about:"))]

    def screenshot(self, path: Path) -> None:
        import base64
        data = self.call("Page.captureScreenshot", session=True, format="png",
                         captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)


PLOTS = """Array.from(document.querySelectorAll('div.plot[data-fig]')).map(d => ({
  fig: d.dataset.fig,
  svgs: d.querySelectorAll('svg.main-svg').length,
  traces: d.querySelectorAll('g.trace, g.hm, g.heatmaplayer image, g.imagelayer image').length,
  height: d.getBoundingClientRect().height}))"""

def _artifacts() -> Path:
    """tests/artifacts/, ignored by git from inside (nothing there is committed)."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    return ARTIFACTS


READY = ("location.protocol === 'file:' && !!document.documentElement"
         " && document.documentElement.hasAttribute('data-plots-ready')")


def _check_plots(b: Browser) -> list[dict]:
    plots = b.evaluate(PLOTS)
    assert plots, "no plot in the report"
    for p in plots:
        assert p["svgs"] > 0 and p["traces"] > 0 and p["height"] > 100, f"plot not drawn: {p}"
    assert int(b.evaluate("document.documentElement.getAttribute('data-plots-ready')")) \
        == len(plots)
    return plots


def test_report_of_real_recording(real_recording, tmp_path):
    out = tmp_path / "report.html"
    html.write(model.from_recordings([real_recording]), out)
    _artifacts()
    b = Browser()
    try:
        b.call("Network.enable", session=True)
        b.open(out.as_uri(), READY)
        b.pump(1.0)   # late console errors, if any
        plots = _check_plots(b)
        figs = {p["fig"].split("-", 1)[1] for p in plots}
        assert {"savings", "rates", "scan_hist", "scans"} <= figs, figs
        if read(real_recording).meta.get("events_streamed"):
            assert "sharing" in figs   # real streamed merges: the matrix is drawn

        # The per-VM/process table, with one row per KSM process, sortable.
        rows = b.evaluate("document.querySelectorAll('table[id$=-processes] tbody tr').length")
        assert rows >= 1
        pids = "Array.from(document.querySelectorAll('table[id$=-processes] tbody tr'))" \
               ".map(r => +r.cells[0].dataset.sort)"
        b.evaluate("document.querySelector('table[id$=-processes] th').click()")
        asc = b.evaluate(pids)
        assert asc == sorted(asc)
        b.evaluate("document.querySelector('table[id$=-processes] th').click()")
        assert b.evaluate(pids) == sorted(asc, reverse=True)

        assert b.errors() == []
        assert b.requests_off_file() == [], "the report must not touch the network"
        b.screenshot(ARTIFACTS / "report-real.png")
    finally:
        b.close()
    assert (ARTIFACTS / "report-real.png").stat().st_size > 10_000


def test_hostile_names_stay_text_in_browser(tmp_path):
    """Names that would run script if rendered as HTML, in table, legend,
    tick labels and hover: nothing runs, and the names show as text."""
    from conftest_reports import HOSTILE_COMM, HOSTILE_VM, synthetic_recording

    js_vm = '<img src=x onerror="window.__xss=1">'
    js_comm = "</script><script>window.__xss=2</script>"
    path = synthetic_recording(tmp_path / "evil.arrow", vm=js_vm, comm=js_comm, events=True)
    other = synthetic_recording(tmp_path / "evil2.arrow", vm=HOSTILE_VM, comm=HOSTILE_COMM,
                                host="<b>h2</b>", events=True, balloon=True, advisor=True)
    out = tmp_path / "evil.html"
    html.write(model.from_recordings([path, other]), out)
    b = Browser()
    try:
        b.open(out.as_uri(), READY)
        b.pump(0.5)
        figs = {p["fig"] for p in _check_plots(b)}
        assert {"fleet", "h1-advisor", "h1-balloon", "h0-sharing"} <= figs
        assert b.evaluate("window.__xss === undefined")
        text = b.evaluate("document.body.innerText")
        assert js_vm in text and js_comm in text     # shown, as text
        legend = b.evaluate("Array.from(document.querySelectorAll('.legendtext'))"
                            ".map(e => e.textContent).join('\\n')")
        assert js_vm in legend
        ticks = b.evaluate("Array.from(document.querySelectorAll('.xtick text, .ytick text'))"
                           ".map(e => e.textContent).join('\\n')")
        assert js_vm in ticks                          # sharing matrix labels
        assert b.evaluate("document.querySelectorAll('main img, main svg script').length") == 0
        assert b.errors() == []
        b.screenshot(_artifacts() / "report-hostile-names.png")
    finally:
        b.close()
