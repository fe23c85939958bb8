"""sd_notify(3) without a systemd dependency: one AF_UNIX datagram to ``$NOTIFY_SOCKET``.

READY=1 once the SCP listens and the queue is recovered, WATCHDOG=1 from the main loop (only
when ``$WATCHDOG_USEC`` is set, and ``$WATCHDOG_PID`` is ours or unset), STATUS= with the
queue and drive state, STOPPING=1 on the way out. Without ``$NOTIFY_SOCKET`` every call is a
no-op, so the daemon runs the same under systemd, in a terminal and in the tests.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, env: dict[str, str] | None = None):
        env = os.environ if env is None else env
        self.address = env.get("NOTIFY_SOCKET", "")
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else 0.0
        self._last_ping = 0.0
        self._last_status = ""

    def send(self, message: str) -> bool:
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(target)
                s.sendall(message.encode("utf-8"))
        except OSError:
            return False  # systemd gone or the socket missing: nothing to tell
        return True

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self._last_status = status

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self, now: float | None = None) -> None:
        """Ping at half the watchdog interval (or more often); cheap to call every tick."""
        if not self.watchdog_interval:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_ping >= self.watchdog_interval / 2:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")
