"""The kiosk's HTTP rules without a browser: the access token, the request checks, an access
log without query strings or patient data, the configuration's refusals, the progress
arithmetic, and the study source."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():  # starlette 1.x suggests httpx2 for its test client
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from mastering import profiles
from mastering.usb.kiosk import config as kconfig
from mastering.usb.kiosk.app import create_app
from mastering.usb.kiosk.sources import FolderSource, person
from mastering.usb.kiosk.state import Job, Kiosk

from ..conftest import ct_series

TOKEN = "s3cret-token-0123456789"
POST = {"X-Kiosk": "1", "Content-Type": "application/json"}


BASE = "http://127.0.0.1:8080"  # the test client's server address: Host 127.0.0.1:8080


def _client(token: str = "", folders: tuple[Path, ...] = (), **cfg_kw) -> TestClient:
    cfg = kconfig.KioskConfig(token=token, folders=folders, **cfg_kw)
    return TestClient(create_app(Kiosk(cfg, sources=[]), token=token), base_url=BASE)


def test_localhost_needs_no_token_but_posts_need_the_header() -> None:
    client = _client()
    assert client.get("/api/state").json()["sticks"] == []
    assert "Images to a USB stick" in client.get("/").text
    assert client.get("/").headers["content-security-policy"].startswith("default-src 'self'")
    assert client.post("/api/export", json={}).status_code == 403  # no X-Kiosk header
    assert client.post("/api/export", content="x", headers={"X-Kiosk": "1"}).status_code == 403
    res = client.post("/api/export", json={"stick": "sdb:1:2", "studies": ["a"]}, headers=POST)
    assert res.status_code == 409 and "insert it again" in res.json()["error"]
    evil = {**POST, "Origin": "http://elsewhere.example"}
    assert client.post("/api/dismiss", json={}, headers=evil).status_code == 403
    assert client.get("/static/kiosk.js").status_code == 200
    assert client.get("/static/../../etc/passwd").status_code == 404


def test_dns_rebinding_is_refused_by_the_host_header() -> None:
    """A page of evil.example:8080 whose name was rebound to 127.0.0.1 sends Host
    evil.example:8080 (and a matching Origin): it can neither read the state (patient names)
    nor start anything. Only this kiosk's own names and port are accepted."""
    client = _client()
    for host in ("evil.example:8080", "127.0.0.1.evil.example:8080", "localhost:8081",
                 "localhost", "", "[::1]:x"):
        headers = {"Host": host} if host else {"Host": ""}
        assert client.get("/api/state", headers=headers).status_code == 421, host
        assert client.get("/", headers=headers).status_code == 421, host
    rebound = {**POST, "Host": "evil.example:8080", "Origin": "http://evil.example:8080"}
    assert client.post("/api/format", json={"stick": "x"}, headers=rebound).status_code == 421
    for host in ("127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080", "[::1]:8080"):
        assert client.get("/api/state", headers={"Host": host}).status_code == 200, host
    # listening elsewhere (with a token): the configured names, the address, and loopback
    named = _client(TOKEN, host="10.1.2.3", hosts=("kiosk3.radiology.example",))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for host, status in (("kiosk3.radiology.example:8080", 200), ("10.1.2.3:8080", 200),
                         ("evil.example:8080", 421)):
        assert named.get("/api/state", headers={**auth, "Host": host}).status_code == status


def test_token_by_header_or_cookie(caplog) -> None:
    client = _client(TOKEN)
    caplog.set_level(logging.INFO, logger="mastering.kiosk.access")
    assert client.get("/api/state").status_code == 401
    assert client.get("/api/state", headers={"Authorization": f"Bearer {TOKEN}"}).status_code \
        == 200
    assert client.get("/?token=wrong").status_code == 403
    res = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert res.status_code == 303 and res.headers["location"] == "/"
    assert client.get("/api/state").status_code == 200  # the cookie from now on
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "GET / 303" in log and "GET /api/state 401" in log
    assert TOKEN not in log and "token=" not in log


def test_config_refuses_an_open_kiosk_without_token(tmp_path: Path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text('[kiosk]\nlisten = "0.0.0.0:8080"\n')
    with pytest.raises(kconfig.ConfigError, match="token"):
        kconfig.load(cfg)
    cfg.write_text(f'[kiosk]\nlisten = "0.0.0.0:8080"\ntoken = "{TOKEN}"\n'
                   '[sources]\nfolders = ["studies"]\n[usb]\nmax_size = "64 GB"\n')
    loaded = kconfig.load(cfg)
    assert loaded.port == 8080 and loaded.folders == (tmp_path / "studies",)
    assert loaded.policy.max_bytes == 64 * 10**9
    cfg.write_text('[kiosk]\nlisen = "127.0.0.1:1"\n')
    with pytest.raises(kconfig.ConfigError, match="lisen"):
        kconfig.load(cfg)
    cfg.write_text('[kiosk]\nprofile = "STD-GEN-CD"\n')
    with pytest.raises(kconfig.ConfigError, match="not a USB profile"):
        kconfig.load(cfg)
    cfg.write_text('[kiosk]\nhosts = ["kiosk.example"]\n')  # names only with a token
    with pytest.raises(kconfig.ConfigError, match="hosts"):
        kconfig.load(cfg)


def test_progress_only_moves_forward_and_estimates_time_left() -> None:
    job = Job("j", "export", "sdb", "stick")
    job.advance("scan", 5, 10)
    assert 0.05 < job.fraction < 0.10
    job.advance("write PATIENT", 1, 2)
    assert job.phase == "write" and 0.45 < job.fraction < 0.5
    job.advance("scan", 1, 10)  # late news from an earlier stage never moves it back
    assert job.fraction > 0.45
    job.started -= 10
    assert 5 <= job.to_json()["eta_seconds"] <= 15
    assert job.to_json()["phase_text"] == "Copying to the stick"


def test_folder_source_groups_studies(tmp_path: Path) -> None:
    ct_series(tmp_path / "a", 2, 3)
    ct_series(tmp_path / "b", 1, 2, first=4, study_uid="1.2.3.4.8", patient_id="P2",
              patient_name="ROE^RICHARD^^DR")
    source = FolderSource(tmp_path, profiles.load("STD-GEN-USB-JPEG"))
    source.refresh()
    studies = {s.patient_id: s for s in source.studies()}
    assert studies["PID1"].images == 6 and studies["P2"].images == 2
    assert len(source.files(studies["PID1"])) == 6
    assert studies["P2"].to_json()["patient_name"] == "ROE, DR RICHARD"
    assert person("DOE^JANE") == "DOE, JANE" and person("") == ""
