"""The daemon's configuration: one TOML file (``systemd/mastering-daemon.toml`` is a commented
example; README.md documents every key). Unknown keys are errors, so a typo never silently
turns a safety setting off."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

GROUP_BY = ("study", "patient", "calling_ae")
BLANK = ("never", "as_needed")
DRIVE_KINDS = ("disc", "image_folder")


class ConfigError(ValueError):
    """The configuration file is unreadable or a key has a wrong value; says which."""


@dataclass
class Daemon:
    spool: Path = Path("/var/spool/dicom-burner")
    database: Path | None = None  # default: <spool>/jobs.sqlite
    log_level: str = "info"
    tick_seconds: float = 0.5
    retention_days: float = 7.0
    #: failed and cancelled jobs, and instances in no job (assembly off and never submitted,
    #: left out by the operator): their spool is released this long after
    unfinished_retention_days: float = 30.0
    quarantine_retention_days: float = 7.0  # refused data sets and their reasons
    status_seconds: float = 5.0  # how often STATUS= is refreshed


@dataclass
class Scp:
    ae_title: str = "BURNER"
    bind: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: list[str] = field(default_factory=list)
    allowed_peers: list[str] = field(default_factory=list)
    require_called_aet: bool = True
    max_associations: int = 8
    max_pdu: int = 65536
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    min_free_mb: int = 500
    quarantine_max_mb: int = 1000  # refused data sets beyond this are not kept (0: no limit)


@dataclass
class Assembly:
    group_by: str = "study"
    quiet_seconds: float = 60.0
    auto: bool = True  # False: only MCM requests and `jobs submit` make jobs


@dataclass
class Commitment:
    enabled: bool = True
    report_delay: float = 0.0  # seconds between the N-ACTION answer and the N-EVENT-REPORT
    connect_timeout: float = 10.0  # seconds to reach a peer for a report on a new association
    retry_seconds: float = 15.0  # how often undelivered reports are tried again
    peers: dict[str, str] = field(default_factory=dict)  # calling AE -> "host:port"


@dataclass
class Mcm:
    enabled: bool = True
    instance_timeout: float = 600.0


@dataclass
class Media:
    profile: str = "STD-GEN-CD"
    capacity: int = 0  # bytes per disc; 0 = the profile's
    copies: int = 1
    span: bool = True
    label: bool = True
    viewer: bool = False
    site: Path | None = None
    workers: int = 1


@dataclass
class Retry:
    max_attempts: int = 5
    backoff_seconds: float = 30.0
    max_backoff_seconds: float = 900.0


@dataclass
class Watch:
    folder: Path | None = None
    marker: str = "READY"
    poll_seconds: float = 2.0


@dataclass
class Drive:
    name: str
    device: str = ""  # /dev/sr0 or stdio:/path (an xorriso pseudo-drive)
    kind: str = "disc"
    folder: Path | None = None  # image_folder: the robot's hot folder
    blank: str = "never"
    speed: str = ""
    eject: bool = True
    xorriso: str = "xorriso"
    poll_seconds: float = 5.0  # how often an empty drive is asked for a blank disc


@dataclass
class Config:
    daemon: Daemon = field(default_factory=Daemon)
    scp: Scp = field(default_factory=Scp)
    assembly: Assembly = field(default_factory=Assembly)
    commitment: Commitment = field(default_factory=Commitment)
    mcm: Mcm = field(default_factory=Mcm)
    media: Media = field(default_factory=Media)
    retry: Retry = field(default_factory=Retry)
    watch: Watch = field(default_factory=Watch)
    drives: list[Drive] = field(default_factory=list)
    path: Path | None = None

    @property
    def database(self) -> Path:
        return self.daemon.database or self.daemon.spool / "jobs.sqlite"


SECTIONS = {"daemon": Daemon, "scp": Scp, "assembly": Assembly, "commitment": Commitment,
            "mcm": Mcm, "media": Media, "retry": Retry, "watch": Watch}


def _section(cls, name: str, data: dict, base: Path):
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"[{name}] unknown key {key!r}")
        values[key] = _coerce(f"{name}.{key}", known[key].type, value, base)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{name}]: {exc}") from exc


def _coerce(key: str, typ: str, value, base: Path):
    def wrong(what: str) -> ConfigError:
        return ConfigError(f"{key}: expected {what}, got {value!r}")

    if "Path" in typ:
        if not isinstance(value, str):
            raise wrong("a path")
        if not value:
            return None
        p = Path(value)
        return p if p.is_absolute() else (base / p)
    if typ == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if typ == "str":
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if typ.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return value
    if typ.startswith("dict"):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise wrong("a table of strings")
        return dict(value)
    raise wrong(typ)  # pragma: no cover - a field type this loader does not know


def load(path: Path) -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return from_dict(data, path.parent.absolute(), path)


def from_dict(data: dict, base: Path, path: Path | None = None) -> Config:
    cfg = Config(path=path)
    for name, value in data.items():
        if name == "drives":
            if not isinstance(value, list):
                raise ConfigError("[[drives]] must be an array of tables")
            cfg.drives = [_section(Drive, f"drives[{i}]", d, base) for i, d in enumerate(value)]
        elif name in SECTIONS:
            setattr(cfg, name, _section(SECTIONS[name], name, value, base))
        else:
            raise ConfigError(f"unknown section [{name}]")
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    scp = cfg.scp
    if not 1 <= len(scp.ae_title.strip()) <= 16:
        raise ConfigError("scp.ae_title: 1-16 characters")
    if not 0 <= scp.port <= 65535:
        raise ConfigError("scp.port: 0-65535")
    for peer in scp.allowed_peers:
        try:
            ipaddress.ip_network(peer, strict=False)
        except ValueError as exc:
            raise ConfigError(f"scp.allowed_peers: {exc}") from exc
    if scp.max_pdu != 0 and scp.max_pdu < 4096:
        raise ConfigError("scp.max_pdu: 0 (unlimited) or at least 4096")
    if scp.max_associations < 1:
        raise ConfigError("scp.max_associations: at least 1")
    if cfg.assembly.group_by not in GROUP_BY:
        raise ConfigError(f"assembly.group_by: one of {', '.join(GROUP_BY)}")
    if cfg.media.copies < 1:
        raise ConfigError("media.copies: at least 1")
    d = cfg.daemon
    if min(d.retention_days, d.unfinished_retention_days, d.quarantine_retention_days) < 0:
        raise ConfigError("daemon.*retention_days: 0 or more")
    if d.unfinished_retention_days * 86400 <= cfg.mcm.instance_timeout:
        raise ConfigError("daemon.unfinished_retention_days must be longer than "
                          "mcm.instance_timeout (instances waiting for a request are kept)")
    for peer in cfg.commitment.peers.values():
        _host_port("commitment.peers", peer)
    names = set()
    for d in cfg.drives:
        if d.name in names:
            raise ConfigError(f"drives: the name {d.name!r} is used twice")
        names.add(d.name)
        if d.kind not in DRIVE_KINDS:
            raise ConfigError(f"drives {d.name}: kind is one of {', '.join(DRIVE_KINDS)}")
        if d.blank not in BLANK:
            raise ConfigError(f"drives {d.name}: blank is one of {', '.join(BLANK)}")
        if d.kind == "disc" and not d.device:
            raise ConfigError(f"drives {d.name}: a disc drive needs device (/dev/sr0 or "
                              "stdio:/path)")
        if d.kind == "image_folder" and d.folder is None:
            raise ConfigError(f"drives {d.name}: an image folder needs folder")


def _host_port(key: str, value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{key}: {value!r} is not host:port")
    return host, int(port)


def peer_address(cfg: Config, calling_ae: str) -> tuple[str, int] | None:
    """Where to open a new association to a Storage Commitment requester, if configured."""
    value = cfg.commitment.peers.get(calling_ae.strip())
    return _host_port("commitment.peers", value) if value else None
