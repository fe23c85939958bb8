"""``mastering kiosk --config FILE``: the kiosk on uvicorn, as a systemd service.

sd_notify (a datagram to $NOTIFY_SOCKET): READY=1 once the socket listens, WATCHDOG=1 from the
event loop every half $WATCHDOG_USEC (a hung loop gets the service restarted), STOPPING=1 on
SIGTERM. uvicorn's own access log is off; :mod:`.app` logs routes and statuses only.

On SIGTERM or SIGINT uvicorn shuts the server down and raises the signal again; the handler
installed here takes that, so that the kiosk then cancels a running export, waits for it to
end and leaves the stick unmounted (:meth:`.state.Kiosk.stop`, bounded) before the process
exits, instead of dying with the stick mounted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from .config import ConfigError, load

log = logging.getLogger("mastering.kiosk")


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify); False when not started by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def _watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def serve(config: Path) -> int:
    import uvicorn

    from .app import create_app
    from .state import Kiosk

    logging.basicConfig(level=os.environ.get("MASTERING_LOG", "INFO"), stream=sys.stderr,
                        format="%(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    try:
        cfg = load(config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    kiosk = Kiosk(cfg)
    app = create_app(kiosk, token=cfg.token)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, access_log=False,
                                           log_config=None, log_level="warning",
                                           lifespan="off", timeout_graceful_shutdown=3))

    async def main() -> None:
        kiosk.start()
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else cfg.port
        log.info("kiosk listening on http://%s:%d/", cfg.host, port)
        sd_notify(f"READY=1\nSTATUS=listening on {cfg.host}:{port}")
        interval = _watchdog_interval()
        while not task.done():
            if interval:
                sd_notify("WATCHDOG=1")
            await asyncio.wait([task], timeout=interval or 3600)
        sd_notify("STOPPING=1")
        await task

    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda signum, _frame: None) for sig in signals}
    try:
        asyncio.run(main())
    finally:
        kiosk.stop()  # cancel a running export, wait for it, unmount (bounded)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 6
