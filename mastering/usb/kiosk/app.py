"""The kiosk's web application (Starlette on uvicorn): one page rendered from the Jinja2
template ``templates/kiosk/index.htm`` with plain CSS and JavaScript next to it (no build
step), a JSON snapshot of the state, and Server-Sent Events that push a new snapshot to every
open page whenever a stick comes or goes or an export moves on.

Security: the kiosk listens on localhost unless configured otherwise, and then every request
needs the access token (the ``Authorization: Bearer`` header, or a cookie set once by opening
``/?token=...``, which then redirects so the token leaves the address bar). State-changing
requests must be JSON with the ``X-Kiosk: 1`` header, which a page of another site cannot send
without CORS, and a matching Origin if the browser sends one. Every request must name this
kiosk in its Host header (127.0.0.1, localhost or [::1] and the port it listens on; names
configured in ``[kiosk] hosts`` when it listens elsewhere): a page of another site whose name
was rebound to 127.0.0.1 (DNS rebinding) carries its own name there and is refused, so it can
neither read the state (patient names) nor start anything. The access log names the route and
the status only: no query strings, no bodies, no patient data.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from pathlib import Path

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from ...webcontent import BUNDLED_TEMPLATES
from .state import Kiosk, KioskError

access = logging.getLogger("mastering.kiosk.access")
PAGE_DIR = BUNDLED_TEMPLATES / "kiosk"
STATIC = {"kiosk.css": "text/css", "kiosk.js": "text/javascript"}
COOKIE = "kiosk_token"
HEARTBEAT = 15.0


def create_app(kiosk: Kiosk, *, token: str = "", page_dir: Path = PAGE_DIR) -> Starlette:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(page_dir)), autoescape=True)
    loop_box: dict[str, asyncio.AbstractEventLoop] = {}
    waiters: set[asyncio.Event] = set()

    def notify() -> None:  # called from kiosk threads
        loop = loop_box.get("loop")
        if loop is not None:
            loop.call_soon_threadsafe(lambda: [w.set() for w in list(waiters)])

    async def page(request: Request) -> Response:
        if token and request.query_params.get("token"):
            if not hmac.compare_digest(request.query_params["token"], token):
                return _plain("Wrong access token.", 403)
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return resp
        html = env.get_template("index.htm").render()
        return HTMLResponse(html, headers=_page_headers())

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return _plain("Not found.", 404)
        return FileResponse(page_dir / name, media_type=STATIC[name],
                            headers={"Cache-Control": "no-cache"})

    async def state(request: Request) -> Response:
        return JSONResponse(kiosk.snapshot(), headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        loop_box["loop"] = asyncio.get_running_loop()
        wake = asyncio.Event()
        waiters.add(wake)

        async def stream():
            try:
                seen = -1
                while True:
                    if kiosk.version != seen:
                        seen = kiosk.version
                        yield f"data: {json.dumps(kiosk.snapshot())}\n\n"
                    try:
                        await asyncio.wait_for(wake.wait(), timeout=HEARTBEAT)
                        await asyncio.sleep(0.05)  # let a burst of changes settle
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                    wake.clear()
                    if await request.is_disconnected():
                        return
            finally:
                waiters.discard(wake)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def act(request: Request, action) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _plain("Bad request.", 400)
        try:
            result = await asyncio.to_thread(action, body if isinstance(body, dict) else {})
        except KioskError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return JSONResponse(result or {"ok": True})

    async def do_export(request: Request) -> Response:
        return await act(request, lambda b: {"job": kiosk.start_export(
            str(b.get("stick", "")), [str(s) for s in b.get("studies", [])],
            str(b.get("mode", ""))).id})

    async def do_format(request: Request) -> Response:
        return await act(request, lambda b: {"job": kiosk.start_format(str(b.get("stick", "")))
                                             .id})

    async def do_cancel(request: Request) -> Response:
        return await act(request, lambda b: kiosk.cancel())

    async def do_dismiss(request: Request) -> Response:
        return await act(request, lambda b: kiosk.dismiss())

    async def do_refresh(request: Request) -> Response:
        return await act(request, lambda b: kiosk.refresh_sources())

    routes = [Route("/", page), Route("/static/{name}", static), Route("/api/state", state),
              Route("/api/events", events), Route("/api/export", do_export, methods=["POST"]),
              Route("/api/format", do_format, methods=["POST"]),
              Route("/api/cancel", do_cancel, methods=["POST"]),
              Route("/api/dismiss", do_dismiss, methods=["POST"]),
              Route("/api/refresh", do_refresh, methods=["POST"])]
    kiosk.listeners.append(notify)
    return Starlette(routes=routes, middleware=[Middleware(_Guard, token=token, box=loop_box,
                                                          hosts=kiosk.cfg.allowed_hosts)])


class _Guard:
    """Token and request checks before any route, and the access log: method, route and
    status only (no query string, no body, no patient data)."""

    def __init__(self, app, token: str, box: dict, hosts: frozenset[str]):
        self.app, self.token, self.box, self.hosts = app, token, box, hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.box.setdefault("loop", asyncio.get_running_loop())
        request = Request(scope)
        start = time.monotonic()
        path = request.url.path
        route = path if path in _ROUTES else "(other)"

        async def logged(message) -> None:
            if message["type"] == "http.response.start":
                access.info("%s %s %d %.0fms", request.method, route, message["status"],
                            1000 * (time.monotonic() - start))
            await send(message)

        refusal = _refuse(request, self.token, self.hosts)
        await (refusal or self.app)(scope, receive, logged)


_ROUTES = {"/", "/static/kiosk.css", "/static/kiosk.js", "/api/state", "/api/events",
           "/api/export", "/api/format", "/api/cancel", "/api/dismiss", "/api/refresh",
           "/favicon.ico"}


def _host_ok(request: Request, hosts: frozenset[str]) -> bool:
    """The Host header names this kiosk: an allowed name and the port it listens on."""
    host = request.headers.get("host", "").strip().lower()
    if host.startswith("["):  # [::1]:8080
        name, _, rest = host.partition("]")
        name, port = name + "]", rest[1:] if rest.startswith(":") else rest or ""
    else:
        name, _, port = host.partition(":")
    if port and not port.isdigit():
        return False
    server = request.scope.get("server")
    listening = server[1] if server and len(server) > 1 else None
    return name in hosts and (listening is None or int(port or 80) == listening)


def _refuse(request: Request, token: str, hosts: frozenset[str]) -> Response | None:
    if not _host_ok(request, hosts):
        return _plain("Refused: this kiosk is not known by that name.", 421)
    if token:
        given = request.cookies.get(COOKIE, "")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        opening = request.url.path == "/" and "token" in request.query_params
        if not opening and not hmac.compare_digest(given, token):
            return _plain("This kiosk needs its access token.", 401)
    if request.method == "POST":
        if request.headers.get("x-kiosk") != "1" or "json" not in request.headers.get(
                "content-type", ""):
            return _plain("Refused.", 403)
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            return _plain("Refused.", 403)
    return None


def _plain(text: str, status: int) -> Response:
    return Response(text, status_code=status, media_type="text/plain; charset=utf-8")


def _page_headers() -> dict[str, str]:
    return {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                       "style-src 'self'; script-src 'self'; "
                                       "frame-ancestors 'none'",
            "Referrer-Policy": "no-referrer"}
