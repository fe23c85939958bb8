"""Value formats of the Value Representations, for the keys a DICOMDIR record carries.

Every rule here is PS3.5 Table 6.2-1 ("DICOM Value Representations"): the characters a value
may hold, its maximum length, and how multiple values are delimited (PS3.5 6.4: a backslash,
except in LT, ST, UT and UR, which hold one value). Value Multiplicity comes from the data
dictionary (PS3.6). Records are copies of an instance's values (PS3.3 F.5), so a value that
is invalid in the instance would make the DICOMDIR invalid; :func:`check` finds such values and
:func:`normalize` repairs the ones that have exactly one meaning: dates and times in the
ACR-NEMA 300 forms that Table 6.2-1 names and forbids (``1997.04.24``, ``14:04:38``), and
padding with NULs where PS3.5 6.2 asks for spaces.

Values are bytes as stored. In a repertoire with multi-byte characters (a Specific Character
Set other than the default) lengths count characters and values are split after decoding
(PS3.5 6.1.2.5.3: a byte of a multi-byte character may look like a backslash).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import cache

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VM, dictionary_VR

#: PS3.5 6.1.3: the control characters LT, ST and UT may hold (LF, FF, CR, ESC, TAB)
_TEXT_CONTROLS = frozenset(b"\n\f\r\x1b\t")
_ESC = 0x1B


@dataclass(frozen=True)
class Rule:
    """One row of PS3.5 Table 6.2-1, reduced to what can be checked on a value."""

    max_length: int | None  # per value; characters for text VRs, bytes for the others
    pattern: re.Pattern[str] | None = None  # a single value, padding removed
    multi: bool = True  # a backslash delimits values (PS3.5 6.4)
    controls: frozenset[int] = frozenset({_ESC})  # control characters allowed
    pad: bytes = b" "
    strip: bool = True  # leading and trailing spaces are not significant


def _re(text: str) -> re.Pattern[str]:
    return re.compile(text)


_TIME = r"(?:[01]\d|2[0-3])(?:[0-5]\d(?:(?:[0-5]\d|60)(?:\.\d{1,6})?)?)?"
_DATE = r"\d{4}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"

#: PS3.5 Table 6.2-1, by VR (the binary VRs are checked for their length unit only)
RULES: dict[str, Rule] = {
    "AE": Rule(16, controls=frozenset()),
    "AS": Rule(4, _re(r"\d{3}[DWMY]"), controls=frozenset(), strip=False),
    "CS": Rule(16, _re(r"[A-Z0-9_ ]*"), controls=frozenset()),
    "DA": Rule(8, _re(_DATE), controls=frozenset(), strip=False),
    "DS": Rule(16, _re(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"), controls=frozenset()),
    "DT": Rule(26, _re(r"\d{4}(?:(?:0[1-9]|1[0-2])(?:(?:0[1-9]|[12]\d|3[01])(?:(?:[01]\d|2[0-3])"
                       r"(?:[0-5]\d(?:(?:[0-5]\d|60)(?:\.\d{1,6})?)?)?)?)?)?(?:[+-]\d{4})?"),
               controls=frozenset()),
    "IS": Rule(12, _re(r"[+-]?\d+"), controls=frozenset()),
    "LO": Rule(64),
    "LT": Rule(10240, multi=False, controls=_TEXT_CONTROLS, strip=False),
    "PN": Rule(64),  # per component group (PS3.5 6.2.1)
    "SH": Rule(16),
    "ST": Rule(1024, multi=False, controls=_TEXT_CONTROLS, strip=False),
    "TM": Rule(14, _re(_TIME), controls=frozenset()),
    "UC": Rule(None),
    "UI": Rule(64, _re(r"(?:0|[1-9]\d*)(?:\.(?:0|[1-9]\d*))*"), controls=frozenset(),
               pad=b"\0", strip=False),
    "UR": Rule(None, _re(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*"), multi=False,
               controls=frozenset(), strip=False),
    "UT": Rule(None, multi=False, controls=_TEXT_CONTROLS, strip=False),
}
#: PS3.5 Table 6.2-1: fixed-size binary VRs and their value width in bytes
WIDTHS = {"AT": 4, "FD": 8, "FL": 4, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8,
          "OD": 8, "OF": 4, "OL": 4, "OV": 8, "OW": 2}
#: PS3.5 Table 6.2-1 notes: ACR-NEMA Standard 300 forms, not allowed in DICOM values
_ACR_NEMA_DATE = re.compile(rb"(\d{4})\.(\d{2})\.(\d{2})")
_ACR_NEMA_TIME = re.compile(rb"(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?")


@cache
def dictionary_vr(tag: int) -> str:
    """The VR the data dictionary gives a tag; "" for private or unknown tags and for the
    ambiguous ones ("US or SS"), which are left as encoded."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return ""
    return "" if " or " in vr else vr


@cache
def _vm_bounds(tag: int) -> tuple[int, int | None, int] | None:
    """(minimum, maximum or None for n, step) of the dictionary VM ("1", "1-3", "2-2n")."""
    try:
        vm = dictionary_VM(tag)
    except KeyError:
        return None
    low, _, high = vm.partition("-")
    if not high:
        return (int(low), int(low), 1) if low.isdigit() else None
    if high.endswith("n"):
        step = int(high[:-1] or 1)
        return int(low), None, step
    return int(low), int(high), 1


def _decode(value: bytes, charsets: tuple[str, ...]) -> str:
    """Text of a value: latin-1 for the default repertoire (bytes = characters), else
    through pydicom's ISO 2022 / UTF-8 / GB18030 decoding."""
    if not charsets or set(charsets) <= {"", "ISO_IR 6", "ISO 2022 IR 6"}:
        return value.decode("latin-1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown terms fall back to the default set
            return decode_bytes(value, convert_encodings(list(charsets)), {0x5C, 0x3D, 0x5E})
    except (LookupError, UnicodeDecodeError, ValueError):
        return value.decode("latin-1")


def split(vr: str, value: bytes, charsets: tuple[str, ...] = ()) -> list[str]:
    """The values of an encoded element, padding removed (PS3.5 6.2, 6.4)."""
    rule = RULES[vr]
    text = _decode(value, charsets if vr in ("LO", "LT", "PN", "SH", "ST", "UC", "UT")
                   else ())
    text = text[:-1] if text.endswith(rule.pad.decode()) else text  # PS3.5 6.2: one pad
    parts = text.split("\\") if rule.multi else [text]
    return [p.strip(" ") for p in parts] if rule.strip else parts


def check(tag: int, vr: str, value: bytes, charsets: tuple[str, ...] = ()) -> str | None:
    """Why `value` (the bytes of element `tag`, encoded as `vr`) is not valid, or None.

    Checks the VR's characters and lengths (PS3.5 Table 6.2-1), that the element length is
    even (PS3.5 7.1.1) and, when the tag is a dictionary tag, the Value Multiplicity."""
    if len(value) % 2:
        return "odd value length (PS3.5 7.1.1)"
    if vr in WIDTHS:
        if len(value) % WIDTHS[vr]:
            return f"{len(value)} bytes is not a whole number of {vr} values (PS3.5 6.2)"
        return _check_vm(tag, len(value) // WIDTHS[vr]) if vr not in ("OD", "OF", "OL", "OV",
                                                                       "OW") else None
    rule = RULES.get(vr)
    if rule is None:
        return None  # OB, UN, SQ: no format of their own
    if not value.strip(b" \0"):
        return None  # empty (zero length or only padding)
    if rule.pad == b" " and b"\0" in value:
        return "NUL bytes in a text value (PS3.5 6.2 pads with spaces)"
    parts = split(vr, value, charsets)
    for part in parts:
        why = _check_one(vr, rule, part)
        if why:
            return why
    return _check_vm(tag, len(parts))


def _check_one(vr: str, rule: Rule, part: str) -> str | None:
    bad = next((c for c in part if ord(c) < 0x20 and ord(c) not in rule.controls), None)
    if bad is not None:
        return f"control character 0x{ord(bad):02X} not allowed in {vr} (PS3.5 6.1.3)"
    if vr == "PN":
        groups = part.split("=")
        if len(groups) > 3 or any(len(g.split("^")) > 5 for g in groups):
            return "more than 3 component groups or 5 components (PS3.5 6.2.1)"
        if any(len(g) > 64 for g in groups):
            return "a component group longer than 64 characters (PS3.5 Table 6.2-1)"
        return None
    if rule.max_length is not None and len(part) > rule.max_length:
        return f"{len(part)} characters, {vr} allows {rule.max_length} (PS3.5 Table 6.2-1)"
    if rule.pattern is not None and part and not rule.pattern.fullmatch(part):
        return f"not a valid {vr} value (PS3.5 Table 6.2-1)"
    if vr == "IS" and part and not -(2**31) <= int(part) < 2**31:
        return "IS value out of range (PS3.5 Table 6.2-1)"
    if vr == "UI" and part and len(part) > 64:
        return "UID longer than 64 characters (PS3.5 9.1)"
    return None


def _check_vm(tag: int, count: int) -> str | None:
    bounds = _vm_bounds(tag)
    if bounds is None or (tag >> 16) & 1:
        return None
    low, high, step = bounds
    if count < low or (high is not None and count > high) or (count - low) % step:
        shown = f"{low}" if high == low else f"{low}-{high or 'n'}"
        return f"{count} values, the dictionary allows {shown} (PS3.6)"
    return None


def normalize(tag: int, vr: str, value: bytes) -> bytes | None:
    """The same value in a valid form where it has exactly one meaning, else None.

    DA ``YYYY.MM.DD`` and TM ``HH:MM:SS.frac`` are the ACR-NEMA 300 forms PS3.5 Table 6.2-1
    names; NUL padding of a text value is padding (PS3.5 6.2 pads text with spaces)."""
    rule = RULES.get(vr)
    if rule is None or not rule.multi:
        return None
    parts = [p.strip(b" \0") for p in value.split(b"\\")]
    for i, part in enumerate(parts):
        if vr == "DA" and (m := _ACR_NEMA_DATE.fullmatch(part)):
            parts[i] = b"".join(m.groups())
        elif vr == "TM" and (m := _ACR_NEMA_TIME.fullmatch(part)):
            parts[i] = b"".join(g for g in m.groups() if g)
    fixed = b"\\".join(parts)
    if len(fixed) % 2:
        fixed += rule.pad
    if fixed == value or check(tag, vr, fixed) is not None:
        return None
    return fixed


def describe(vr: str, value: bytes) -> str:
    """What :func:`normalize` did to value, for the report."""
    parts = [p.strip(b" \0") for p in value.split(b"\\")]
    if vr == "DA" and any(_ACR_NEMA_DATE.fullmatch(p) for p in parts):
        return "ACR-NEMA date YYYY.MM.DD written as YYYYMMDD (PS3.5 Table 6.2-1)"
    if vr == "TM" and any(_ACR_NEMA_TIME.fullmatch(p) for p in parts):
        return "ACR-NEMA time HH:MM:SS written as HHMMSS (PS3.5 Table 6.2-1)"
    return "padding removed (PS3.5 6.2: text is padded with one space, UIDs with one NUL)"
