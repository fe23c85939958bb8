"""Read any DICOM medium: an ISO 9660 image, a folder (mounted disc, USB stick) or a DICOMDIR.

The medium is read as a File-set Reader (FSR, PS3.10 8.3) sees it, and nothing on it is changed:

* ISO images are read with pycdlib, without mounting, through the ISO 9660 (primary) namespace,
  which is where PS3.12 F.1.2 puts the File IDs (``/C1/.../CN.;1``).
* Folders are read as stored. Linux mounts ISO 9660 with lower-case names by default, so File IDs
  are resolved exactly first and then ignoring case (:meth:`Medium.resolve`).

The DICOMDIR tree is built from the record offsets (0004,1200 root, 0004,1400 next sibling,
0004,1420 first child; PS3.3 F.3-3), not from the order of the Directory Record Sequence: the
offsets are what viewers follow. Each offset must be the absolute byte position of a record's
Item tag, counted from the first byte of the file (preamble included).
"""

from __future__ import annotations

import io
import logging
import mmap
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import pycdlib
import pydicom
from pycdlib.pycdlibexception import PyCdlibException
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import read_partial
from pydicom.valuerep import VR as _VR_ENUM

from . import part10, records

log = logging.getLogger(__name__)

DICOMDIR = "DICOMDIR"
ROOT_FIRST, ROOT_LAST = 0x00041200, 0x00041202
NEXT, IN_USE, LOWER, RECORD_TYPE = 0x00041400, 0x00041410, 0x00041420, 0x00041430
FILE_ID = 0x00041500
ISO_MAGIC_OFFSET = 16 * 2048 + 1  # "CD001" in the first volume descriptor (ECMA-119 8.4)
HEADER_TAGS = (0x00080016, 0x00080018)  # SOP Class UID, SOP Instance UID
_VRS = frozenset(str(v) for v in _VR_ENUM if len(str(v)) == 2)  # the VRs PS3.5 6.2 defines


class MediaError(Exception):
    """The medium or its DICOMDIR cannot be read (absent, not DICOM, broken offsets)."""


def name_key(name: str) -> str:
    """Lookup key ignoring case and an empty ISO extension ('IM1.' as Linux may show it)."""
    return name.upper().rstrip(".")


class Medium(ABC):
    """An ISO image (read with pycdlib, no mounting) or a folder (a mounted CD or USB stick).

    Names are '/'-joined relative paths as stored, without the ISO ';1' version and without the
    '.' of an empty extension, e.g. ``DICOM/PT000000/ST000000/SE000000/IM000000``.
    """

    kind: str

    def __init__(self) -> None:
        self._index: dict[str, list[str]] | None = None

    @abstractmethod
    def files(self) -> list[str]:
        """Every file on the medium, sorted."""

    @abstractmethod
    def open(self, name: str) -> BinaryIO:
        """A readable, seekable stream of one file."""

    @abstractmethod
    def size(self, name: str) -> int:
        """Size of one file in bytes."""

    @abstractmethod
    def inspect(self, name: str) -> part10.Layout:
        """Structural check of one file (:func:`mastering.part10.inspect`), headers only."""

    @abstractmethod
    def image_size(self) -> int:
        """Bytes the medium occupies: the image file, or the sum of the files of a folder."""

    def volume_id(self) -> str | None:
        """ISO 9660 PVD Volume Identifier (PS3.12 F.1.1), stripped; None for folders."""
        return None

    def iso_names(self) -> list[str]:
        """Raw ISO 9660 paths ('/DICOM/IM1.;1', directories without version); [] for folders."""
        return []

    def extensions(self) -> list[str]:
        """Names of file-system extensions present besides ISO 9660 (Joliet, Rock Ridge, UDF)."""
        return []

    def damage(self) -> list[str]:
        """Faults of the medium itself that lose data (a truncated image); [] if none."""
        return []

    def close(self) -> None:
        """Release the medium (subclasses free their handles too)."""
        self._index = None

    def resolve(self, name: str) -> str | None:
        """The stored name of `name`: exact match first, then ignoring case; None if absent."""
        if self._index is None:
            self._index = {}
            for stored in self.files():
                self._index.setdefault(name_key(stored), []).append(stored)
        candidates = self._index.get(name_key(name), [])
        if name in candidates:
            return name
        return candidates[0] if candidates else None

    def read_header(self, name: str, tags: Iterable[int] = ()) -> FileDataset:
        """File meta, SOP Class/Instance UID and `tags` of one file.

        Parsing stops after the highest wanted tag, so neither pixel data nor most of the
        header is read (a CT header holds a few hundred elements; these sit in group 0008).
        """
        wanted = [*HEADER_TAGS, *tags]
        last = max(wanted)

        def past(tag: int, _vr: str | None, _length: int) -> bool:
            return int.__gt__(tag, last)  # BaseTag's own comparison is slow in bulk

        with self.open(name) as fp:
            return read_partial(fp, stop_when=past, specific_tags=wanted, force=True)

    def __enter__(self) -> Medium:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FolderMedium(Medium):
    """A directory tree: a mounted CD/DVD, a USB stick (PS3.12 Annex R) or a staging folder."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self._real_root = os.path.realpath(root)
        self._files: list[str] | None = None
        #: names that are not read: links leading out of the medium, FIFOs, devices
        self.unsafe: list[tuple[str, str]] = []

    def files(self) -> list[str]:
        """Regular files below the root. Links are followed only where they stay on the
        medium, and nothing but regular files is listed: a folder copied from elsewhere may
        link to any file of this machine, or hold a FIFO that would block a reader."""
        if self._files is None:
            found = []
            for dirpath, dirs, names in os.walk(self.root):  # links to folders: not entered
                rel = Path(dirpath).relative_to(self.root)
                links = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]
                for n in sorted(names + links):
                    name, why = (rel / n).as_posix(), self._unsafe(os.path.join(dirpath, n))
                    if why:
                        self.unsafe.append((name, why))
                    elif not os.path.isdir(os.path.join(dirpath, n)):
                        found.append(name)
            self._files = sorted(found)
        return list(self._files)

    def _unsafe(self, path: str) -> str:
        if os.path.islink(path) and not self._inside(os.path.realpath(path)):
            return "a symbolic link that leads out of the medium: not read"
        if os.path.isdir(path) or os.path.isfile(path):
            return ""
        return "not a regular file (a FIFO, device or broken link): not read"

    def _inside(self, real: str) -> bool:
        root = self._real_root
        return real == root or real.startswith(root.rstrip("/") + "/")

    def _path(self, name: str) -> Path:
        path = self.root.joinpath(*name.split("/"))
        if not self._inside(os.path.realpath(path)):
            raise OSError(f"{name}: leads out of the medium")
        return path

    def open(self, name: str) -> BinaryIO:
        return open(self._path(name), "rb")  # noqa: SIM115 - returned to the caller

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def inspect(self, name: str) -> part10.Layout:
        return part10.inspect(self._path(name))

    def image_size(self) -> int:
        return sum(self.size(n) for n in self.files())


class _MappedFile(io.RawIOBase):
    """A read-only, seekable stream over a memoryview (an ISO member inside the mapped image)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._data = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        chunk = self._data[self._pos : self._pos + len(buffer)]
        size = len(chunk)
        memoryview(buffer).cast("B")[:size] = chunk
        self._pos += size
        return size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._data.release()
        super().close()


@dataclass(frozen=True)
class _IsoFile:
    iso_path: str  # raw ISO 9660 path with version, e.g. /DICOM/IM000000.;1
    start: int  # byte offset of the data in the image
    size: int


class IsoMedium(Medium):
    """An ISO 9660 image read with pycdlib (PS3.12 Annex F/P), never mounted."""

    kind = "iso"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._iso = pycdlib.PyCdlib()
        try:
            self._iso.open(str(path))
        except (PyCdlibException, OSError) as exc:
            raise MediaError(f"{path.name}: not a readable ISO 9660 image: {exc}") from exc
        self._fh = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._entries: dict[str, _IsoFile] = {}
        self._records: dict[str, object] = {}  # name -> pycdlib DirectoryRecord
        self._raw: list[str] = []
        try:
            self._scan("/", "")
        except PyCdlibException as exc:
            self.close()
            raise MediaError(f"{path.name}: unreadable ISO 9660 directory: {exc}") from exc

    def _scan(self, iso_dir: str, prefix: str) -> None:
        """Walk the ISO 9660 directory records below iso_dir (dot and dot-dot skipped).

        A file is named without its version and the dot of an empty extension; when two
        records of one directory would get one name that way (``IM1.;1`` and ``IM1.;2``,
        ``IM1.;1`` and ``IM1;1``), version 1 keeps the short name and the others keep their
        whole identifier: every record is a file of the medium, none hides another. Rock
        Ridge placeholders of relocated directories (a CL entry, RRIP 4.1.5.1) are not
        files: the directory they stand for is read where it was moved to (RR_MOVED)."""
        block = self._iso.logical_block_size
        files: list[tuple[str, str, object]] = []
        for child in self._iso.list_children(iso_path=iso_dir):
            if child is None or child.is_dot() or child.is_dotdot():
                continue
            raw = child.file_identifier().decode("ascii", "replace")
            iso_path = iso_dir.rstrip("/") + "/" + raw
            rr = child.rock_ridge
            if rr is not None and rr.child_link_record_exists():
                continue  # a relocated directory's placeholder (RRIP 4.1.5.1)
            self._raw.append(iso_path)
            if child.is_dir():
                self._scan(iso_path, f"{prefix}{raw}/")
                continue
            files.append((raw, iso_path, child))
        for raw, iso_path, child in sorted(files, key=_version_first):
            name = prefix + _short_name(raw)
            if name in self._entries:
                name = prefix + raw  # a second record with that short name: its whole name
            while name in self._entries:
                name += "#"  # a malformed directory repeating an identifier
            ino = child.inode
            start = ino.extent_location() * block if ino is not None else 0
            self._entries[name] = _IsoFile(iso_path, start, child.get_data_length())
            self._records[name] = child

    def files(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, name: str) -> _IsoFile:
        try:
            return self._entries[name]
        except KeyError:
            raise FileNotFoundError(name) from None

    def _view(self, name: str) -> memoryview:
        """The file's bytes inside the mapped image, as pycdlib reads them: one contiguous run
        from the first extent (cut short if the image itself is truncated)."""
        entry = self._entry(name)
        end = min(entry.start + entry.size, len(self._map))
        return memoryview(self._map)[entry.start : max(end, entry.start)]

    def open(self, name: str) -> BinaryIO:
        return _MappedFile(self._view(name))  # type: ignore[return-value]

    def size(self, name: str) -> int:
        return self._entry(name).size

    def inspect(self, name: str) -> part10.Layout:
        """part10's header walk over the file's bytes inside the mapped image: nothing is copied."""
        with self._view(name) as view:
            if len(view) < 8:
                raise part10.StructureError(f"only {len(view)} bytes: not a DICOM file")
            # part10.inspect() takes a path; its buffer walk takes any buffer, this view too
            return part10._inspect(view, len(view))  # type: ignore[arg-type]

    def image_size(self) -> int:
        return self.path.stat().st_size

    def volume_id(self) -> str | None:
        raw = self._iso.pvd.volume_identifier
        return raw.decode("ascii", "replace").strip(" \0")

    def iso_names(self) -> list[str]:
        return list(self._raw)

    def damage(self) -> list[str]:
        """The image must hold every block its Primary Volume Descriptor declares (ECMA-119
        8.4.8, Volume Space Size) and every file's data (a copy cut short loses files)."""
        have = len(self._map)
        declared = self._iso.pvd.space_size * self._iso.logical_block_size
        faults = []
        if have < declared:
            faults.append(f"the image is truncated: {have} bytes of the {declared} its volume "
                          "descriptor declares")
        cut = [n for n, e in self._entries.items() if e.start + e.size > have]
        if cut:
            faults.append(f"{len(cut)} file(s) end beyond the end of the image, e.g. {cut[0]}")
        return faults

    def extensions(self) -> list[str]:
        found = [("Joliet", self._iso.has_joliet()), ("Rock Ridge", self._iso.has_rock_ridge())]
        found.append(("UDF", self._iso.has_udf()))
        return [name for name, present in found if present]

    def close(self) -> None:
        super().close()
        if self._map.closed:
            return
        try:
            self._map.close()
        except BufferError:  # a stream from open() is still open: the map goes with it
            log.debug("ISO map still in use at close; left to the garbage collector")
        self._fh.close()
        self._iso.close()


def _short_name(raw: str) -> str:
    """An ISO 9660 file identifier without version and without the dot of an empty
    extension (ECMA-119 7.5.1): ``IM000001.;1`` -> ``IM000001``."""
    return raw.split(";", 1)[0].removesuffix(".")


def _version_first(item: tuple[str, str, object]) -> tuple:
    """Records of one short name: version 1 first (the File ID's, PS3.12 F.1.2), then the
    identifier with the dot of an empty extension, then the rest in identifier order."""
    raw = item[0]
    version = raw.partition(";")[2] or "1"
    return _short_name(raw), version.lstrip("0") != "1", ("." not in raw.split(";")[0], raw)


def _is_iso(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(ISO_MAGIC_OFFSET)
            return fh.read(5) == b"CD001"
    except OSError:
        return False


def open_medium(path: Path) -> Medium:
    """A folder, a DICOMDIR file (its folder is the root) or an ISO image; MediaError otherwise."""
    path = Path(path)
    if path.is_dir():
        return FolderMedium(path)
    if path.is_file() and name_key(path.name) == DICOMDIR:
        return FolderMedium(path.parent)
    if (path.is_file() or path.is_block_device()) and _is_iso(path):  # a disc in its drive
        return IsoMedium(path)
    raise MediaError(f"{path}: neither a folder, a DICOMDIR nor an ISO 9660 image")


def dicomdir_name(medium: Medium) -> str:
    """Stored name of the root DICOMDIR (PS3.10 8.6, PS3.12 F.1.2.2); MediaError if absent."""
    name = medium.resolve(DICOMDIR)
    if name is None:
        raise MediaError("no DICOMDIR in the root of the medium")
    return name


def read_dicomdir(medium: Medium) -> FileDataset:
    """The DICOMDIR parsed by pydicom from a byte copy, so item positions are file offsets."""
    return read_dicomdir_checked(medium)[0]


def read_dicomdir_checked(medium: Medium) -> tuple[FileDataset, list[str]]:
    """The DICOMDIR, and the faults of elements that could only be read by repairing them: an
    element whose VR is none (a corrupt byte) is read with its dictionary VR (PS3.5 6.2.2, as
    for UN), one that does not convert is kept as bytes; MediaError if it cannot be parsed."""
    name = dicomdir_name(medium)
    with medium.open(name) as fp:
        data = fp.read()
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "DirectoryRecordSequence" not in ds:
            raise MediaError(f"{name}: no Directory Record Sequence (not a Basic Directory)")
        len(ds.DirectoryRecordSequence)  # parse the records now, inside this try
        faults = _repair(ds, "the DICOMDIR")
        for item in ds.DirectoryRecordSequence:
            faults += _repair(item, f"the record at byte {getattr(item, 'seq_item_tell', '?')}")
    except MediaError:
        raise
    except Exception as exc:  # any parser failure means the DICOMDIR is unreadable
        raise MediaError(f"{name}: cannot be parsed: {exc}") from exc
    return ds, faults


def _repair(ds: Dataset, where: str) -> list[str]:
    """Make every element of ds (nested items too) readable; say what was repaired. Values
    stay raw (the records' keys are read as stored); sequences are read into items."""
    faults = []
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if tag == 0x00041220 or not isinstance(raw, RawDataElement):
            continue  # the records are repaired one by one, with their offsets
        if raw.VR is not None and raw.VR not in _VRS:
            vr, bad = _dictionary_vr(tag), raw.VR
            raw = raw._replace(VR=vr)
            ds[tag] = raw
            faults.append(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) of {where} has the VR "
                          f"{bad!r}, which is none (PS3.5 6.2); read as {vr}")
        if raw.VR == "SQ" or (raw.VR is None and _dictionary_vr(tag) == "SQ"):
            try:
                items = ds[tag].value or ()
            except Exception as exc:  # noqa: BLE001 - a sequence that does not parse
                ds[tag] = raw._replace(VR="UN")
                faults.append(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) of {where} cannot be "
                              f"read ({exc}); kept as bytes")
                continue
            for item in items:
                faults += _repair(item, where)
            continue
        try:
            convert_raw_data_element(raw, encoding=getattr(ds, "_character_set", None), ds=ds)
        except Exception as exc:  # noqa: BLE001 - a value that does not convert stays bytes
            ds[tag] = raw._replace(VR="UN")
            faults.append(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) of {where} cannot be read "
                          f"({exc}); kept as bytes")
    return faults


def _dictionary_vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr if " or " not in vr else "UN"


# -- the record tree -------------------------------------------------------------------------


def uint(record: Dataset, tag: int) -> int | None:
    """An UL/US value of a record, None if absent, empty or not a number."""
    elem = record.get(tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, bytes):
        value = int.from_bytes(value, "little") if len(value) in (2, 4) else None
    return value if isinstance(value, int) else None


@dataclass
class TreeNode:
    """One directory record and the records of its lower-level entity."""

    offset: int  # of the record's Item tag, from the start of the DICOMDIR file
    record: Dataset
    children: list[TreeNode] = field(default_factory=list)
    rtype: str = field(init=False)  # Directory Record Type (0004,1430) as stored
    in_use: bool = field(init=False)  # Record In-use Flag: only 0000H means inactive

    def __post_init__(self) -> None:
        self.rtype = records.text_value(self.record, RECORD_TYPE)
        self.in_use = uint(self.record, IN_USE) != 0

    @property
    def file_id(self) -> tuple[str, ...] | None:
        """Referenced File ID (0004,1500) components as stored, None if the record has none."""
        if FILE_ID not in self.record:
            return None
        value = records.text_value(self.record, FILE_ID)
        return tuple(value.split("\\")) if value else ()

    def text(self, keyword: str) -> str:
        return records.text_value(self.record, tag_for_keyword(keyword) or 0)


@dataclass(frozen=True)
class LinkProblem:
    """An offset that does not lead to a record, a cycle, or an unreachable record."""

    offset: int  # the record concerned (or the bad target)
    message: str
    #: a reader loses nothing by it: (0004,1202) only repeats where the root chain ends,
    #: which the (0004,1400) chain from (0004,1200) already tells (gdcmgendir gets it wrong)
    harmless: bool = False


@dataclass
class RecordTree:
    """The DICOMDIR as linked by its offsets."""

    roots: list[TreeNode]
    by_offset: dict[int, Dataset]
    problems: list[LinkProblem]

    def walk(self) -> Iterator[tuple[TreeNode, tuple[TreeNode, ...]]]:
        """Every reached record with its ancestors (root first; () at the root), depth first."""
        stack: list[tuple[TreeNode, tuple[TreeNode, ...]]] = [(n, ()) for n in reversed(self.roots)]
        while stack:
            node, ancestors = stack.pop()
            yield node, ancestors
            stack.extend((child, (*ancestors, node)) for child in reversed(node.children))


def _chain(start: int, source: str, by_offset: dict[int, Dataset], seen: set[int],
           problems: list[LinkProblem]) -> list[TreeNode]:
    """Records of one directory entity: start, then (0004,1400) until 0."""
    nodes: list[TreeNode] = []
    offset = start
    while offset:
        if offset in seen:
            problems.append(LinkProblem(offset, f"{source} leads to the record at byte {offset} "
                                                "a second time (cycle or shared record)"))
            break
        item = by_offset.get(offset)
        if item is None:
            problems.append(LinkProblem(offset, f"{source} = {offset} is not the position of "
                                                "a record's Item tag"))
            break
        seen.add(offset)
        nodes.append(TreeNode(offset, item))
        source = f"(0004,1400) of the record at byte {offset}"
        offset = uint(item, NEXT) or 0
    return nodes


def build_tree(ds: Dataset) -> RecordTree:
    """Link the records by their offsets (PS3.3 F.3-3); problems are collected, not raised."""
    by_offset: dict[int, Dataset] = {}
    for item in ds.get("DirectoryRecordSequence") or []:
        tell = getattr(item, "seq_item_tell", None)
        if tell is None:
            raise MediaError("record positions unknown: the DICOMDIR was not read from a file")
        by_offset[tell] = item
    problems: list[LinkProblem] = []
    seen: set[int] = set()
    first = uint(ds, ROOT_FIRST)
    if first is None:
        problems.append(LinkProblem(0, "(0004,1200) root offset is missing"))
    roots = _chain(first or 0, "(0004,1200) of the root", by_offset, seen, problems)
    _check_last(ds, roots, problems)
    stack = list(roots)
    while stack:
        node = stack.pop()
        lower = uint(node.record, LOWER) if node.in_use else 0
        if lower:
            source = f"(0004,1420) of the record at byte {node.offset}"
            node.children = _chain(lower, source, by_offset, seen, problems)
            stack.extend(node.children)
    for offset, item in sorted(by_offset.items()):
        if offset not in seen and uint(item, IN_USE) != 0:
            problems.append(LinkProblem(offset, f"the record at byte {offset} is not reachable "
                                                "from the root by the offsets"))
    return RecordTree(roots, by_offset, problems)


def _check_last(ds: Dataset, roots: list[TreeNode], problems: list[LinkProblem]) -> None:
    """(0004,1202) must name the last record of the root entity (0 if it is empty)."""
    last = uint(ds, ROOT_LAST)
    expected = roots[-1].offset if roots else 0
    if last is None:
        problems.append(LinkProblem(0, "(0004,1202) last root offset is missing"))
    elif last != expected:
        problems.append(LinkProblem(last, f"(0004,1202) = {last} but the last root record "
                                          f"is at byte {expected}", harmless=True))


@cache
def hierarchy() -> dict[str, frozenset[str]]:
    """Allowed children per parent record type (PS3.3 Table F.4-1); "" is the root."""
    table = records.record_keys()
    known = {k for k in table if not k.startswith("_")}
    root_level = frozenset(table["_root_level"])
    leaves = frozenset(known - set(records.LEVELS) - root_level)
    allowed = {
        "": root_level | {"PATIENT", "PRIVATE"},
        "PATIENT": frozenset({"STUDY", "PRIVATE"}),
        "STUDY": frozenset({"SERIES", "PRIVATE"}),
        "SERIES": leaves | {"PRIVATE"},
    }
    allowed.update({t: frozenset({"PRIVATE"}) for t in leaves | root_level | {"PRIVATE"}})
    return allowed


# -- summary ---------------------------------------------------------------------------------


def _series(node: TreeNode) -> dict:
    leaves = [c for c in node.children if c.in_use]
    return {
        "uid": node.text("SeriesInstanceUID"),
        "modality": node.text("Modality"),
        "number": node.text("SeriesNumber"),
        "description": node.text("SeriesDescription"),
        "instances": len(leaves),
        "record_types": dict(Counter(c.rtype for c in leaves)),
    }


def _study(node: TreeNode) -> dict:
    return {
        "uid": node.text("StudyInstanceUID"),
        "date": node.text("StudyDate"),
        "description": node.text("StudyDescription"),
        "series": [_series(c) for c in node.children if c.in_use and c.rtype == "SERIES"],
    }


def _patient(node: TreeNode) -> dict:
    name = node.record.get("PatientName")  # PersonName, decoded by the record's charset
    return {
        "id": node.text("PatientID"),
        "name": str(name) if name is not None else "",
        "studies": [_study(c) for c in node.children if c.in_use and c.rtype == "STUDY"],
    }


def _misplaced(tree: RecordTree) -> list[dict]:
    """Records whose type is not allowed where they stand (an unknown or corrupt type,
    PS3.3 Table F.4-1): neither they nor their lower-level records are read; that loses
    data when any of them references a file."""
    allowed, faults = hierarchy(), []
    for node, ancestors in tree.walk():
        parent = ancestors[-1] if ancestors else None
        if not node.in_use or (parent is not None and not _placed(parent, ancestors[:-1],
                                                                   allowed)):
            continue  # inactive, or below a misplaced record (counted with it)
        if node.rtype in allowed.get(parent.rtype if parent else "", frozenset()):
            continue
        below = [n for n, _a in _subtree(node) if n.in_use]
        files = sum(1 for n in below if n.file_id)
        where = f"under a {parent.rtype} record" if parent else "at the root"
        faults.append({"fault": f"the record at byte {node.offset} has the type "
                                f"{node.rtype!r}, not allowed {where} (PS3.3 Table F.4-1): it "
                                f"and its {len(below) - 1} lower-level record(s) are not read, "
                                f"{files} referenced file(s) among them", "harmless": not files})
    return faults


def _placed(node: TreeNode, ancestors: tuple[TreeNode, ...],
            allowed: dict[str, frozenset[str]]) -> bool:
    chain = [*ancestors, node]
    return all(n.rtype in allowed.get(p.rtype if p else "", frozenset())
               for p, n in zip([None, *chain[:-1]], chain, strict=True))


def _subtree(node: TreeNode) -> Iterator[tuple[TreeNode, tuple[TreeNode, ...]]]:
    return RecordTree([node], {}, []).walk()


def summarize(medium: Medium) -> dict:
    """Patient -> study -> series -> instances as linked by the offsets, as a tolerant File-set
    Reader sees them: whatever can be reached is read, and every fault is listed ("faults").
    "complete" is False when a fault loses data (records out of reach, referenced files
    absent, a truncated image); MediaError only when there is no DICOMDIR to read."""
    ds, repaired = read_dicomdir_checked(medium)
    tree = build_tree(ds)
    faults = [{"fault": f"DICOMDIR offsets: {p.message}", "harmless": p.harmless}
              for p in tree.problems]
    faults += [{"fault": f"DICOMDIR: {r}", "harmless": True} for r in repaired]
    faults += _misplaced(tree)
    faults += [{"fault": d, "harmless": False} for d in medium.damage()]
    missing = [n for n, _a in tree.walk() if n.in_use and n.file_id
               and medium.resolve("/".join(n.file_id)) is None]
    if missing:
        faults.append({"fault": f"{len(missing)} referenced file(s) are not on the medium, "
                                f"e.g. {'/'.join(missing[0].file_id or ())}", "harmless": False})
    patients = [_patient(n) for n in tree.roots if n.in_use and n.rtype == "PATIENT"]
    studies = [s for p in patients for s in p["studies"]]
    series = [s for st in studies for s in st["series"]]
    others = Counter(n.rtype for n in tree.roots if n.in_use and n.rtype != "PATIENT")
    meta = getattr(ds, "file_meta", None)
    return {
        "fileset_id": records.text_value(ds, 0x00041130),
        "fileset_uid": str(meta.get("MediaStorageSOPInstanceUID", "")) if meta else "",
        "patients": patients,
        "other_records": dict(others),
        "counts": {
            "patients": len(patients),
            "studies": len(studies),
            "series": len(series),
            "instances": sum(s["instances"] for s in series),
        },
        "faults": faults,
        "complete": all(f["harmless"] for f in faults),
    }
