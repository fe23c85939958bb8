"""The kiosk's configuration file (TOML), for example /etc/mastering/kiosk.toml::

    [kiosk]
    listen = "127.0.0.1:8080"      # host:port; anything but loopback needs token
    token = ""                     # access token (a long random string) for other hosts
    hosts = []                     # with a token: names the page may be opened by
                                   # ("kiosk3.radiology.example"); the Host header must be
                                   # one of them, the listen address or, on loopback,
                                   # 127.0.0.1, localhost or [::1] (DNS rebinding)
    profile = "STD-GEN-USB-JPEG"   # the USB application profile
    viewer = true                  # IHE PDI web content on the stick (DICOM PLUS WEB)
    fileset_id = "DICOM_MEDIA"     # File-set ID of new File-sets
    site = "/etc/mastering/site.toml"   # institution for the web pages (templates/README.md)
    rescan_seconds = 300           # how often the study folders are read again

    [sources]
    folders = ["/srv/dicom/export"]     # every study found below these folders is offered

    [usb]                          # the device policy (mastering.usb.devices.Policy)
    max_size = "256 GB"
    allow_non_removable = false
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ... import profiles
from ..devices import Policy

KIOSK_KEYS = {"listen", "token", "profile", "viewer", "fileset_id", "site", "rescan_seconds",
              "hosts"}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


@dataclass
class KioskConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""
    profile: profiles.Profile = field(default_factory=lambda: profiles.load("STD-GEN-USB-JPEG"))
    viewer: bool = True
    fileset_id: str = "DICOM_MEDIA"
    site: Path | None = None
    rescan_seconds: float = 300
    folders: tuple[Path, ...] = ()
    policy: Policy = field(default_factory=Policy)
    hosts: tuple[str, ...] = ()  # configured names (with a token)

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """Host header names (lower case, without the port) a request may carry."""
        names = set(LOOPBACK_NAMES)
        if not self.loopback:
            names.add(f"[{self.host}]" if ":" in self.host else self.host)
            names.update(h.lower() for h in self.hosts)
        return frozenset(n.lower() for n in names if n not in ("0.0.0.0", "[::]"))

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def load(path: Path) -> KioskConfig:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    base = Path(path).resolve().parent
    kiosk = data.get("kiosk", {})
    unknown = set(kiosk) - KIOSK_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown [kiosk] key(s): {', '.join(sorted(unknown))}")
    cfg = KioskConfig()
    host, _, port = str(kiosk.get("listen", "127.0.0.1:8080")).rpartition(":")
    try:
        cfg.host, cfg.port = host.strip("[]") or "127.0.0.1", int(port)
    except ValueError as exc:
        raise ConfigError(f"{path}: listen must be host:port") from exc
    cfg.token = str(kiosk.get("token", ""))
    hosts = kiosk.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(f"{path}: [kiosk] hosts must be a list of host names")
    cfg.hosts = tuple(hosts)
    try:
        cfg.profile = profiles.load(str(kiosk.get("profile", "STD-GEN-USB-JPEG")))
        cfg.policy = Policy.from_config(data.get("usb", {}))
    except (profiles.ProfileError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if cfg.profile.filesystem != "fat":
        raise ConfigError(f"{path}: profile {cfg.profile.id} is not a USB profile")
    cfg.viewer = bool(kiosk.get("viewer", True))
    cfg.fileset_id = str(kiosk.get("fileset_id", "DICOM_MEDIA"))
    cfg.site = base / kiosk["site"] if kiosk.get("site") else None
    cfg.rescan_seconds = float(kiosk.get("rescan_seconds", 300))
    cfg.folders = tuple(base / f for f in data.get("sources", {}).get("folders", []))
    if cfg.hosts and cfg.loopback:
        raise ConfigError(f"{path}: [kiosk] hosts is for a kiosk listening beyond localhost "
                          "(with a token); on localhost only 127.0.0.1, localhost and [::1] "
                          "are accepted")
    if not cfg.loopback and len(cfg.token) < 16:
        raise ConfigError(f"{path}: listening on {cfg.host} needs [kiosk] token (at least 16 "
                          "characters); without one the kiosk only listens on localhost")
    return cfg
