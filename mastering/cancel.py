"""Cancellation: the front-end sets an Event (Ctrl-C, SIGTERM, a kiosk's button) and every
long loop of the run checks it."""

from __future__ import annotations

from threading import Event


class Cancelled(Exception):
    """The caller's cancellation event was set."""


def check(cancel: Event | None, where: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"cancelled {where}")
