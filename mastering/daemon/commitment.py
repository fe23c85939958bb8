"""Storage Commitment Push Model SCP (PS3.4 Annex J).

A modality deletes its local copy when we say an instance is committed, so the
N-EVENT-REPORT names as committed only instances recorded in the job store, whose spool file
exists with the size recorded (the store records an instance only after the file and its
folder were fsynced), and only if the last object this requester sent under that UID was the
one stored: a requester whose object was refused (a different object under a UID already
stored, C111; or a corrupt one) is told so, since the object it would delete is not the one
we hold. The commitment is per requester (its calling AE title) and per object. Everything
else is a failure with its reason (J.3.2.1.3): 0112 no such object instance, 0119
class/instance conflict, 0110 processing failure (that object was refused).

The N-ACTION is answered at once; the report follows from a small pool of delivery threads
(sending from the handler would deadlock pynetdicom's reactor, and from the main loop a peer
that never answers would stop the systemd watchdog's pings), on the same association while
it is open, else on a new association to the peer in ``commitment.peers`` (we propose the
SCP role, J.3.3), with a connect timeout. A transaction is kept in the store until its
report was delivered, so a crash or an unreachable peer only delays it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from .assembly import ready_for
from .store import JobStore

log = logging.getLogger("mastering.daemon.commitment")

PUSH_MODEL = "1.2.840.10008.1.20.1"
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
NO_SUCH_INSTANCE, CLASS_INSTANCE_CONFLICT, PROCESSING_FAILURE = 0x0112, 0x0119, 0x0110


def evaluate(store: JobStore, refs: list[list[str]], requester: str
             ) -> tuple[list[list[str]], list[list]]:
    """(committed refs, failed refs with reason) for [[class, instance], ...] asked by the
    calling AE title requester."""
    uids = [uid for _c, uid in refs]
    present = store.instances_present(uids)
    refused = store.refused_by(requester, uids)
    ok, failed = [], []
    for cls, uid in refs:
        rec = present.get(uid)
        if rec is None:
            failed.append([cls, uid, NO_SUCH_INSTANCE])
        elif uid in refused:  # its object under this UID is not the one we hold
            failed.append([cls, uid, PROCESSING_FAILURE])
        elif rec.sop_class != cls:
            failed.append([cls, uid, CLASS_INSTANCE_CONFLICT])
        elif not _durable(rec.path, rec.size):
            failed.append([cls, uid, PROCESSING_FAILURE])
        else:
            ok.append([cls, uid])
    return ok, failed


def _durable(path: str, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False


def report_dataset(tuid: str, ok: list[list[str]], failed: list[list]) -> tuple[Dataset, int]:
    ds = Dataset()
    ds.TransactionUID = tuid
    if ok:
        ds.ReferencedSOPSequence = Sequence([_item(c, u) for c, u in ok])
    if failed:
        items = []
        for c, u, reason in failed:
            item = _item(c, u)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = Sequence(items)
    return ds, 2 if failed else 1


def _item(cls: str, uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = cls
    item.ReferencedSOPInstanceUID = uid
    return item


class Commitments:
    """Takes N-ACTION requests and delivers their reports."""

    def __init__(self, store: JobStore, ae, peers: dict[str, tuple[str, int]],
                 report_delay: float = 0.0, connect_timeout: float = 10.0, senders: int = 4):
        self.store, self.ae, self.peers = store, ae, peers
        self.report_delay = report_delay
        ae.connection_timeout = connect_timeout  # outgoing associations only (the reports)
        self._sending: set[str] = set()  # queued or being delivered
        self._unreached: set[str] = set()  # told once in the log
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=senders, thread_name_prefix="commitment")

    def handle_action(self, event) -> tuple[int, Dataset | None]:
        """EVT_N_ACTION for the Storage Commitment Push Model SOP Class."""
        req = event.request
        calling = event.assoc.requestor.ae_title.strip()
        peer = event.assoc.requestor.address
        if req.ActionTypeID != 1 or req.RequestedSOPInstanceUID != PUSH_MODEL_INSTANCE:
            return 0x0123 if req.ActionTypeID != 1 else 0x0112, None  # no such action/instance
        try:
            ds = event.action_information
            tuid = str(ds.TransactionUID)
            refs = [[str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)]
                    for i in ds.ReferencedSOPSequence]
        except (AttributeError, KeyError, ValueError, TypeError):
            log.warning("storage commitment from %s@%s refused: no Transaction UID or "
                        "Referenced SOP Sequence", calling, peer)
            return 0x0120, None  # missing attribute
        if not self.store.add_request(tuid, "commitment", "pending", calling, peer,
                                      {"refs": refs}):  # asked again: evaluated and sent anew
            self.store.update_request(tuid, state="pending", data={"refs": refs})
            log.info("storage commitment %s from %s@%s: a repeated transaction", tuid,
                     calling, peer)
        log.info("storage commitment %s from %s@%s: %d instance(s)", tuid, calling, peer,
                 len(refs))
        # the N-ACTION response goes out first
        self.submit(tuid, event.assoc, max(self.report_delay, 0.05))
        return 0x0000, None

    def submit(self, tuid: str, assoc=None, delay: float = 0.0) -> bool:
        """Queue one pending transaction's report for a delivery thread (never blocks);
        False if it is queued or being delivered already."""
        with self._lock:
            if tuid in self._sending:
                return False
            self._sending.add(tuid)
        try:
            self._pool.submit(self._run, tuid, assoc, delay)
        except RuntimeError:  # shutting down: the report waits for the next start
            with self._lock:
                self._sending.discard(tuid)
            return False
        return True

    def _run(self, tuid: str, assoc, delay: float) -> None:
        try:
            if delay:
                time.sleep(delay)
            self._deliver(tuid, assoc)
        except Exception:  # noqa: BLE001 - the transaction stays pending: tried again later
            log.exception("storage commitment %s: delivery failed", tuid)
        finally:
            with self._lock:
                self._sending.discard(tuid)

    def deliver(self, tuid: str, assoc=None) -> bool:
        """Evaluate and send one pending transaction's report now, in the calling thread;
        True once delivered."""
        with self._lock:
            if tuid in self._sending:
                return False
            self._sending.add(tuid)
        try:
            return self._deliver(tuid, assoc)
        finally:
            with self._lock:
                self._sending.discard(tuid)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _deliver(self, tuid: str, assoc) -> bool:
        req = self.store.request(tuid)
        if req is None or req.state != "pending":
            return False
        ok, failed = evaluate(self.store, req.data["refs"], req.calling_ae)
        if not failed:  # the modality says the study is complete: burn it
            ready_for(self.store, [u for _c, u in ok], "storage commitment", req.calling_ae)
        ds, event_type = report_dataset(tuid, ok, failed)
        sent = False
        if assoc is not None and assoc.is_established:
            sent = self._send(assoc, ds, event_type, tuid, "the same association")
        if not sent:
            sent = self._send_new(req.calling_ae, ds, event_type, tuid)
        if sent:
            self.store.update_request(tuid, state="reported",
                                      data={**req.data, "committed": len(ok),
                                            "failed": [[c, u, r] for c, u, r in failed]})
            log.info("storage commitment %s reported: %d committed, %d failed", tuid, len(ok),
                     len(failed))
        return sent

    def _send(self, assoc, ds: Dataset, event_type: int, tuid: str, how: str) -> bool:
        try:
            status, _reply = assoc.send_n_event_report(ds, event_type, PUSH_MODEL,
                                                       PUSH_MODEL_INSTANCE)
        except Exception as exc:  # noqa: BLE001 - a broken association: try another way
            log.warning("storage commitment %s: report on %s failed: %s", tuid, how, exc)
            return False
        if status is None or getattr(status, "Status", 0xFFFF) != 0x0000:
            log.warning("storage commitment %s: the peer did not accept the report on %s",
                        tuid, how)
            return False
        return True

    def _send_new(self, calling_ae: str, ds: Dataset, event_type: int, tuid: str) -> bool:
        from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

        where = self.peers.get(calling_ae)
        if where is None:
            log.info("storage commitment %s: the association is gone and no address is "
                     "configured for %s (commitment.peers); the report waits", tuid, calling_ae)
            return False
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = PUSH_MODEL, False, True
        assoc = self.ae.associate(where[0], where[1], ae_title=calling_ae, ext_neg=[role])
        if not assoc.is_established:
            first = tuid not in self._unreached
            self._unreached.add(tuid)
            (log.warning if first else log.debug)(
                "storage commitment %s: no association to %s at %s:%d; the report waits and "
                "is tried again every few seconds", tuid, calling_ae, *where)
            return False
        self._unreached.discard(tuid)
        try:
            return self._send(assoc, ds, event_type, tuid, "a new association")
        finally:
            assoc.release()

    def retry_pending(self) -> int:
        """From the main loop: reports not yet delivered (after a restart, a lost peer) are
        queued for the delivery threads; returns how many."""
        n = 0
        for req in self.store.requests("commitment", ("pending",)):
            if time.time() - req.created_at > 1.0 and self.submit(req.uid):
                n += 1
        return n
