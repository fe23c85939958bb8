"""The DICOM side: one pynetdicom AE with Storage (every storage SOP class, the common
transfer syntaxes), Verification, Storage Commitment, Media Creation Management and Instance
Availability Notification, plus the association policy (allowed calling AEs and peer
addresses, called AE, limits).

Each handler is a small function bound to its event; the work happens in the modules behind
them (:mod:`.spool`, :mod:`.commitment`, :mod:`.mcm`, :mod:`.assembly`). Rejections use the
standard reasons (PS3.8 9.3.4): calling AE not recognised (1/1/3), called AE not recognised
(1/1/7), a peer address not allowed (1/1/1, no reason given), too many associations
(2/3/2, by pynetdicom). Logs name the peer and the reason, and UIDs, never patient data.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from . import assembly
from .commitment import PUSH_MODEL, Commitments
from .config import Config
from .mcm import MCM_CLASS, MediaCreation
from .spool import CANNOT_UNDERSTAND, Spool
from .store import JobStore

log = logging.getLogger("mastering.daemon.scp")

IAN_CLASS = "1.2.840.10008.5.1.4.33"
#: accepted per context in this order of preference: the uncompressed ones first (no decoding
#: needed for STD-GEN-CD), then what modalities send compressed
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                     DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEGLosslessSV1,
                     JPEGLossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSLossless,
                     JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless]
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass
class Services:
    """What the handlers work on."""

    config: Config
    store: JobStore
    spool: Spool
    commitments: Commitments | None = None
    mcm: MediaCreation | None = None


class Policy:
    """Who may associate (scp.allowed_calling_aets, scp.allowed_peers, scp.ae_title)."""

    def __init__(self, cfg: Config):
        self.ae_title = cfg.scp.ae_title.strip()
        self.calling = {a.strip() for a in cfg.scp.allowed_calling_aets}
        self.networks = [ipaddress.ip_network(p, strict=False) for p in cfg.scp.allowed_peers]
        self.require_called = cfg.scp.require_called_aet

    def rejection(self, calling: str, called: str, address: str) -> tuple[int, str] | None:
        """(reason, why) for A-ASSOCIATE-RJ permanent/user, or None to accept."""
        if self.networks:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                ip = None
            if ip is None or not any(ip in net for net in self.networks):
                return 1, "peer address not allowed"
        if self.calling and calling not in self.calling:
            return 3, "calling AE title not recognised"
        if self.require_called and called != self.ae_title:
            return 7, "called AE title not recognised"
        return None


def handle_requested(event, policy: Policy) -> None:
    prim = event.assoc.requestor.primitive
    calling = str(prim.calling_ae_title).strip()
    called = str(prim.called_ae_title).strip()
    address = event.assoc.requestor.address
    refused = policy.rejection(calling, called, address)
    if refused is None:
        return
    reason, why = refused
    log.warning("association from %s@%s to %s rejected (1/1/%d): %s", calling, address, called,
                reason, why)
    event.assoc.acse.send_reject(1, 1, reason)
    event.assoc.kill()


#: pynetdicom's reader thread sleeps this long whenever it finds nothing to do (its default
#: is 1 ms); a sender waiting for each C-STORE response pays it several times per instance.
#: Associations that are transferring poll faster; idle ones go back to the default
#: (:func:`slow_idle`), since a faster poll costs CPU while nothing comes.
FAST_POLL, IDLE_POLL, IDLE_AFTER = 0.0001, 0.001, 2.0


def _poll(assoc, delay: float) -> None:
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = delay
    assoc.mastering_active = time.monotonic()


def slow_idle(ae: AE) -> None:
    """From the main loop: associations without a C-STORE for IDLE_AFTER s poll slowly."""
    now = time.monotonic()
    for assoc in ae.active_associations:
        if now - getattr(assoc, "mastering_active", now) > IDLE_AFTER:
            dul = getattr(assoc, "dul", None)
            if dul is not None and getattr(dul, "_run_loop_delay", IDLE_POLL) != IDLE_POLL:
                dul._run_loop_delay = IDLE_POLL


def handle_open(event) -> None:
    """No Nagle on our side: a C-STORE response waits for nothing (network.md §4)."""
    with contextlib.suppress(AttributeError, OSError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _poll(event.assoc, FAST_POLL)


def handle_close(event, services: Services) -> None:
    """Data sets an aborted association left half-received are removed at once."""
    n = services.spool.drop_incoming(event.assoc.dul)
    if n:
        log.warning("association from %s@%s ended with %d data set(s) not received whole; "
                    "removed", event.assoc.requestor.ae_title.strip(),
                    event.assoc.requestor.address, n)


def handle_echo(event) -> int:
    log.info("C-ECHO from %s@%s", event.assoc.requestor.ae_title.strip(),
             event.assoc.requestor.address)
    return 0x0000


def _status(code: int, comment: str = "") -> int | Dataset:
    if not comment:
        return code
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def handle_store(event, services: Services) -> int | Dataset:
    req = event.request
    _poll(event.assoc, FAST_POLL)
    calling = event.assoc.requestor.ae_title.strip()
    peer = event.assoc.requestor.address
    try:
        incoming = services.spool.take_incoming(event.dataset_path)
        if incoming is None:  # not streamed by us (cannot happen once start() ran)
            raise RuntimeError("the data set was not received into the spool")
        out = services.spool.receive_incoming(incoming, str(req.AffectedSOPClassUID),
                                              str(req.AffectedSOPInstanceUID), calling, peer)
    except Exception:  # a failure status, never a Success, and a log line naming the peer
        log.exception("C-STORE %s from %s@%s failed", req.AffectedSOPInstanceUID, calling, peer)
        return _status(CANNOT_UNDERSTAND, "internal error")
    return _status(out.status, out.comment)


def handle_ian(event, services: Services) -> tuple[int, Dataset | None]:
    """Instance Availability Notification (PS3.4 R): the sender says the study is complete."""
    ds = event.attribute_list
    calling = event.assoc.requestor.ae_title.strip()
    refs = []
    for series in ds.get("ReferencedSeriesSequence", []):
        for item in series.get("ReferencedSOPSequence", []):
            refs.append([str(item.get("ReferencedSOPClassUID", "")),
                         str(item.get("ReferencedSOPInstanceUID", "")),
                         str(item.get("InstanceAvailability", "ONLINE"))])
    uid = str(event.request.AffectedSOPInstanceUID or "")
    ready, missing = assembly.ian_ready(services.store, refs, calling)
    log.info("instance availability notification from %s@%s: %d instance(s), %d job(s) "
             "ready, %d not yet stored", calling, event.assoc.requestor.address, len(refs),
             len(ready), len(missing))
    if missing and uid:
        services.store.add_request(uid, "ian", "pending", calling,
                                   event.assoc.requestor.address, {"refs": refs})
    reply = Dataset()
    if event.request.AffectedSOPInstanceUID is None:
        from pydicom.uid import generate_uid

        reply.AffectedSOPInstanceUID = generate_uid()
    return 0x0000, reply


def handle_n_action(event, services: Services) -> tuple[int, Dataset | None]:
    cls = str(event.request.RequestedSOPClassUID)
    if cls == PUSH_MODEL and services.commitments is not None:
        return services.commitments.handle_action(event)
    if cls == MCM_CLASS and services.mcm is not None:
        return services.mcm.handle_action(event)
    return 0x0122, None  # SOP class not supported


def handle_n_create(event, services: Services) -> tuple[int, Dataset | None]:
    cls = str(event.request.AffectedSOPClassUID)
    if cls == MCM_CLASS and services.mcm is not None:
        return services.mcm.handle_create(event)
    if cls == IAN_CLASS:
        return handle_ian(event, services)
    return 0x0122, None


def handle_n_get(event, services: Services) -> tuple[int, Dataset | None]:
    if str(event.request.RequestedSOPClassUID) == MCM_CLASS and services.mcm is not None:
        return services.mcm.handle_get(event)
    return 0x0122, None


def build_ae(cfg: Config) -> AE:
    scp = cfg.scp
    ae = AE(ae_title=scp.ae_title.strip())
    ae.maximum_associations = scp.max_associations
    ae.maximum_pdu_size = scp.max_pdu
    ae.acse_timeout, ae.dimse_timeout = scp.acse_timeout, scp.dimse_timeout
    ae.network_timeout = scp.network_timeout
    ae.require_called_aet = False  # checked in EVT_REQUESTED, with a log line
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, UNCOMPRESSED)
    if cfg.commitment.enabled:
        ae.add_supported_context(PUSH_MODEL, UNCOMPRESSED)
        ae.add_requested_context(PUSH_MODEL, UNCOMPRESSED)  # reports on a new association
    if cfg.mcm.enabled:
        ae.add_supported_context(MCM_CLASS, UNCOMPRESSED)
    ae.add_supported_context(IAN_CLASS, UNCOMPRESSED)
    return ae


def handlers(services: Services) -> list:
    return [
        (evt.EVT_REQUESTED, handle_requested, [Policy(services.config)]),
        (evt.EVT_CONN_OPEN, handle_open),
        (evt.EVT_CONN_CLOSE, handle_close, [services]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [services]),
        (evt.EVT_N_ACTION, handle_n_action, [services]),
        (evt.EVT_N_CREATE, handle_n_create, [services]),
        (evt.EVT_N_GET, handle_n_get, [services]),
    ]


def stream_into(spool: Spool) -> None:
    """C-STORE data sets go to the spool as they arrive, PDU by PDU, instead of being
    gathered in memory (pynetdicom's STORE_RECV_CHUNKED_DATASET, network.md §1): memory per
    association stays the same whatever the size of an instance. pynetdicom writes them into
    a tempfile.NamedTemporaryFile; this process's one spool supplies that file instead (in
    its tmp/, so the finished data set is renamed into place, not copied, and a full disk is
    answered A700 rather than by an abort)."""
    from pynetdicom import _config, dimse_messages

    if not hasattr(dimse_messages, "NamedTemporaryFile"):  # pragma: no cover - a new release
        raise RuntimeError("this pynetdicom does not stream C-STORE data sets the way the "
                           "daemon expects (dimse_messages.NamedTemporaryFile)")
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = spool.incoming


def start(ae: AE, services: Services):
    """Listen (non-blocking); returns the server, whose socket gives the bound port."""
    cfg = services.config.scp
    stream_into(services.spool)
    return ae.start_server((cfg.bind, cfg.port), block=False, evt_handlers=handlers(services))
