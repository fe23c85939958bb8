"""Basic Directory records (PS3.3 Annex F): which keys each record carries and how they are encoded.

The tables are data (``_standard/record_keys.json``, ``sop_classes.json``, ``fill_rules.json``);
this module reads them, merges a profile's extra keys (e.g. PS3.11 Table H.3-2), and encodes key
elements in Explicit VR Little Endian, the only syntax a DICOMDIR may use (PS3.10 8.6).

String values are copied byte for byte from the instance, so names in any Specific Character Set
reach the record exactly as the modality wrote them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from io import BytesIO

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from .profiles import Profile

LEVELS = ("PATIENT", "STUDY", "SERIES")
TEXT_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
LONG_VRS = frozenset("OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
SPECIFIC_CHARACTER_SET = 0x00080005


def _load(name: str) -> dict:
    return json.loads(resources.files("mastering._standard").joinpath(name).read_text("utf-8"))


@cache
def sop_classes() -> dict[str, dict]:
    """SOP Class UID -> {"name", "record", "retired"} for every storage SOP class (PS3.4 B.5)."""
    return _load("sop_classes.json")


@cache
def record_keys() -> dict:
    return _load("record_keys.json")


@cache
def fill_rules() -> dict[str, dict]:
    return {k: v for k, v in _load("fill_rules.json").items() if not k.startswith("_")}


def record_type(sop_class_uid: str) -> str | None:
    """Directory Record Type for a storage SOP class, None if the class is not storable."""
    entry = sop_classes().get(sop_class_uid)
    return entry["record"] if entry else None


def is_root_level(rtype: str) -> bool:
    """Root-level record types hang directly below the root, without PATIENT (Table F.4-1)."""
    return rtype in record_keys()["_root_level"]


@dataclass(frozen=True)
class KeySpec:
    """Keys by requirement type ("1", "2", "1C", "3") for one record type, profile included."""

    rtype: str
    by_type: dict[str, tuple[int, ...]]

    def all_tags(self) -> tuple[int, ...]:
        return tuple(sorted({t for tags in self.by_type.values() for t in tags}))

    def of(self, req: str) -> tuple[int, ...]:
        return self.by_type.get(req, ())


@cache
def _spec_cached(rtype: str, extra: tuple[tuple[str, tuple[str, ...]], ...]) -> KeySpec:
    table: dict[str, list[str]] = {k: list(v) for k, v in record_keys().get(rtype, {}).items()}
    for req, kws in extra:
        table.setdefault(req, []).extend(kw for kw in kws if kw not in table.get(req, []))
    by_type = {req: tuple(_tag(kw) for kw in kws) for req, kws in table.items()}
    return KeySpec(rtype, by_type)


def key_spec(rtype: str, profile: Profile) -> KeySpec:
    extra = tuple(sorted(profile.extra_keys.get(rtype, {}).items()))
    return _spec_cached(rtype, extra)


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"unknown keyword {keyword!r} in the record tables")
    return tag


# -- encoding -------------------------------------------------------------------------------


class ValueTooLong(ValueError):
    """A value longer than the 16-bit length of its VR in Explicit VR (PS3.5 7.1.2): it
    cannot be a directory record key (the file itself may hold it, in Implicit VR)."""


def element_header(tag: int, vr: str, length: int) -> bytes:
    """Explicit VR Little Endian element header (PS3.5 7.1.2)."""
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    if length > 0xFFFF:
        raise ValueTooLong(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr}: {length} bytes")
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def encode_text(tag: int, vr: str, value: bytes) -> bytes:
    """A text element from raw bytes, padded to even length (UI with NUL, others with space)."""
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    return element_header(tag, vr, len(value)) + value


def encode_value(tag: int, value: str) -> bytes:
    """A text element from a str this program made (IDs, UIDs, dates: ASCII only)."""
    return encode_text(tag, dictionary_VR(tag), value.encode("ascii"))


def encode_element(ds: Dataset, tag: int) -> bytes | None:
    """The element `tag` of ds encoded in Explicit VR LE, strings copied raw; None if absent."""
    if tag not in ds:
        return None
    raw = ds.get_item(tag)
    vr = _vr_of(raw, tag)
    if isinstance(raw, RawDataElement) and vr in TEXT_VRS and raw.value is not None:
        return encode_text(tag, vr, raw.value)
    elem = ds[tag]  # converted: numbers and sequences are re-encoded by pydicom
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    encodings = ds._character_set if hasattr(ds, "_character_set") else ["iso8859"]
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _vr_of(raw: RawDataElement | DataElement, tag: int) -> str:
    vr = raw.VR
    if vr:
        return str(vr)
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def text_value(ds: Dataset, tag: int) -> str:
    """A key's value as text for sorting, hashing and reports ('' if absent or empty)."""
    if tag not in ds:
        return ""
    raw = ds.get_item(tag)
    if isinstance(raw, RawDataElement) and raw.value is not None and _vr_of(raw, tag) in TEXT_VRS:
        return raw.value.decode("latin-1").strip(" \0")
    value = ds[tag].value
    if isinstance(value, bytes):  # UN: a value read as bytes
        return value.decode("latin-1").strip(" \0")
    return "" if value is None else str(value).strip()


def has_value(ds: Dataset, tag: int) -> bool:
    if tag not in ds:
        return False
    raw = ds.get_item(tag)
    if isinstance(raw, RawDataElement):
        return _non_empty(_vr_of(raw, tag), raw.value or b"")
    return not ds[tag].is_empty


def _non_empty(vr: str, value: bytes) -> bool:
    """A value is empty when it has no bytes, or, for text, only padding (PS3.5 6.2). Binary
    values are never padding: Rows = 32 is the bytes 20 00, Columns = 8192 is 00 20."""
    if vr in TEXT_VRS:
        return bool(value.strip(b" \0"))
    return bool(value)


# -- header views ----------------------------------------------------------------------------


class PydicomHeader:
    """Key access over a pydicom data set (big endian, deflated, SR content, fallbacks)."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def has(self, tag: int) -> bool:
        return has_value(self.ds, tag)

    def text(self, tag: int) -> str:
        return text_value(self.ds, tag)

    def encoded(self, tag: int) -> bytes | None:
        return encode_element(self.ds, tag)


class RawHeader:
    """Key access over raw top-level elements collected by :func:`part10.inspect` during its
    structural walk: no second parse of the file. Explicit VR LE elements are already in the
    DICOMDIR's encoding and are copied; implicit VR LE ones get an explicit header from the
    dictionary. Anything else (implicit sequences, ambiguous VRs) asks the fallback."""

    def __init__(self, elements: dict[int, tuple[bytes, bytes]], explicit: bool,
                 fallback: Callable[[], Dataset], oversized: frozenset[int] = frozenset()):
        self.elements, self.explicit, self._fallback = elements, explicit, fallback
        self.oversized = oversized  # too large to collect during the walk: pydicom reads them
        self._pydicom: PydicomHeader | None = None

    def _value(self, tag: int) -> bytes | None:
        item = self.elements.get(tag)
        if item is None:
            return None
        vr, elem = item
        if self.explicit:
            return elem[12:] if vr in _LONG_VR_BYTES else elem[8:]
        return elem[8:]

    def _vr(self, tag: int) -> str:
        vr = self.elements[tag][0]
        return vr.decode() if vr else _implicit_vr(tag)

    def has(self, tag: int) -> bool:
        if tag in self.oversized:
            return self.pydicom().has(tag)
        value = self._value(tag)
        return value is not None and _non_empty(self._vr(tag), value)

    def text(self, tag: int) -> str:
        if tag in self.oversized:
            return self.pydicom().text(tag)
        value = self._value(tag)
        if value is None:
            return ""
        if self._vr(tag) in TEXT_VRS:
            return value.decode("latin-1").strip(" \0")
        return self.pydicom().text(tag)

    def encoded(self, tag: int) -> bytes | None:
        if tag in self.oversized:
            return self.pydicom().encoded(tag)
        if tag not in self.elements:
            return None
        vr = self._vr(tag)
        odd = len(self._value(tag) or b"") % 2
        if self.explicit and len(vr) == 2 and vr != "UN" and not odd:
            return self.elements[tag][1]  # already the DICOMDIR's encoding, byte for byte
        if vr == "UN" and self.explicit:
            return self.pydicom().encoded(tag)  # a known key sent as UN: dictionary VR
        if vr in TEXT_VRS:
            return encode_text(tag, vr, self._value(tag) or b"")
        if len(vr) == 2 and vr not in ("SQ", "UN"):  # numbers: little endian either way
            value = self._value(tag) or b""
            return element_header(tag, vr, len(value)) + value
        return self.pydicom().encoded(tag)

    def pydicom(self) -> PydicomHeader:
        if self._pydicom is None:
            self._pydicom = PydicomHeader(self._fallback())
        return self._pydicom


Header = PydicomHeader | RawHeader
_LONG_VR_BYTES = frozenset(vr.encode() for vr in LONG_VRS)


@cache
def _implicit_vr(tag: int) -> str:
    """The dictionary's VR of an element read without one (Implicit VR), UN if unknown."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


# -- filling missing Type 1 keys -------------------------------------------------------------


def derived_uid(*parts: str) -> str:
    """A 2.25 UID (PS3.5 B.2) from a hash of parts: the same input always gives the same UID."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def derive(keyword: str, hdr: Header, known: dict[str, str],
           invalid: bytes | None = None) -> str | None:
    """A value for a missing Type 1 key, derived only from this instance; None if no rule.

    `known` holds values already filled for this instance (a derived Study Instance UID feeds
    the Series Instance UID and Study ID rules). "running" keys are left to the planner.
    `invalid` is the key's own value when it is present but invalid for its VR: where the rule
    has "invalid_from", the value is derived from it, so that one invalid Study Instance UID
    gives every instance that has it one derived UID.
    """
    rule = fill_rules().get(keyword)
    if rule is None:
        return None
    for source in rule.get("copy", ()):
        value = known.get(source) or hdr.text(_tag(source))
        if value and value.isascii():  # a copied value is re-encoded as ASCII
            value = _valid_copy(keyword, value[: rule.get("max_length", 64)])
            if value:
                return value
    kind = rule.get("derive")
    if kind == "running":
        return ""  # the planner numbers these in File-set order
    if kind in ("id", "uid"):
        if invalid is not None and "invalid_from" in rule:
            parts = ["invalid", invalid.decode("latin-1"),
                     *(known.get(src) or hdr.text(_tag(src)) for src in rule["invalid_from"])]
        else:
            parts = [known.get(src) or hdr.text(_tag(src)) for src in rule["from"]]
        if kind == "uid":
            return derived_uid(keyword, *parts)
        digest = int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")
        digits = rule.get("digits", 8)
        return f"{rule.get('prefix', '')}{digest % 10**digits:0{digits}d}"
    return rule.get("default")


def _valid_copy(keyword: str, value: str) -> str | None:
    """A value copied from another attribute, valid for the key's VR (normalized where it
    has one meaning), or None: a 1997.04.24 Series Date still gives a Study Date."""
    from . import values

    tag = _tag(keyword)
    vr = dictionary_VR(tag)
    raw = value.encode("ascii")
    raw += b"\0" if len(raw) % 2 and vr == "UI" else b" " * (len(raw) % 2)
    if values.check(tag, vr, raw) is None:
        return value
    fixed = values.normalize(tag, vr, raw)
    return fixed.decode("ascii").strip(" \0") if fixed is not None else None


def split(blob: bytes) -> dict[int, bytes]:
    """The elements of an Explicit VR LE blob made by :func:`concatenate`, by tag."""
    from .part10 import _Walker

    walker = _Walker(blob, explicit=True, little=True, origin="record keys")
    out, pos = {}, 0
    while pos < len(blob):
        tag, vr, length, value = walker.header(pos, False)
        end = walker.element_value(tag, vr, length, value)
        out[tag], pos = blob[pos:end], end
    return out


def concatenate(elements: dict[int, bytes]) -> bytes:
    """Encoded elements in ascending tag order, as PS3.5 7.1 requires."""
    out = BytesIO()
    for tag in sorted(elements):
        out.write(elements[tag])
    return out.getvalue()


# -- enhanced multi-frame images (PS3.3 C.7.6.16) -------------------------------------------

SHARED_GROUPS, PER_FRAME_GROUPS = 0x52009229, 0x52009230
#: image keys that enhanced multi-frame IODs keep in a functional group macro, with the
#: macro's sequence, or None for a macro whose attribute sits in the group item itself
#: (PS3.3 C.7.6.16.2.1-3, C.7.6.16.2.5; PS3.11 Table H.3-2 takes them from there)
FUNCTIONAL_GROUP_KEYS: dict[int, int | None] = {
    0x00200032: 0x00209113,  # Image Position (Patient) <- Plane Position Sequence
    0x00200037: 0x00209116,  # Image Orientation (Patient) <- Plane Orientation Sequence
    0x00280030: 0x00289110,  # Pixel Spacing <- Pixel Measures Sequence
    0x00081140: None,  # Referenced Image Sequence (Referenced Image Macro)
}


def functional_group_key(ds: Dataset, tag: int, per_frame: bool = True) -> bytes | None:
    """A key an enhanced multi-frame image has in its Shared Functional Groups, or (with
    per_frame) in the Per-frame Functional Groups when every frame has the same value;
    encoded, else None. PS3.11 Table H.3-2 asks for the key from the top level or the Shared
    Functional Groups; one value of all frames may be written too, but is not required."""
    if tag not in FUNCTIONAL_GROUP_KEYS:
        return None
    macro = FUNCTIONAL_GROUP_KEYS[tag]
    shared = ds.get(SHARED_GROUPS)
    for group in (shared.value if shared is not None else ()) or ():
        found = _in_macro(group, macro, tag)
        if found is not None:
            return found
    if not per_frame:
        return None
    frames = ds.get(PER_FRAME_GROUPS)
    values = {_in_macro(group, macro, tag) for group in (frames.value if frames else ()) or ()}
    if len(values) == 1:
        return values.pop()
    return None


def _in_macro(group: Dataset, macro: int | None, tag: int) -> bytes | None:
    if macro is None:
        return encode_element(group, tag) if tag in group else None
    seq = group.get(macro)
    items = seq.value if seq is not None else None
    if not items or tag not in items[0]:
        return None
    return encode_element(items[0], tag)


# -- value formats (PS3.5 Table 6.2-1) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checked:
    """A key element after its value check: `element` is what the record may carry (the
    original, a normalized copy, or None), `reason` why it was changed or refused."""

    element: bytes | None
    reason: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.reason)


def charsets_of(encoded: bytes | None) -> tuple[str, ...]:
    """The terms of an encoded Specific Character Set element (PS3.3 C.12.1.1.2)."""
    from . import values

    if not encoded:
        return ()
    value = encoded[8:].decode("ascii", "replace").rstrip(" \0")
    return tuple(values.charset_term(t) or t.strip() for t in value.split("\\"))


def dataset_charsets(ds: Dataset) -> tuple[str, ...]:
    return charsets_of(encode_element(ds, SPECIFIC_CHARACTER_SET))


def _parts(element: bytes) -> tuple[int, str, bytes]:
    """(tag, VR, value) of one Explicit VR LE element made by this module or copied."""
    group, elem, vr = struct.unpack_from("<HH2s", element)
    vr_text = vr.decode("latin-1")
    start = 12 if vr_text in LONG_VRS else 8
    return group << 16 | elem, vr_text, element[start:]


def value_text(element: bytes) -> str:
    """The value of an encoded text element, for reports."""
    return _parts(element)[2].decode("latin-1").strip(" \0")


def element_vr(element: bytes) -> str:
    """The VR of an encoded element."""
    return _parts(element)[1]


def value_bytes(element: bytes) -> bytes:
    """The value bytes of an encoded element, padding removed."""
    return _parts(element)[2].rstrip(b" \0")


@lru_cache(maxsize=4096)
def check_element(tag: int, element: bytes, charsets: tuple[str, ...]) -> Checked:
    """Check a key element's VR, value format and multiplicity for the DICOMDIR (PS3.5
    Table 6.2-1, PS3.6); repair what has one meaning (:func:`values.normalize`, a text VR
    other than the dictionary's); say why it cannot be used otherwise. Remembered: the
    patient, study and series keys of a series are the same in every one of its files."""
    from . import values

    _tag, vr, value = _parts(element)
    if tag == SPECIFIC_CHARACTER_SET:
        return _check_charset(element, vr, value)
    want = values.dictionary_vr(tag)
    note = ""
    if want and vr != want and want != "SQ":  # PS3.6 gives the VR; the value may still be clear
        note = f"encoded as {vr}, not {want}"
        converted = value if vr in TEXT_VRS and want in TEXT_VRS else values.convert(
            vr, want, value)
        if converted is None:
            return Checked(None, f"{note} (PS3.6), and its value has no one meaning as {want}")
        element, vr, value = element_header(tag, want, len(converted)) + converted, want, converted
        if vr in TEXT_VRS and len(value) % 2:
            element = encode_text(tag, vr, value)
            value = _parts(element)[2]
    if vr == "SQ":
        why = _check_items(element, charsets)
        return Checked(None, why) if why else Checked(element, note)
    why = values.check(tag, vr, value, charsets)
    if why is None:
        meaning = values.meaning_error(tag, value)
        return Checked(None, meaning) if meaning else Checked(element, note)
    fixed = values.normalize(tag, vr, value)
    if fixed is None:
        return Checked(None, why)
    meaning = values.meaning_error(tag, fixed)
    if meaning:
        return Checked(None, meaning)
    return Checked(element_header(tag, vr, len(fixed)) + fixed, values.describe(vr, value))


def _check_charset(element: bytes, vr: str, value: bytes) -> Checked:
    """Specific Character Set: CS holding Defined Terms (PS3.3 C.12.1.1.2); spellings with one
    clear meaning (case, ``-`` for ``_``, spacing, padding) are written as defined."""
    from . import values

    if vr != "CS":
        return Checked(None, f"encoded as {vr}, not CS (PS3.6)")
    try:
        terms = values.charset_terms(value)
    except ValueError as exc:
        return Checked(None, str(exc))
    fixed = "\\".join(terms).encode("ascii")
    if value in (fixed, fixed + b" "):
        return Checked(element)
    return Checked(encode_text(SPECIFIC_CHARACTER_SET, "CS", fixed),
                   "written as its Defined Term (PS3.3 C.12.1.1.2)")


def _check_items(element: bytes, charsets: tuple[str, ...]) -> str | None:
    """The first invalid value inside an encoded sequence, or None (every nested element
    is checked: dciodvfy checks them as well)."""
    from . import values
    from .part10 import ITEM, ITEM_END, SEQ_END, UNDEFINED, _Walker

    walker = _Walker(element, explicit=True, little=True, origin="record key")
    pos = 0
    try:
        while pos < len(element):
            tag, vr, length, value = walker.header(pos, True)
            if tag in (ITEM_END, SEQ_END):
                pos = value
                continue
            if tag == ITEM or vr == b"SQ":
                pos = value  # step into the item or sequence: its elements follow
                continue
            end = value + (0 if length == UNDEFINED else length)
            if tag == SPECIFIC_CHARACTER_SET:
                charsets = charsets_of(element[pos:end])  # an item's own (PS3.5 7.5.1)
            why = values.check(tag, vr.decode(), element[value:end], charsets)
            if why:
                return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) in the sequence: {why}"
            pos = end
    except (ValueError, struct.error) as exc:
        return f"sequence cannot be read: {exc}"
    return None
