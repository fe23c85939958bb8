"""Media Storage Application Profiles (PS3.11), kept as data.

Each profile is one TOML file under ``profiles/`` at the top of the repository (or any folder
named by ``MASTERING_PROFILES``). The code never names a profile: a new profile is a new file.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

#: Where the bundled profile files live (repository layout: ``mastering/`` beside ``profiles/``).
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "profiles"

MEDIA_KINDS = ("cd", "dvd", "bd", "usb")


class ProfileError(ValueError):
    """A profile file is missing or malformed."""


@dataclass(frozen=True)
class Profile:
    """The rules one application profile imposes on a File-set and its medium."""

    id: str
    title: str
    standard: str
    description: str
    media_kind: str
    capacity_bytes: int  # 0 = unlimited
    max_file_bytes: int  # 0 = unlimited
    filesystem: str  # "iso9660" or "fat"
    interchange_level: int
    joliet: bool
    rock_ridge: bool
    udf: str
    transfer_syntaxes: tuple[str, ...]  # UIDs
    max_components: int
    max_component_length: int
    #: record type -> {"1": [...], "1C": [...], ...}: keys this profile adds to Annex F
    extra_keys: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def writes_iso(self) -> bool:
        return self.filesystem == "iso9660"

    def allows(self, transfer_syntax: str) -> bool:
        return transfer_syntax in self.transfer_syntaxes

    def component_ok(self, component: str) -> bool:
        """PS3.10 8.2/8.5: 1..N characters of A-Z 0-9 _."""
        return bool(re.fullmatch(rf"[A-Z0-9_]{{1,{self.max_component_length}}}", component))

    def with_capacity(self, capacity_bytes: int) -> Profile:
        from dataclasses import replace

        return replace(self, capacity_bytes=capacity_bytes)


def profile_dirs() -> list[Path]:
    extra = os.environ.get("MASTERING_PROFILES")
    dirs = [Path(p) for p in extra.split(os.pathsep) if p] if extra else []
    return [*dirs, BUNDLED_DIR]


def _parse(path: Path) -> Profile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: {exc}") from exc
    try:
        media, fs, ts, naming = (
            data["media"],
            data["filesystem"],
            data["transfer_syntaxes"],
            data["naming"],
        )
        kind = media["kind"]
        if kind not in MEDIA_KINDS:
            raise ProfileError(f"{path}: media.kind must be one of {MEDIA_KINDS}, not {kind!r}")
        extra = {
            rtype: {ktype: tuple(keys) for ktype, keys in table.items()}
            for rtype, table in data.get("records", {}).items()
        }
        return Profile(
            id=data["id"],
            title=data["title"],
            standard=data.get("standard", ""),
            description=data.get("description", ""),
            media_kind=kind,
            capacity_bytes=int(media.get("capacity_bytes", 0)),
            max_file_bytes=int(media.get("max_file_bytes", 0)),
            filesystem=fs["type"],
            interchange_level=int(fs.get("interchange_level", 1)),
            joliet=bool(fs.get("joliet", False)),
            rock_ridge=bool(fs.get("rock_ridge", False)),
            udf=fs.get("udf", ""),
            transfer_syntaxes=tuple(str(u) for u in ts["allowed"]),
            max_components=int(naming.get("max_components", 7)),
            max_component_length=int(naming.get("max_component_length", 8)),
            extra_keys=extra,
            path=path,
        )
    except KeyError as exc:
        raise ProfileError(f"{path}: missing {exc}") from exc


def available() -> dict[str, Profile]:
    """All profiles found, by ID; earlier directories win over the bundled ones."""
    found: dict[str, Profile] = {}
    for folder in reversed(profile_dirs()):
        for path in sorted(folder.glob("*.toml")):
            prof = _parse(path)
            found[prof.id] = prof
    return dict(sorted(found.items()))


def load(name: str) -> Profile:
    """A profile by ID (``STD-GEN-CD``) or by the path of its TOML file."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return _parse(path)
    profiles = available()
    key = name.upper()
    if key not in profiles:
        raise ProfileError(f"unknown profile {name!r}; known: {', '.join(profiles)}")
    return profiles[key]
