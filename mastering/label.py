"""A printable disc label per volume (IHE PDI, RAD TF-3 4.47.4.1.2; checklist PDI-16).

The label names the patient (name, ID, birth date), the studies (dates and descriptions), the
institution, the creation date, "volume n of m" and whether the medium is "DICOM ONLY" or
"DICOM PLUS WEB". It is not written onto the medium: the caller puts ``OUT.label.svg`` and
``OUT.label.png`` beside the image.

Two outputs from one layout:

* SVG, from the Jinja2 template ``label.svg`` (override it in a template folder): vector, for
  office printers and for editing;
* PNG at 300 dpi, drawn with Pillow in DejaVu Sans: what disc printers' software takes, and
  what a kiosk can show without an SVG renderer. Pillow cannot rasterise SVG, so the PNG draws
  the same layout itself; PDF from Pillow would only wrap the same raster.

Geometry is in 0.1 mm on a 120 mm disc: text stays between the hub and the printable rim;
every line is measured with the font and shrunk (then shortened) to fit its chord.
"""

from __future__ import annotations

import datetime as dt
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .webcontent import KIND_DICOM, KIND_WEB, Renderer, Site, WebPatient, _fmt

SIZE = 1200  # 120 mm in 0.1 mm
CENTER = SIZE / 2
OUTER = 575  # printable radius (115 mm across)
HUB = 230  # no print inside 46 mm
HOLE = 75  # the 15 mm hole, drawn as a guide
MARGIN = 28
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = (FONT_DIR / "DejaVuSans.ttf",
         Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"),
         Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"))
BOLD_FONTS = (FONT_DIR / "DejaVuSans-Bold.ttf",) + FONTS[1:]
SVG_FONT_FAMILY = "'DejaVu Sans', 'Droid Sans Fallback', 'Noto Sans CJK JP', sans-serif"
MAX_PATIENTS = 2
MAX_STUDIES = 4
#: more characters than any line of the disc holds at its smallest size: cut before measuring
MAX_LINE_CHARS = 160
_PROBE = "\U0010fffd"  # in no font: renders as the missing-glyph box


@dataclass(frozen=True)
class Line:
    """One line of text: baseline position, font size and anchor in 0.1 mm; its width as
    measured (the SVG template uses it for the badge behind the kind)."""

    role: str
    text: str
    x: float
    y: float
    size: float
    bold: bool = False
    anchor: str = "middle"  # SVG text-anchor: start | middle | end
    width: float = 0.0


@dataclass
class Layout:
    """Everything the label shows, placed; the template gets this and the raw values."""

    lines: list[Line]
    kind: str
    volume: int
    volumes: int
    created: str
    patients: Sequence[WebPatient]
    site: Site
    size: int = SIZE
    outer: int = OUTER
    hub: int = HUB
    hole: int = HOLE
    font_family: str = SVG_FONT_FAMILY
    t: dict[str, str] = field(default_factory=dict)


class Fonts:
    """DejaVu Sans with per-character fallback fonts (CJK), measured and drawn alike."""

    def __init__(self) -> None:
        self._fonts: dict[tuple[Path, int], ImageFont.FreeTypeFont] = {}
        self._covers: dict[tuple[Path, str], bool] = {}

    def font(self, path: Path, size: float) -> ImageFont.FreeTypeFont:
        key = (path, max(1, round(size)))
        if key not in self._fonts:
            self._fonts[key] = ImageFont.truetype(str(path), key[1])
        return self._fonts[key]

    def _glyph(self, path: Path, char: str) -> bytes:
        font = self.font(path, 24)
        img = Image.new("L", (48, 48))
        ImageDraw.Draw(img).text((4, 4), char, font=font, fill=255)
        return img.tobytes()

    def covers(self, path: Path, char: str) -> bool:
        if char.isspace():
            return True
        if (path, char) not in self._covers:
            self._covers[path, char] = self._glyph(path, char) != self._glyph(path, _PROBE)
        return self._covers[path, char]

    def runs(self, text: str, bold: bool) -> list[tuple[Path, str]]:
        """Split text into runs of one font: the first installed font that has the glyph."""
        chain = [p for p in (BOLD_FONTS if bold else FONTS) if p.is_file()]
        runs: list[tuple[Path, str]] = []
        for char in text:
            path = next((p for p in chain if self.covers(p, char)), chain[0])
            if char.isspace() and runs:
                path = runs[-1][0]
            if runs and runs[-1][0] == path:
                runs[-1] = (path, runs[-1][1] + char)
            else:
                runs.append((path, char))
        return runs

    def width(self, text: str, size: float, bold: bool) -> float:
        return sum(self.font(p, size).getlength(s) for p, s in self.runs(text, bold))


def _chord(y: float, margin: float = MARGIN) -> float:
    """Usable width of the printable ring at height y (outside the hub band)."""
    dy = abs(y - CENTER)
    if dy >= OUTER:
        return 0.0
    return 2 * math.sqrt(OUTER * OUTER - dy * dy) - 2 * margin


def line_text(text: str) -> str:
    """One printable line of at most MAX_LINE_CHARS: newlines, tabs and other control or
    format characters become spaces (the layout engine fails on them) and runs of spaces
    one, so that the cost of a label never depends on how long a value in a file is."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text[:4 * MAX_LINE_CHARS])
                    .split())
    return text if len(text) <= MAX_LINE_CHARS else text[:MAX_LINE_CHARS - 1] + "\u2026"


def _fit(fonts: Fonts, text: str, size: float, bold: bool, room: float) -> tuple[str, float]:
    """Shrink to at most 60 % of the size, then shorten with an ellipsis, to fit room: the
    longest prefix that fits, found by bisection (a few measurements, not one per char)."""
    text = line_text(text)
    floor = size * 0.6
    while size > floor and fonts.width(text, size, bold) > room:
        size -= 1
    if len(text) <= 1 or fonts.width(text, size, bold) <= room:
        return text, size
    lo, hi = 1, len(text) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fonts.width(text[:mid].rstrip() + "\u2026", size, bold) <= room:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "\u2026", size


def _stack(fonts: Fonts, items: list[tuple[str, str, float, bool]], *, top: float | None = None,
           bottom: float | None = None) -> list[Line]:
    """Centered lines from top down (or ending at bottom), each fitted to its chord."""
    heights = [size * 1.3 for _r, _t, size, _b in items]
    y = top if top is not None else (bottom or 0) - sum(heights)
    lines = []
    for (role, text, size, bold), height in zip(items, heights, strict=True):
        y += height
        worst = y - size * 0.8 if y < CENTER else y + size * 0.25
        fitted, fsize = _fit(fonts, text, size, bold, _chord(worst))
        lines.append(Line(role, fitted, CENTER, y - size * 0.3, fsize, bold,
                          width=fonts.width(fitted, fsize, bold)))
    return lines


def _side(fonts: Fonts, role: str, text: str, size: float, y: float, left: bool,
          bold: bool = False) -> Line:
    """A line beside the hub, centered between the hub and the rim."""
    inner, outer = HUB + MARGIN, math.sqrt(OUTER ** 2 - (y - CENTER) ** 2) - MARGIN
    fitted, fsize = _fit(fonts, text, size, bold, outer - inner)
    x = CENTER - (inner + outer) / 2 if left else CENTER + (inner + outer) / 2
    return Line(role, fitted, x, y, fsize, bold, width=fonts.width(fitted, fsize, bold))


def _top_items(patients: Sequence[WebPatient], site: Site,
               t: dict[str, str]) -> list[tuple[str, str, float, bool]]:
    items = [("institution", site.institution, 30.0, False)] if site.institution else []
    for p in patients[:MAX_PATIENTS]:
        born = _fmt(t["label_born"], date=p.birth_date) if p.birth_date else ""
        items.append(("name", p.name or t["unknown_name"], 52.0, True))
        items.append(("patient", " \u00b7 ".join(x for x in (p.id, born) if x), 30.0, False))
    if len(patients) > MAX_PATIENTS:
        more = _fmt(t["label_more_patients"], count=len(patients) - MAX_PATIENTS)
        items.append(("more", more, 26.0, False))
    return items


def _study_items(patients: Sequence[WebPatient],
                 t: dict[str, str]) -> list[tuple[str, str, float, bool]]:
    studies = [s for p in patients for s in p.studies]
    items = []
    for s in studies[:MAX_STUDIES]:
        modalities = ", ".join(s.modalities or dict.fromkeys(
            se.modality for se in s.series if se.modality))
        text = " \u00b7 ".join(x for x in (s.date, modalities, s.description) if x)
        items.append(("study", text, 28.0, False))
    if len(studies) > MAX_STUDIES:
        more = _fmt(t["label_more_studies"], count=len(studies) - MAX_STUDIES)
        items.append(("more", more, 24.0, False))
    return items


def layout(patients: Sequence[WebPatient], *, volume: int, volumes: int, site: Site | None = None,
           web: bool, template_dirs: Sequence[Path] = (),
           created: dt.datetime | None = None) -> tuple[Layout, Renderer]:
    """Place the label's lines: patient block above the hub, studies below, the medium's kind
    left of the hub and volume/creation date right of it."""
    r = Renderer.create(site or Site(), template_dirs, volume=volume, volumes=volumes, web=web,
                        created=created)
    t, fonts = r.t, Fonts()
    kind = KIND_WEB if web else KIND_DICOM
    lines = _stack(fonts, _top_items(patients, r.common["site"], t), bottom=CENTER - HUB - 12)
    lines += _stack(fonts, _study_items(patients, t), top=CENTER + HUB + 6)
    lines.append(_side(fonts, "kind", kind, 30, CENTER + 10, left=True, bold=True))
    volume_text = _fmt(t["volume_of"], volume=volume, volumes=volumes)
    lines.append(_side(fonts, "volume", volume_text, 30, CENTER - 8, left=False, bold=True))
    created_text = _fmt(t["label_created"], date=r.common["created"])
    lines.append(_side(fonts, "created", created_text, 24, CENTER + 32, left=False))
    return Layout(lines, kind, volume, volumes, r.common["created"], patients,
                  r.common["site"], t=t), r


def label_svg(patients: Sequence[WebPatient], *, volume: int, volumes: int,
              site: Site | None = None, web: bool, template_dirs: Sequence[Path] = (),
              created: dt.datetime | None = None) -> str:
    """The label as SVG (template ``label.svg``, autoescaped): 120 x 120 mm."""
    lay, r = layout(patients, volume=volume, volumes=volumes, site=site, web=web,
                    template_dirs=template_dirs, created=created)
    return r.render("label.svg", label=lay)


def label_png(patients: Sequence[WebPatient], *, volume: int, volumes: int,
              site: Site | None = None, web: bool, template_dirs: Sequence[Path] = (),
              created: dt.datetime | None = None, dpi: int = 300) -> bytes:
    """The same layout as a PNG (white disc, grey cut lines), dpi recorded in the file."""
    lay, _r = layout(patients, volume=volume, volumes=volumes, site=site, web=web,
                     template_dirs=template_dirs, created=created)
    scale = dpi / 254.0  # pixels per 0.1 mm
    px = round(SIZE * scale)
    img = Image.new("RGB", (px, px), "white")
    draw = ImageDraw.Draw(img)
    for radius in (OUTER + 15, HUB, HOLE):
        box = [(CENTER - radius) * scale, (CENTER - radius) * scale,
               (CENTER + radius) * scale, (CENTER + radius) * scale]
        draw.ellipse(box, outline=(170, 170, 170), width=max(1, round(2 * scale)))
    fonts = Fonts()
    for line in lay.lines:
        if line.role == "kind":
            _badge(draw, line, scale)
        _draw_line(draw, fonts, line, scale, "white" if line.role == "kind" else "black")
    out = io.BytesIO()
    img.save(out, "PNG", dpi=(dpi, dpi), optimize=True)
    return out.getvalue()


def _badge(draw: ImageDraw.ImageDraw, line: Line, scale: float) -> None:
    pad = line.size * 0.4
    box = [(line.x - line.width / 2 - pad) * scale, (line.y - line.size * 0.95) * scale,
           (line.x + line.width / 2 + pad) * scale, (line.y + line.size * 0.35) * scale]
    draw.rounded_rectangle(box, radius=line.size * 0.3 * scale, fill=(22, 58, 95))


def _draw_line(draw: ImageDraw.ImageDraw, fonts: Fonts, line: Line, scale: float,
               fill: str) -> None:
    size = line.size * scale
    runs = fonts.runs(line.text, line.bold)
    width = sum(fonts.font(p, size).getlength(s) for p, s in runs)
    x = {"start": line.x * scale, "end": line.x * scale - width}.get(
        line.anchor, line.x * scale - width / 2)
    for path, text in runs:
        font = fonts.font(path, size)
        draw.text((x, line.y * scale), text, font=font, fill=fill, anchor="ls")
        x += font.getlength(text)


def label_paths(output: Path) -> tuple[Path, Path]:
    """Where the labels of an output go: ``OUT-1.iso`` -> ``OUT-1.label.svg``/``.label.png``
    beside it (for a folder ``DIR``: ``DIR.label.svg``), never onto the medium."""
    stem = output.with_suffix("") if output.suffix else output
    return stem.with_name(stem.name + ".label.svg"), stem.with_name(stem.name + ".label.png")


def write_label(output: Path, patients: Sequence[WebPatient], *, volume: int, volumes: int,
                site: Site | None = None, web: bool, template_dirs: Sequence[Path] = (),
                created: dt.datetime | None = None) -> tuple[Path, Path]:
    """Write the SVG and PNG labels of one volume beside its output; returns their paths."""
    svg_path, png_path = label_paths(output)
    kw = {"volume": volume, "volumes": volumes, "site": site, "web": web,
          "template_dirs": template_dirs, "created": created}
    svg_path.write_text(label_svg(patients, **kw), encoding="utf-8")
    png_path.write_bytes(label_png(patients, **kw))
    return svg_path, png_path
