"""ISO 9660 images of a planned volume, written with pycdlib (PS3.12 Annex F, P and X).

CD: strict ISO 9660 Level 1, no Joliet, no Rock Ridge; File ID ``C1\\...\\CN`` becomes
``/C1/.../CN.;1`` and the File-set ID is the Primary Volume Descriptor's Volume Identifier
(PS3.12 F.1). DVD and BD follow the profile's file-system settings. pycdlib lays the image out
and writes its metadata; the file bodies go from their sources to their extents without
passing through Python: straight to the disk where the file system takes direct writes
(mastering.directio), else by kernel copies into the page cache (Image), or already during
the scan (mastering.earlyiso). The image is written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import io
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from threading import Event, Thread

import pycdlib

from . import __version__, directio, earlyiso
from .cancel import Cancelled
from .content import Range, Segment, SegmentReader, copy_segments, output_size, segments
from .plan import FileEntry, Volume
from .profiles import Profile
from .syscalls import allocate

ProgressFn = Callable[[str, int, int], None]
BLOCKSIZE = 1 << 20
SECTOR = 2048
#: bodies already in the image (mastering.earlyiso): (id(entry) -> first sector, the data
#: area's first sector, the first sector after it)
EarlyLayout = tuple[dict[int, int], int, int]


class Image(pycdlib.PyCdlib):
    """pycdlib's image, with the bodies of our files put in by kernel-side copies.

    pycdlib lays the image out and writes every descriptor, path table and directory record
    itself; for each file it then seeks to the file's extent and copies the data through
    Python in blocks (``_output_file_data``, called once per inode, a method pycdlib 1.x has
    kept since its first releases). For inodes that read from a SegmentReader that one step is
    replaced: the same segments go with copy_file_range from the source files to the same
    extent, so the bytes never pass through this process. The padding to the next sector is
    not written: the image file is new, so unwritten bytes read as zeros, which is what pycdlib
    writes there. Everything else (bytes, files pycdlib opens itself) takes pycdlib's path.
    ``kernel_copy = False`` restores pycdlib's own copy (the tests compare the two)."""

    kernel_copy = True

    def __init__(self) -> None:
        super().__init__()
        #: capture mode (mastering.directio): metadata goes here, bodies are only noted
        self.capture: directio.Capture | None = None
        self.recorded: list[tuple[int, Body]] = []
        #: early layout (mastering.earlyiso): id(entry) -> first sector of the bodies already
        #: in the image, the data area [data_start, data_end) and the DICOMDIR's Body
        self.placed: dict[int, int] | None = None
        self.data_start = self.data_end = 0
        self.dicomdir: Body | None = None
        self.overflow = False  # the metadata did not fit before the data area
        self._end = 0

    def _set_inode(self, ino, current_extent, part_start):  # noqa: ANN001 - pycdlib's types
        """Early layout: bodies already written keep their sectors; the DICOMDIR comes right
        after the directory records, as always, and must end before the data area; every
        other file follows the data area."""
        if self.placed is None:
            return super()._set_inode(ino, current_extent, part_start)
        body = ino.data_fp
        extent = self.placed.get(id(body.source)) if isinstance(body, Body) else None
        if extent is not None:
            end = super()._set_inode(ino, extent, part_start)
            self._end = max(self._end, end)
            return current_extent
        if body is not self.dicomdir:
            current_extent = max(current_extent, self.data_end)
        end = super()._set_inode(ino, current_extent, part_start)
        if body is self.dicomdir and end > self.data_start:
            self.overflow = True
        self._end = max(self._end, end)
        return end

    def _reshuffle_extents(self):  # noqa: ANN202
        if self.placed is None:
            return super()._reshuffle_extents()
        for vd in self.pvds:  # room for the layout while pycdlib checks it; set exactly below
            vd.space_size = 0xFFFFFFFF
        self._end = 0
        super()._reshuffle_extents()
        for vd in self.pvds:
            vd.space_size = self._end
        return None

    def _write_fp(self, outfp, blocksize, progress_cb, progress_opaque):  # noqa: ANN001
        """The whole image is allocated before anything is written: the file system then
        finds the space in one go instead of page by page (measured: about a fifth of the
        copy time on ext4), and a disk that cannot hold the image fails at once."""
        if self._needs_reshuffle:
            self._reshuffle_extents()
        if self.kernel_copy and self.capture is None and self.placed is None:
            allocate(outfp.fileno(), self.pvd.space_size * self.logical_block_size)
        return super()._write_fp(outfp, blocksize, progress_cb, progress_opaque)

    def _output_file_data(self, outfp, blocksize, ino):  # noqa: ANN001 - pycdlib's types
        body = ino.data_fp
        if not (self.kernel_copy and isinstance(body, Body) and not ino.manage_fp
                and ino.boot_info_table is None and ino.fp_offset == 0
                and ino.data_length == body.length):
            yield from super()._output_file_data(outfp, blocksize, ino)
            if isinstance(body, Body):
                body.close()
            return
        at = ino.extent_location() * self.logical_block_size
        if self.placed is not None and id(body.source) in self.placed:
            if self.capture is not None:
                self.capture.note(at, body.length)
            yield body.length  # written while the scan ran
            return
        if self.capture is not None:
            self.capture.note(at, body.length)
            self.recorded.append((at, body))
            yield body.length
            return
        outfp.flush()  # pycdlib's buffered writes land before ours
        yield from copy_segments(body.parts(), outfp.fileno(), at)


class Body:
    """What pycdlib holds for one file until the image is written: the entry (or the file)
    and its length, a few dozen bytes a file where a ready reader would hold its segments,
    buffer and positions. Its segments are made when the file is written; pycdlib's own
    copy loop gets a SegmentReader over them, made on its first seek."""

    __slots__ = ("source", "length", "_reader")
    mode = "rb"  # what pycdlib checks a file object for

    def __init__(self, source: FileEntry | Range | bytes, length: int):
        self.source, self.length = source, length
        self._reader: SegmentReader | None = None

    def parts(self) -> list[Segment]:
        if isinstance(self.source, Range | bytes):
            return [self.source]
        return segments(self.source)

    def _open(self) -> SegmentReader:
        if self._reader is None:
            self._reader = SegmentReader(self.parts())
        return self._reader

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._open().seek(offset, whence)

    def tell(self) -> int:
        return self._open().tell()

    def read(self, size: int = -1) -> bytes:
        return self._open().read(size)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def iso_path(components: tuple[str, ...] | list[str]) -> str:
    """PS3.12 F.1.2.1: no extension, an empty one after '.', version 1."""
    return "/" + "/".join(components) + ".;1"


def dir_path(components: tuple[str, ...]) -> str:
    return "/" + "/".join(components)


def build(volume: Volume, dicomdir: bytes | Path, profile: Profile,
          extra_files: list[tuple[tuple[str, ...], bytes | Path | Range]] = (),
          volume_id: str | None = None, early: EarlyLayout | None = None) -> Image:
    """A pycdlib image of the volume, data not yet read. extra_files: non-DICOM (PDI) files.
    The Volume Identifier is the File-set ID (PS3.12 F.1.1) unless volume_id says otherwise.
    early: bodies already in the image file (mastering.earlyiso); check image.overflow."""
    iso = Image()
    if early is not None:
        iso.placed, iso.data_start, iso.data_end = early
    vol_ident = volume.fileset_id if volume_id is None else volume_id
    iso.new(interchange_level=profile.interchange_level, vol_ident=vol_ident,
            sys_ident="", joliet=3 if profile.joliet else None,
            rock_ridge="1.09" if profile.rock_ridge else None, udf=profile.udf or None,
            app_ident_str=f"DICOM MASTERING {__version__}")
    udf = bool(profile.udf)
    iso.dicomdir = _add_bytes(iso, ("DICOMDIR",), dicomdir, udf)
    made: set[tuple[str, ...]] = set()
    for comps, data in extra_files:
        _mkdirs(iso, comps[:-1], made, udf)
        _add_bytes(iso, comps, data, udf)
    for entry in volume.entries():
        _mkdirs(iso, entry.file_id[:-1], made, udf)
        _add_entry(iso, entry, udf)
    return iso


def _mkdirs(iso: pycdlib.PyCdlib, comps: tuple[str, ...], made: set, udf: bool) -> None:
    for depth in range(1, len(comps) + 1):
        sub = comps[:depth]
        if sub in made:
            continue
        iso.add_directory(dir_path(sub), udf_path=dir_path(sub) if udf else None)
        made.add(sub)


def _add_bytes(iso: pycdlib.PyCdlib, comps: tuple[str, ...], data: bytes | Path | Range,
               udf: bool) -> Body:
    """A non-DICOM file (8.3 name) or the DICOMDIR; files in the work folder (spooled web
    content, the DICOMDIR) are copied by the kernel like the DICOM files."""
    name = comps[-1]
    path = "/" + "/".join(comps) + (";1" if "." in name else ".;1")
    udf_path = dir_path(comps) if udf else None
    if isinstance(data, Range):
        body = Body(data, data.length)
    elif isinstance(data, Path):
        size = os.stat(data).st_size
        body = Body(Range(str(data), 0, size), size)
    else:  # written with pwrite where the bodies go in by kernel copies
        body = Body(data, len(data))
    iso.add_fp(body, body.length, path, udf_path=udf_path)
    return body


def _add_entry(iso: pycdlib.PyCdlib, entry: FileEntry, udf: bool) -> None:
    """Every DICOM file is a Body: kernel copies from its sources, or a SegmentReader, which
    opens a source only while it is read and raises where pycdlib would pad a short read
    silently (a file changed since the scan must fail the run, not reach the disc)."""
    body = Body(entry, output_size(entry))
    udf_path = dir_path(entry.file_id) if udf else None
    iso.add_fp(body, body.length, iso_path(entry.file_id), udf_path=udf_path)


def _stamp(epoch: int) -> bytes:
    """An ISO 9660 volume descriptor date (ECMA-119 8.4.26.1) in UTC."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(epoch)).encode() + b"00" + b"\0"


def set_dates(iso: pycdlib.PyCdlib, epoch: int) -> None:
    """Reproducible images (SOURCE_DATE_EPOCH): every date in UTC from the epoch."""
    utc = time.gmtime(epoch)
    stamp = _stamp(epoch)
    for vd in [*iso.pvds, *iso.svds]:
        for attr in ("volume_creation_date", "volume_modification_date", "volume_effective_date"):
            date = getattr(vd, attr)
            date.date_str = stamp
    for _path, rec in _walk(iso):
        d = rec.date
        d.years_since_1900, d.month, d.day_of_month = utc.tm_year - 1900, utc.tm_mon, utc.tm_mday
        d.hour, d.minute, d.second, d.gmtoffset = utc.tm_hour, utc.tm_min, utc.tm_sec, 0
    if iso.has_udf():
        _udf_dates(iso, epoch)


def _udf_dates(iso: pycdlib.PyCdlib, epoch: int) -> None:
    """UDF (BD profiles): every timestamp (ECMA-167 1/7.3) of every descriptor and file entry
    in UTC from the epoch, and the Volume Set Identifier's unique part (UDF 2.60 2.2.2.5: a
    time in hex, then anything; pycdlib adds random bits) from the epoch and volume name."""
    from pycdlib import udf

    utc = time.gmtime(epoch)
    seen: set[int] = set()
    stack: list[object] = [getattr(iso, name, None) for name in type(iso).__slots__]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list | tuple):
            stack.extend(obj)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
            continue
        if id(obj) in seen or type(obj).__module__ != udf.__name__:
            continue
        seen.add(id(obj))
        if isinstance(obj, udf.UDFTimestamp):
            if getattr(obj, "_initialized", False):
                obj.tz, obj.timetype = 0, 1  # local time at offset 0: UTC (ECMA-167 1/7.3.1)
                obj.year, obj.month, obj.day = utc.tm_year, utc.tm_mon, utc.tm_mday
                obj.hour, obj.minute, obj.second = utc.tm_hour, utc.tm_min, utc.tm_sec
                obj.centiseconds = obj.hundreds_microseconds = obj.microseconds = 0
            continue
        if isinstance(obj, udf.UDFPrimaryVolumeDescriptor) and obj._initialized:
            tail = zlib.crc32(obj.vol_ident) & 0xFFFFFFFF
            obj.vol_set_ident = udf._ostaunicode_zero_pad(f"{epoch:08x}{tail:08x}", 128)
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                stack.append(getattr(obj, name, None))


def _walk(iso: pycdlib.PyCdlib):
    """Every directory record, the '.' and '..' entries included (they carry dates too), of
    the ISO 9660 tree and of the Joliet tree where there is one (BD profiles)."""
    roots = [vd.root_directory_record() for vd in (iso.pvd, iso.joliet_vd) if vd is not None]
    for root in roots:
        stack = [root]
        while stack:
            rec = stack.pop()
            yield None, rec
            # the root's own identifier is the one '.' uses, so it is recognised by identity
            if rec.is_dir() and (rec is root or not (rec.is_dot() or rec.is_dotdot())):
                stack.extend(c for c in rec.children if c is not None)


def write(iso: pycdlib.PyCdlib, tmp: Path, *, label: str = "write", sync: bool = True,
          epoch: int | None = None, progress: ProgressFn | None = None,
          cancel: Event | None = None, early: earlyiso.EarlyImage | None = None) -> int:
    """Write the image to tmp (created exclusively); returns its size. The image goes
    straight to the disk (mastering.directio) where the file system allows; elsewhere
    through the page cache by kernel copies. With sync, the data is on the disk when this
    returns (in the page cache's case a background flusher starts the write-back while the
    image is still being written, so the final fsync has little left to wait for). early:
    the image file the scan has already filled with bodies (built with its layout)."""

    def tick(done: int, total: int, _opaque: object) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled while writing the image")
        if progress:
            progress(label, done, total)

    if early is not None:
        return _write_early(iso, early, sync, epoch, tick)
    if iso.kernel_copy:
        size = _write_direct(iso, tmp, epoch, tick, sync)
        if size is not None:
            return size
    with open(tmp, "xb+") as out:
        _pycdlib_write(iso, out, sync, epoch, tick)
        return out.seek(0, os.SEEK_END)


def _pycdlib_write(iso: pycdlib.PyCdlib, out, sync: bool, epoch: int | None,  # noqa: ANN001
                   tick: Callable[[int, int, object], None],
                   then: Callable[[], None] | None = None) -> None:
    """pycdlib writes the image into out (then: what is to be done before the dates are
    fixed and the file synced); with sync the flusher runs meanwhile, then fsync."""
    flusher = _Flusher(out.fileno()) if sync else None
    try:
        iso.write_fp(out, blocksize=BLOCKSIZE, progress_cb=tick)
        out.flush()
        if then is not None:
            then()
        if epoch is not None:
            _fix_modification_dates(out, epoch)
        out.flush()
    finally:
        if flusher:
            flusher.stop()
    if sync:
        os.fsync(out.fileno())


def _write_early(iso: Image, early: earlyiso.EarlyImage, sync: bool, epoch: int | None,
                 tick: Callable[[int, int, object], None]) -> int:
    """Metadata and the later files into the early image file; slots of files that are not
    on the medium are zeroed; the file gets the image's exact size."""
    iso._reshuffle_extents()
    total = iso.pvd.space_size * iso.logical_block_size
    fd = early.fd
    assert fd is not None
    os.ftruncate(fd, total)  # exactly: pycdlib pads a shorter file with its last byte

    def then() -> None:
        early.check_sources()
        early.clear_unused(total)

    if early.direct:  # the rest straight to the disk too: around the data area
        capture = directio.Capture()
        iso.capture, iso.recorded = capture, []
        try:
            iso.write_fp(capture, blocksize=BLOCKSIZE)
            if epoch is not None:
                _fix_modification_dates(capture, epoch)
            regions = [(0, early.start * SECTOR), (early.end * SECTOR, total)]
            directio.stream(fd, total, capture.pieces(), iso.recorded,
                            progress=lambda done, whole: tick(done, whole, None),
                            regions=[r for r in regions if r[0] < r[1]])
        finally:
            iso.capture, iso.recorded = None, []
        then()
        if sync:
            os.fsync(fd)
    else:
        with open(fd, "r+b", closefd=False) as out:
            _pycdlib_write(iso, out, sync, epoch, tick, then)
    early.close()
    return total


def _write_direct(iso: Image, tmp: Path, epoch: int | None,
                  tick: Callable[[int, int, object], None], sync: bool = True) -> int | None:
    """The image by direct writes (mastering.directio), made durable with sync; None where
    the file system does not take them (nothing is left at tmp then)."""
    fd = directio.open_direct(tmp)
    if fd is None:
        return None
    try:
        capture = directio.Capture()
        iso.capture, iso.recorded = capture, []
        try:
            iso.write_fp(capture, blocksize=BLOCKSIZE)
        finally:
            iso.capture = None
        if epoch is not None:
            _fix_modification_dates(capture, epoch)
        total = iso.pvd.space_size * iso.logical_block_size
        allocate(fd, total)
        directio.stream(fd, total, capture.pieces(), iso.recorded,
                        progress=lambda done, whole: tick(done, whole, None))
        if sync:
            os.fsync(fd)
        return total
    except directio.DirectUnsupported:
        os.unlink(tmp)  # created here, exclusively: ours to remove
        return None
    finally:
        iso.recorded = []
        os.close(fd)


VD_START, VD_MODIFIED = 16 * 2048, 830  # ECMA-119 8.4.27: Volume Modification Date


def _fix_modification_dates(out, epoch: int) -> None:  # noqa: ANN001 - binary file
    """pycdlib stamps the Volume Modification Date with the clock when it writes the
    descriptors; for a reproducible image every descriptor gets the epoch instead."""
    pos = VD_START
    while True:
        out.seek(pos)
        head = out.read(7)
        if len(head) < 7 or head[1:6] != b"CD001" or head[0] == 255:
            break
        if head[0] in (1, 2):  # primary and supplementary volume descriptors
            out.seek(pos + VD_MODIFIED)
            out.write(_stamp(epoch))
        pos += 2048
    out.seek(0, 2)


class _Flusher:
    """Calls fdatasync on a file every FLUSH_EVERY seconds from a thread of its own."""

    FLUSH_EVERY = 0.25

    def __init__(self, fd: int):
        self.fd, self.done = fd, Event()
        self.thread = Thread(target=self._run, name="iso-flusher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.FLUSH_EVERY):
            os.fdatasync(self.fd)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
