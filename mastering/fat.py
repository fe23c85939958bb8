"""FAT rules for a File-set on a USB stick or flash card (PS3.12 Annex R, Annex A).

PS3.12 R.1.1 allows FAT16 and FAT32 only, on the first partition or the whole device, and makes
the File ID the file name. What the file system adds:

* **Short names.** A name FAT can hold in one 8.3 directory entry needs no long-file-name
  (VFAT) entries: at most 8 characters, optionally a dot and at most 3 more, upper case.
  Readers that only know 8.3 entries (old viewers, embedded systems) then see the real
  names. DICOM File ID components (A-Z 0-9 _, 1-8 characters, no extension) always fit; the
  web content names (README.TXT, INDEX.HTM, IHE_PDI/...) are chosen to fit as well.
* **Reserved device names.** CON, PRN, AUX, NUL, COM1-9 and LPT1-9 cannot be file names on
  Windows, with or without an extension.
* **File size.** FAT32 stores the size in 32 bits: a file holds at most 4 GiB - 1 byte.
* **Space.** Every file takes whole clusters, every folder at least one: :func:`allocated`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: FAT32 keeps a file's size in 32 bits (FAT16 too)
MAX_FILE_BYTES = 2**32 - 1
DIR_ENTRY_BYTES = 32
SHORT_NAME = re.compile(r"[A-Z0-9_$~!#%&{}@'`()^-]{1,8}(\.[A-Z0-9_$~!#%&{}@'`()^-]{1,3})?")
RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                      *(f"LPT{i}" for i in range(1, 10))})
#: PS3.12 R.1.1: the file systems a DICOM USB medium may carry (udev ID_FS_VERSION)
ALLOWED_VERSIONS = frozenset({"FAT16", "FAT32"})


def short_name_ok(name: str) -> bool:
    """True if name fits one 8.3 directory entry as it is (upper case, no long name)."""
    return bool(SHORT_NAME.fullmatch(name)) and name.split(".")[0] not in RESERVED


def name_problems(paths: Iterable[tuple[str, ...]]) -> list[str]:
    """Paths with a component that needs a long-file-name entry or is a reserved name."""
    bad = []
    for comps in paths:
        wrong = [c for c in comps if not short_name_ok(c)]
        if wrong:
            bad.append(f"{'/'.join(comps)}: {', '.join(wrong)} is not an upper-case 8.3 name "
                       "(FAT short name, PS3.12 R.1.1)")
    return bad


def size_problems(files: Iterable[tuple[tuple[str, ...], int]],
                  limit: int = MAX_FILE_BYTES) -> list[str]:
    """Files above FAT's (or the profile's) file size limit."""
    return [f"{'/'.join(comps)}: {size} bytes; FAT holds at most {limit} bytes in one file"
            for comps, size in files if size > limit]


def allocated(size: int, unit: int) -> int:
    """Bytes a file of size takes on a file system that allocates in units (clusters)."""
    return -(-size // unit) * unit if size else 0


def folder_bytes(entries: int, unit: int) -> int:
    """A folder with this many entries (plus '.' and '..'): at least one cluster."""
    return max(1, -(-(entries + 2) * DIR_ENTRY_BYTES // unit)) * unit
