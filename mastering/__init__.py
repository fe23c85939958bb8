"""DICOM media mastering: PS3.10 File-sets, DICOMDIR and PS3.12 media for patient discs and sticks.

Stages, one module each, data flowing one way::

    intake (scan headers) -> plan (profile rules, File IDs, volumes) -> write (DICOMDIR, ISO or
    folder) -> verify

Front-ends (``mastering.cli``, the burning daemon, the USB kiosk) call
:func:`mastering.pipeline.master`.
"""

__version__ = "0.1.0"

#: (0002,0012) Implementation Class UID: a 2.25 UUID-derived UID (PS3.5 B.2), fixed for this
#: product.
IMPLEMENTATION_CLASS_UID = "2.25.176416913538478125325407209347861129393"
#: (0002,0013) Implementation Version Name (SH, at most 16 characters).
IMPLEMENTATION_VERSION_NAME = "MASTERING_010"
