"""USB export: safe stick detection (:mod:`.devices`), mounting and powering off (:mod:`.mount`),
FAT32 formatting on request (:mod:`.format`), the export itself (:mod:`.export`, a thin shell
over :func:`mastering.pipeline.master` writing in place), the ``mastering usb`` command
(:mod:`.cli`) and the touch-screen kiosk (:mod:`.kiosk`).
"""
