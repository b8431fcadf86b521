"""A stand-in for QEMU's QMP side, for tests/test_qmp.py (no root, no QEMU).

    python fake_qemu.py SOCKET MODE [--ignore-sigterm]

MODE says how it answers on the QMP socket SOCKET:
  ok      greeting, then qmp_capabilities, query-balloon, balloon, qom-set,
          qom-get (guest-stats) and quit (answers, then exits) like QEMU 7.2
  silent  accepts connections and never sends anything (not even the greeting)
  mute    greeting and qmp_capabilities, then never answers again (a QEMU
          whose main loop is stuck)
--ignore-sigterm: SIGTERM does nothing (only SIGKILL stops it).
Prints "listening" once the socket accepts connections.
"""
import json
import os
import signal
import socket
import sys
import threading
import time

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": ["oob"]}}
RAM = 256 << 20


def serve(conn: socket.socket, mode: str) -> None:
    state = {"actual": RAM}
    f = conn.makefile("rb")

    def send(obj):
        conn.sendall(json.dumps(obj).encode() + b"\r\n")

    if mode == "silent":
        for _ in f:
            pass
        return
    send(GREETING)
    for line in f:
        msg = json.loads(line)
        cmd, mid = msg.get("execute"), msg.get("id")
        if mode == "mute" and cmd != "qmp_capabilities":
            continue
        if cmd == "query-balloon":
            send({"return": {"actual": state["actual"]}, "id": mid})
        elif cmd == "balloon":
            state["actual"] = msg["arguments"]["value"]
            send({"event": "BALLOON_CHANGE", "data": {"actual": state["actual"]},
                  "timestamp": {"seconds": int(time.time()), "microseconds": 0}})
            send({"return": {}, "id": mid})
        elif cmd == "qom-get":
            send({"return": {"stats": {"stat-free-memory": 1 << 27,
                                       "stat-swap-in": 2 ** 64 - 1},
                             "last-update": int(time.time())}, "id": mid})
        elif cmd in ("qmp_capabilities", "qom-set"):
            send({"return": {}, "id": mid})
        elif cmd == "quit":
            send({"return": {}, "id": mid})
            os._exit(0)
        else:
            send({"error": {"class": "CommandNotFound",
                            "desc": f"The command {cmd} has not been found"}, "id": mid})


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    if "--ignore-sigterm" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, mode), daemon=True).start()


if __name__ == "__main__":
    main()
