"""Start-up: ``mastering --help`` and ``mastering profiles`` load neither pydicom, numpy nor
rich (off a terminal), so they start in a blink; ``mastering iso`` loads the transcoder
(and with it the codecs' encoders) only when a file needs transcoding, and the renderer and
templates only for web content or labels. pydicom 3 itself imports its decoder plugins (and
through them pylibjpeg, gdcm and Pillow) when it is imported: that part (about 30 ms) is
pydicom's. (Wall times are in BENCHMARKS.md, from bench/run.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import make_ct

HEAVY = ("pydicom", "numpy", "rich", "PIL", "jinja2", "pycdlib")
ON_DEMAND = ("mastering.transcode", "mastering.render", "mastering.webcontent", "mastering.pdi",
             "jinja2", "simplejpeg")

PROBE = """
import json, sys
from mastering import cli
code = 0
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(
    m if m.startswith("mastering.") else m.split(".")[0] for m in sys.modules)}),
      file=sys.stderr)
"""


def _loaded(*args: str) -> tuple[int, set[str]]:
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                         timeout=120)
    report = json.loads(res.stderr.strip().splitlines()[-1])
    return report["code"], set(report["modules"])


def test_help_and_profiles_load_nothing_heavy() -> None:
    for args in (["--help"], ["profiles"], ["profiles", "--json"], ["iso", "--help"]):
        code, modules = _loaded(*args)
        assert code == 0, args
        assert not modules & set(HEAVY), (args, modules & set(HEAVY))


def test_iso_loads_no_transcoder_when_nothing_is_transcoded(tmp_path: Path) -> None:
    make_ct(tmp_path / "in", "a.dcm", instance=1)
    make_ct(tmp_path / "in", "b.dcm", instance=2, implicit=True)  # re-encoded, no codec
    code, modules = _loaded("iso", str(tmp_path / "in"), "-o", str(tmp_path / "o.iso"), "-q",
                            "--workers", "1")
    assert code == 0 and (tmp_path / "o.iso").exists()
    assert not modules & set(ON_DEMAND), modules & set(ON_DEMAND)
