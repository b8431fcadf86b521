"""A small QMP client: QEMU's JSON machine protocol over a UNIX socket.

One JSON object per line each way.  On connect QEMU sends a greeting
(``{"QMP": {...}}``) and accepts nothing but ``qmp_capabilities`` until it has
been sent; then every ``{"execute": ..., "id": N}`` gets exactly one
``{"return": ...}`` or ``{"error": ...}`` with the same id, and asynchronous
``{"event": ...}`` objects may arrive in between (kept in ``events``).

Every wait has a deadline: a QEMU whose main loop is stuck (or a socket that
is something else) gives a QMPTimeout naming the socket and the command,
never a hang.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QMPError(Exception):
    """QMP failed: one line for the user."""


class QMPTimeout(QMPError):
    """QEMU did not answer in time."""


class QMPCommandError(QMPError):
    """QEMU answered with an error object."""

    def __init__(self, command: str, cls: str, desc: str):
        super().__init__(f"QMP {command}: {cls}: {desc}")
        self.command, self.cls, self.desc = command, cls, desc


class QMP:
    """A negotiated QMP session.  ``QMP(path, timeout)`` connects (waiting up
    to ``timeout`` s for the socket to appear and for the greeting)."""

    def __init__(self, path: Path | str, timeout: float = 10.0, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.name
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._id = 0
        self.sock = self._connect(timeout)
        try:
            greeting = self._read(timeout, "the greeting")
            if "QMP" not in greeting:
                raise QMPError(f"{self.name}: not a QMP greeting: {str(greeting)[:80]}")
            self.version = greeting["QMP"].get("version", {}).get("qemu", {})
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                return s
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise QMPTimeout(f"{self.name}: cannot connect to QMP socket {self.path} "
                                     f"within {timeout:g}s ({e.strerror})") from None
                time.sleep(0.05)
            except OSError as e:
                s.close()
                raise QMPError(f"{self.name}: cannot connect to QMP socket {self.path}: "
                               f"{e.strerror}") from None

    def _read(self, timeout: float, what: str, deadline: float | None = None) -> dict[str, Any]:
        """The next JSON object QEMU sends, within `timeout` s (or by `deadline`)."""
        deadline = time.monotonic() + timeout if deadline is None else deadline
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPTimeout(f"{self.name}: QEMU did not answer {what} within {timeout:g}s "
                                 f"(QMP socket {self.path}: QEMU hung or stopped?)")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                raise QMPError(f"{self.name}: QMP connection failed while waiting for {what}: "
                               f"{e.strerror}") from None
            if not chunk:
                raise QMPError(f"{self.name}: QEMU closed the QMP connection while we waited "
                               f"for {what} (QEMU exited?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            obj = json.loads(line)
        except ValueError:
            raise QMPError(f"{self.name}: not QMP (bad JSON): {line[:80]!r}") from None
        if not isinstance(obj, dict):
            raise QMPError(f"{self.name}: not QMP (not an object): {line[:80]!r}")
        return obj

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Run one command; its "return" value.  Events that arrive while
        waiting are kept in ``events``."""
        timeout = self.timeout if timeout is None else timeout
        self._id += 1
        msg: dict[str, Any] = {"execute": command, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\r\n")
        except OSError as e:
            raise QMPError(f"{self.name}: cannot send {command} over QMP: {e.strerror} "
                           f"(QEMU exited?)") from None
        deadline = time.monotonic() + timeout
        while True:
            obj = self._read(timeout, command, deadline)
            if "event" in obj:
                self.events.append(obj)
                continue
            if obj.get("id") != self._id:
                continue   # an answer to a command given up on earlier
            if "error" in obj:
                err = obj["error"]
                raise QMPCommandError(command, err.get("class", "Error"), err.get("desc", ""))
            return obj.get("return")

    def poll_events(self) -> list[dict[str, Any]]:
        """Events that have arrived (without waiting); clears the list."""
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self._buf += chunk
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass
        finally:
            self.sock.setblocking(True)
        while b"\n" in self._buf:
            obj = self._read(1.0, "an event")
            if "event" in obj:
                self.events.append(obj)
        out, self.events = self.events, []
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> QMP:  # noqa: PYI034 (Python 3.9 has no typing.Self)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
