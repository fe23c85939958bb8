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

Every byte must be a character of the value's repertoire (PS3.5 6.1): the Specific Character
Set's for SH, LO, ST, LT, PN, UC and UT (PS3.5 6.1.2.3), the default repertoire (ASCII
graphic characters, PS3.5 6.1.2.1) for every other text VR and whenever no Specific Character
Set (or ISO_IR 6) is given. No repertoire has DEL (7FH) or the C1 controls (80H-9FH), and
control characters are limited to those PS3.5 6.1.3 allows the VR (ESC only with code
extensions, ISO 2022). :func:`charset_terms` checks the Specific Character Set itself against
its Defined Terms (PS3.3 C.12.1.1.2) and writes the spellings with one clear meaning as
defined (``iso-ir 100`` is ``ISO_IR 100``).
"""

from __future__ import annotations

import re
import struct
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import cache

import numpy as np
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


#: PS3.3 C.12.1.1.2, Tables C.12-2 to C.12-5: Defined Terms of Specific Character Set, with
#: the codec of their repertoire (single-byte sets and the multi-byte ones without code
#: extensions; ISO 2022 terms are decoded by pydicom). ISO_IR 6 is not defined, but written
#: by many toolkits for the default repertoire: its meaning is clear, so it is taken as is.
_G1 = {"100": "latin_1", "101": "iso8859_2", "109": "iso8859_3", "110": "iso8859_4",
       "144": "iso8859_5", "127": "iso8859_6", "126": "iso8859_7", "138": "iso8859_8",
       "148": "iso8859_9", "203": "iso8859_15", "166": "tis_620", "13": "jis_x_0201"}
CODECS: dict[str, str] = {"ISO_IR 6": "ascii", **{f"ISO_IR {n}": c for n, c in _G1.items()},
                          "ISO_IR 192": "utf_8", "GB18030": "gb18030", "GBK": "gbk"}
CHARSET_TERMS = frozenset({*CODECS, "ISO 2022 IR 6", *(f"ISO 2022 IR {n}" for n in _G1),
                           "ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149",
                           "ISO 2022 IR 58"})
_TERM = re.compile(r"ISO[ _-]*(2022[ _-]*)?IR[ _-]*0*(\d+)", re.IGNORECASE)
#: text VRs whose repertoire is the Specific Character Set's (PS3.5 6.1.2.3)
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})


def charset_term(term: str) -> str | None:
    """A Specific Character Set value as its Defined Term, None if it is none: case, ``-``
    for ``_``, missing or doubled spaces and padding have one clear meaning."""
    text = term.strip(" \0")
    if text.upper() in CHARSET_TERMS or not text:
        return text.upper()
    m = _TERM.fullmatch(text)
    if m is None:
        return None
    found = f"ISO 2022 IR {m[2]}" if m[1] else f"ISO_IR {m[2]}"
    return found if found in CHARSET_TERMS else None


def charset_terms(value: bytes) -> tuple[str, ...]:
    """The Defined Terms of a Specific Character Set value; ValueError naming what is not
    one (PS3.3 C.12.1.1.2)."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("not ASCII (PS3.3 C.12.1.1.2)") from None
    terms = []
    for raw in text.split("\\"):
        term = charset_term(raw)
        if term is None:
            raise ValueError(f"{raw.strip()!r} is not a Defined Term (PS3.3 C.12.1.1.2)")
        terms.append(term)
    if len(terms) > 1 and any(t and not t.startswith("ISO 2022") for t in terms[1:]):
        raise ValueError("several values without ISO 2022 code extensions (PS3.3 "
                         "C.12.1.1.2)")
    return tuple(terms)


def repertoire_error(vr: str, value: bytes, charsets: tuple[str, ...]) -> str | None:
    """Why value holds a byte that is not a character of its repertoire, or None."""
    rule = RULES[vr]
    terms = tuple(charsets) if vr in CHARSET_VRS else ()
    named = tuple(t for t in terms if t)
    extended = any(t.startswith("ISO 2022") for t in named)
    if extended or len(named) > 1:
        text = _strict_2022(value, terms)
        if text is None:
            return "bytes that are no characters of the Specific Character Set (PS3.5 6.1)"
    else:
        term = named[0] if named else "ISO_IR 6"
        codec = CODECS.get(term)
        if codec is None:
            return None  # an unknown term: the Specific Character Set itself is refused
        text = _decode_strict(value, codec)
        if text is None:
            where = f"the repertoire of {term}" if named else "the default repertoire"
            return f"bytes that are no characters of {where} (PS3.5 6.1)"
    allowed = rule.controls if extended else rule.controls - {_ESC}
    bad = next((c for c in text if (ord(c) < 0x20 and ord(c) not in allowed)
                or 0x7F <= ord(c) <= 0x9F), None)
    if bad is not None:
        return f"control character 0x{ord(bad):02X} not allowed in {vr} (PS3.5 6.1.3)"
    return None


def _decode_strict(value: bytes, codec: str) -> str | None:
    if codec == "jis_x_0201":  # ISO_IR 13: JIS X 0201 Romaji G0 and Katakana G1, one byte each
        ok = all(b < 0x80 or 0xA1 <= b <= 0xDF for b in value)
        return value.decode("latin-1") if ok else None
    try:
        return value.decode(codec)
    except UnicodeDecodeError:
        return None


def _strict_2022(value: bytes, terms: tuple[str, ...]) -> str | None:
    """ISO 2022 code extensions (PS3.5 6.1.2.5), decoded by pydicom; a byte it has to replace
    is invalid, and so is a byte above 7FH before any escape when the first set has no G1
    (empty or ISO 2022 IR 6: the default repertoire, PS3.5 6.1.2.5.2)."""
    if terms[0] in ("", "ISO 2022 IR 6", "ISO_IR 6") and any(
            b > 0x7F for b in value.split(b"\x1b", 1)[0]):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            text = decode_bytes(value, convert_encodings(list(terms)), {0x5C, 0x3D, 0x5E})
        except (LookupError, UnicodeDecodeError, ValueError):
            return None
    return None if caught or "\ufffd" in text else text


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
    why = repertoire_error(vr, value.rstrip(rule.pad), charsets)
    if why:
        return why
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


#: Image Orientation (Patient), PS3.3 C.7.6.2.1.1: two direction cosines, each a unit vector,
#: orthogonal to each other. PS3.3 names no tolerance; these are within dciodvfy's (it
#: accepts 0.7071\0.7071\0, |v| = 0.99999, and a dot product of 0.0001), so a value kept is
#: one every checker takes.
IMAGE_ORIENTATION = 0x00200037
UNIT_TOLERANCE, ORTHOGONAL_TOLERANCE = 1e-5, 5e-5


def meaning_error(tag: int, value: bytes) -> str | None:
    """Why a value valid for its VR still has no meaning for its attribute, or None."""
    if tag != IMAGE_ORIENTATION:
        return None
    try:
        cosines = [float(v) for v in value.decode("ascii").rstrip(" ").split("\\")]
    except ValueError:
        return "Image Orientation (Patient) is not six numbers (PS3.3 C.7.6.2.1.1)"
    if len(cosines) != 6:
        return "Image Orientation (Patient) is not six numbers (PS3.3 C.7.6.2.1.1)"
    row, col = np.array(cosines[:3]), np.array(cosines[3:])
    if any(abs(np.linalg.norm(v) - 1) > UNIT_TOLERANCE for v in (row, col)):
        return "Image Orientation (Patient) holds a vector that is not a unit vector (PS3.3 " \
            "C.7.6.2.1.1)"
    if abs(float(row @ col)) > ORTHOGONAL_TOLERANCE:
        return "Image Orientation (Patient): the row and column vectors are not orthogonal " \
            "(PS3.3 C.7.6.2.1.1)"
    return None


_DT_PARTS = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?"
                       r"([+-]\d{4})?")


def instant(datetime_text: str, offset: str = "") -> datetime | None:
    """The moment a DT value (or a DA + TM concatenation) names, in UTC, for comparing
    moments: missing components are their first value (PS3.5 Table 6.2-1 DT), the offset is
    the value's own suffix, else `offset` (Timezone Offset From UTC, PS3.3 C.12.1.1.8), else
    none (taken as UTC). A leap second counts as the last moment of its minute. None if the
    text is not a valid DT."""
    text = datetime_text.strip()
    m = _DT_PARTS.fullmatch(text)
    if m is None or check(0x0040A030, "DT", (text + " " * (len(text) % 2)).encode()):
        return None
    year, month, day, hour, minute, second, frac, suffix = m.groups()
    zone = suffix or offset.strip()
    tz = UTC
    if zone:
        if not re.fullmatch(r"[+-]\d{4}", zone):
            return None
        sign = -1 if zone[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5])))
    sec = int(second or 0)
    micro = int((frac or "0").ljust(6, "0")) if sec < 60 else 999999
    return datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                    min(sec, 59), micro, tzinfo=tz).astimezone(UTC)


#: PS3.5 Table 6.2-1: binary numbers (struct format, little endian), and their ranges
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "UV": "Q", "SV": "q", "FL": "f",
            "FD": "d"}


def convert(vr: str, want: str, value: bytes) -> bytes | None:
    """A numeric value encoded with another VR than the dictionary's, in the dictionary's VR
    (Series Number written as US is the IS text "1"), where that is exact: integers for IS
    and the integer VRs, at most 16 characters for DS. UN bytes (PS3.5 6.2.2) are taken as
    the dictionary's VR. None when there is no one clear meaning (an OB Patient ID)."""
    if vr == "UN":
        return value if want in RULES or want in _NUMBERS else None
    numbers = _numbers(vr, value)
    if numbers is None:
        return None
    if want in ("IS", "DS"):
        texts = [_number_text(n, want, single=vr == "FL") for n in numbers]
        if any(t is None for t in texts):
            return None
        out = "\\".join(texts).encode("ascii")  # type: ignore[arg-type]
        return out + b" " * (len(out) % 2)
    fmt = _NUMBERS.get(want)
    if fmt is None:
        return None
    try:
        packed = struct.pack("<" + fmt * len(numbers), *(
            float(n) if fmt in "fd" else _exact_int(n) for n in numbers))
    except (struct.error, TypeError, ValueError):
        return None
    return packed if _numbers(want, packed) == numbers else None  # exact, or not at all


def _numbers(vr: str, value: bytes) -> list[float | int] | None:
    fmt = _NUMBERS.get(vr)
    if fmt is not None:
        size = struct.calcsize(fmt)
        if not value or len(value) % size:
            return None
        return list(struct.unpack("<" + fmt * (len(value) // size), value))
    if vr not in ("IS", "DS"):
        return None
    try:
        parts = [p.strip() for p in value.decode("ascii").rstrip(" ").split("\\")]
        return [int(p) if vr == "IS" else float(p) for p in parts]
    except ValueError:
        return None


def _exact_int(number: float | int) -> int:
    if isinstance(number, float) and not number.is_integer():
        raise ValueError("not an integer")
    return int(number)


def _number_text(number: float | int, vr: str, single: bool = False) -> str | None:
    """IS or DS text of a number, exact, or None (PS3.5 Table 6.2-1: 12 and 16 bytes); a
    32-bit float is written as the shortest text that reads back as that float."""
    if isinstance(number, float):
        if number != number or number in (float("inf"), float("-inf")):
            return None
        if number.is_integer() and abs(number) < 1e15:
            number = int(number)
    if isinstance(number, int):
        text = str(number)
        ok = len(text) <= (12 if vr == "IS" else 16) and (vr == "DS" or -(2**31) <= number
                                                           < 2**31)
        return text if ok else None
    if vr == "IS":
        return None
    text = str(np.float32(number)) if single else repr(number)
    return text if len(text) <= 16 else None


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
