"""Profiles are data: every bundled file loads, and a new profile is a new file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mastering import profiles
from mastering.part10 import EXPLICIT_LE


def test_bundled_profiles() -> None:
    found = profiles.available()
    for pid, prof in found.items():
        assert prof.id == pid and EXPLICIT_LE in prof.transfer_syntaxes
        assert prof.max_components <= 7 and prof.max_component_length == 8
    cd = found["STD-GEN-CD"]
    assert cd.transfer_syntaxes == (EXPLICIT_LE,) and cd.interchange_level == 1
    assert not cd.joliet and not cd.rock_ridge and not cd.udf
    assert found["STD-GEN-DVD-J2K"].allows("1.2.840.10008.1.2.4.90")
    assert not found["STD-GEN-DVD-JPEG"].allows("1.2.840.10008.1.2.4.90")
    assert found["STD-GEN-USB-JPEG"].filesystem == "fat"
    assert found["STD-GEN-DVD-JPEG"].extra_keys["IMAGE"]["1"] == ("Rows", "Columns")


def test_new_profile_is_a_new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (profiles.BUNDLED_DIR / "STD-GEN-CD.toml").read_text()
    (tmp_path / "local.toml").write_text(text.replace('id = "STD-GEN-CD"', 'id = "LOCAL-CD74"')
                                         .replace("737280000", "681984000"))
    monkeypatch.setenv("MASTERING_PROFILES", str(tmp_path))
    prof = profiles.load("local-cd74")
    assert prof.capacity_bytes == 681984000
    assert profiles.load(str(tmp_path / "local.toml")).id == "LOCAL-CD74"


def test_bad_profiles_are_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('id = "X"\n[media]\nkind = "floppy"\n')
    with pytest.raises(profiles.ProfileError):
        profiles.load(str(tmp_path / "bad.toml"))
    with pytest.raises(profiles.ProfileError, match="unknown profile"):
        profiles.load("STD-NOPE")
