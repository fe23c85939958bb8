"""Where dciodvfy (dicom3tools) and the standard disagree, the standard wins (PS3.5).

dciodvfy is an independent oracle for every DICOMDIR the tests write, but it departs from
PS3.5 in three places that real, standard-conformant records hit:

1. PS3.5 6.2 / Table 6.2-1: the maximum lengths of LO (64), PN (64 per component group) and
   SH (16) are counted in characters; dciodvfy counts bytes, so a UTF-8 (ISO_IR 192) or
   GB18030/GBK value of 40 characters and 80 bytes is "Length invalid" to it.
2. PS3.5 6.1.2.5.1 / PS3.3 C.12.1.1.2 (Tables C.12-2, C.12-5): ISO_IR 13 has the JIS X 0201
   Katakana (A1H-DFH) as its G1 set, and GB18030 and GBK are multi-byte repertoires; dciodvfy
   decodes neither and calls their bytes "Character invalid for character repertoire".
3. PS3.5 Table 6.2-1, TM: "SS: 00-60 (60 for leap second)"; dciodvfy rejects seconds of 60.

Each deviation is allowed only where the value really is that case: the message's value is
found in the file (with the Specific Character Set in force where it stands) and judged here
with Python's own codecs, independently of the code under test. Every other error line is
kept, and dciodvfy's closing summary line only goes when every value error it sums up went.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

#: Python codecs of the repertoires whose characters can take more than one byte
MULTI_BYTE = {"ISO_IR 192": "utf-8", "GB18030": "gb18030", "GBK": "gbk"}
#: the repertoires dciodvfy does not decode (deviation 2)
UNDECODED = {"GB18030": "gb18030", "GBK": "gbk", "ISO_IR 13": None}
MAX_CHARACTERS = {"LO": 64, "PN": 64, "SH": 16}  # PS3.5 Table 6.2-1

_VALUE = r"Error - Value invalid for this VR - \((0x[0-9a-f]{4}),(0x[0-9a-f]{4})\) (\w\w) .*" \
         r" \w\w \[\d+\] = <(.*)> - "
LENGTH = re.compile(_VALUE + r"Length invalid for this VR = (\d+), expected <= (\d+)$")
REPERTOIRE = re.compile(_VALUE + r"Character invalid for character repertoire \(default or as "
                        r"defined in SpecificCharacterSet\) = '.*' \(0x([0-9a-f]{2})\)$")
LEAP_SECOND = re.compile(_VALUE + r"Character invalid for this VR = '6' \(0x36\)$")
SUMMARY = "Error - Dicom dataset contains invalid data values for Value Representations"
_TIME = re.compile(r"(?:[01]\d|2[0-3])[0-5]\d60(?:\.\d{1,6})?")


def errors(lines: list[str], path: Path) -> list[str]:
    """The dciodvfy error lines that are errors by PS3.5 (see the module text)."""
    values = _values(path)
    gone = {line for line in lines if line != SUMMARY and _deviation(line, values)}
    value_errors = [line for line in lines if line.startswith("Error - Value invalid")]
    if value_errors and all(line in gone for line in value_errors):
        gone.add(SUMMARY)  # it sums up value errors, and every one was a deviation
    return [line for line in lines if line not in gone]


def _deviation(line: str, values: dict[tuple[int, bytes], set[str]]) -> bool:
    for pattern, judge in ((LENGTH, _characters_fit), (REPERTOIRE, _undecoded),
                           (LEAP_SECOND, _leap_second)):
        m = pattern.fullmatch(line)
        if m is None:
            continue
        tag = int(m[1], 16) << 16 | int(m[2], 16)
        raw = m[4].encode("latin-1")  # the test reads dciodvfy's output as Latin-1
        charsets = values.get((tag, raw), set())
        return bool(charsets) and all(judge(m, raw, cs) for cs in charsets)
    return False


def _characters_fit(m: re.Match, raw: bytes, charset: str) -> bool:
    """Deviation 1: more bytes than the maximum, but no more characters."""
    vr, limit = m[3], MAX_CHARACTERS.get(m[3])
    codec = MULTI_BYTE.get(charset)
    if limit is None or codec is None or int(m[6]) != limit or len(raw) <= limit:
        return False
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError:
        return False
    groups = text.split("=") if vr == "PN" else [text]
    return all(len(g) <= limit for g in groups)


def _undecoded(m: re.Match, raw: bytes, charset: str) -> bool:
    """Deviation 2: characters of ISO_IR 13 (JIS X 0201) or GB18030/GBK, and nothing else."""
    if charset not in UNDECODED or int(m[5], 16) not in raw:
        return False
    if charset == "ISO_IR 13":
        return all(0x20 <= b < 0x7F or 0xA1 <= b <= 0xDF for b in raw)
    try:
        text = raw.decode(UNDECODED[charset])
    except UnicodeDecodeError:
        return False
    return all(0x20 <= ord(c) != 0x7F and not 0x80 <= ord(c) <= 0x9F for c in text)


def _leap_second(m: re.Match, raw: bytes, _charset: str) -> bool:
    """Deviation 3: a valid TM whose seconds are 60."""
    return m[3] == "TM" and _TIME.fullmatch(raw.decode("ascii", "replace").strip()) is not None


def _values(path: Path) -> dict[tuple[int, bytes], set[str]]:
    """(tag, value without padding) -> the Specific Character Sets in force where it stands,
    for every element of the file, records and nested items included."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:  # noqa: BLE001 - not readable: nothing can be shown to be a deviation
        return {}
    found: dict[tuple[int, bytes], set[str]] = {}
    for tag, value, charset in _walk(ds, ""):
        found.setdefault((tag, value.rstrip(b" \0")), set()).add(charset)
        for single in value.rstrip(b" \0").split(b"\\"):  # dciodvfy quotes one value
            found.setdefault((tag, single.strip(b" ")), set()).add(charset)
    return found


def _walk(ds: Dataset, charset: str) -> Iterator[tuple[int, bytes, str]]:
    raw_charset = ds.get_item(0x00080005)
    if raw_charset is not None:
        value = raw_charset.value if isinstance(raw_charset, RawDataElement) \
            else ds.SpecificCharacterSet
        charset = (value.decode("ascii", "replace") if isinstance(value, bytes)
                   else "\\".join(value) if isinstance(value, list) else str(value)).strip()
    for tag in ds.keys():  # noqa: SIM118 - raw values, not converted ones
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement) and elem.VR != "SQ" and isinstance(elem.value,
                                                                               bytes):
            yield int(tag), elem.value, charset
        elif ds[tag].VR == "SQ":
            for item in ds[tag].value:
                yield from _walk(item, charset)

