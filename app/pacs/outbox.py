"""The outbox: result objects wait here, on disk, until every destination has them.

One SQLite row per (result object, destination), in WAL mode with ``synchronous=FULL``, so a
row written is a row kept through a crash or a restart. Each destination has its own delivery
task (a PACS that is down never delays another): it takes the rows that are due, sends them
in one batch (one association for DIMSE), and records each outcome:

- stored → ``delivered`` (and one audit row, UIDs only);
- refused by the destination (a DIMSE failure status, STOW-RS 409 or a FailedSOPSequence) →
  ``failed`` at once: sending the same bytes again cannot help; :meth:`Outbox.retry_failed`
  (``python -m app.pacs.outbox retry-failed``) puts them back once the PACS side is fixed;
- anything else (connection refused, timeout, association aborted, out of resources, HTTP 5xx)
  → still ``pending``, next try after ``base_delay_s * 2**(attempts-1)``, at most
  ``max_delay_s`` (60 s) later, for as long as it takes.

Delivery is at least once, and exactly once unless an acknowledgement is lost: the row turns
``delivered`` only after the destination's success answer, so a crash between that answer and
the commit sends the object again on restart (same SOP Instance UID: PACSs keep one copy).
``(SOPInstanceUID, destination)`` is unique, so enqueuing the same object twice adds nothing.
On start, pending rows are due at once: a restart resumes delivery immediately.

One process per outbox database: two services sharing one file would both send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydicom import dcmread

from app.ops.audit import AuditEntry, AuditLog, utc_now
from app.ops.logs import new_request_id
from app.ops.sqlite import open_state_db
from app.pacs.model import Destination, ResultObject
from app.pacs.send import Sender, SendOutcome, sender_for

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id                  INTEGER PRIMARY KEY,
    study_instance_uid  TEXT    NOT NULL,
    series_instance_uid TEXT,
    sop_instance_uid    TEXT    NOT NULL,
    kind                TEXT    NOT NULL,
    path                TEXT    NOT NULL,
    model_name          TEXT,
    model_version       TEXT,
    destination         TEXT    NOT NULL,
    state               TEXT    NOT NULL DEFAULT 'pending'
                                CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL    NOT NULL,
    last_attempt_at     REAL,
    last_error          TEXT,
    enqueued_at         TEXT    NOT NULL,
    delivered_at        TEXT,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (destination, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_study ON outbox (study_instance_uid);
"""

SenderFactory = Callable[[Destination], Sender]


@dataclass(frozen=True)
class _Row:
    id: int
    study_instance_uid: str
    series_instance_uid: str | None
    sop_instance_uid: str
    kind: str
    path: str
    model_name: str | None
    model_version: str | None
    attempts: int


class Outbox:
    """Persistent delivery of result objects to ``destinations``; see the module docstring.

    The synchronous methods (:meth:`enqueue`, :meth:`deliveries`, :meth:`retry_failed`) are
    thread-safe and quick; :meth:`start`/:meth:`stop` run the delivery tasks on the event loop.
    """

    def __init__(
        self,
        db_path: Path | str,
        destinations: Sequence[Destination],
        *,
        calling_ae_title: str = "CXR_TRIAGE",
        audit: AuditLog | None = None,
        registry: CollectorRegistry | None = None,
        base_delay_s: float = 1.0,
        max_delay_s: float = 60.0,
        batch_size: int = 16,
        timeout_s: float = 30.0,
        poll_s: float = 30.0,
        sender_factory: SenderFactory | None = None,
    ) -> None:
        self.db_path = Path(db_path)
        self.destinations = list(destinations)
        self.audit = audit
        self.registry = registry
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.batch_size = batch_size
        self.poll_s = poll_s
        self._sender_factory: SenderFactory = sender_factory or (
            lambda d: sender_for(d, calling_ae_title=calling_ae_title, timeout_s=timeout_s)
        )
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._collector: _OutboxCollector | None = None

    # ------------------------------------------------------------------------ public API

    def enqueue(self, study_instance_uid: str, objects: Iterable[ResultObject]) -> int:
        """Queue each object for each destination; returns how many rows were new.

        An object already queued for a destination (same SOP Instance UID) is left alone, so
        enqueuing a result again, after a crash or a resend, never delivers it twice.
        """
        rows = []
        now_iso, now = utc_now(), time.time()
        for obj in objects:
            series, model, version = _describe(obj.path)
            for destination in self.destinations:
                rows.append(
                    (
                        study_instance_uid,
                        series,
                        obj.sop_instance_uid,
                        obj.kind,
                        str(obj.path),
                        model,
                        version,
                        destination.label,
                        now,
                        now_iso,
                    )
                )
        if not rows:
            return 0
        with self._lock:
            conn = self._connection()
            before = conn.total_changes
            with conn:
                conn.executemany(
                    "INSERT OR IGNORE INTO outbox (study_instance_uid, series_instance_uid, "
                    "sop_instance_uid, kind, path, model_name, model_version, destination, "
                    "next_attempt_at, enqueued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            added = conn.total_changes - before
        if added:
            self._wake_all()
        return added

    def deliveries(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Delivery state of a study's result objects, one dict per (object, destination):
        ``sop_instance_uid``, ``kind``, ``destination``, ``delivery``, ``attempts``."""
        with self._lock:
            cursor = self._connection().execute(
                "SELECT sop_instance_uid, kind, destination, state, attempts FROM outbox "
                "WHERE study_instance_uid = ? ORDER BY id",
                (study_instance_uid,),
            )
            rows = cursor.fetchall()
        return [
            {
                "sop_instance_uid": sop,
                "kind": kind,
                "destination": destination,
                "delivery": state,
                "attempts": attempts,
            }
            for sop, kind, destination, state, attempts in rows
        ]

    def retry_failed(self, study_instance_uid: str | None = None) -> int:
        """Put refused objects back in the queue (after the PACS side was fixed)."""
        sql = "UPDATE outbox SET state = 'pending', next_attempt_at = ? WHERE state = 'failed'"
        params: list[Any] = [time.time()]
        if study_instance_uid is not None:
            sql += " AND study_instance_uid = ?"
            params.append(study_instance_uid)
        with self._lock:
            conn = self._connection()
            with conn:
                changed = conn.execute(sql, params).rowcount
        if changed:
            self._wake_all()
        return changed

    def counts(self) -> list[tuple[str, str, int, int, str | None]]:
        """(destination, state, rows, attempts summed, earliest ``enqueued_at``) per group."""
        with self._lock:
            return (
                self._connection()
                .execute(
                    "SELECT destination, state, COUNT(*), SUM(attempts), MIN(enqueued_at) "
                    "FROM outbox GROUP BY destination, state"
                )
                .fetchall()
            )

    def backoff_s(self, attempts: int) -> float:
        """Delay before the next try after ``attempts`` failed ones (doubling, capped)."""
        return min(self.max_delay_s, self.base_delay_s * 2.0 ** max(0, attempts - 1))

    async def start(self) -> None:
        """Open the database, make pending rows due now and start one task per destination."""
        if self._tasks:
            return
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._resume)
        if self.registry is not None:
            self._collector = _OutboxCollector(self)
            self.registry.register(self._collector)
        for destination in self.destinations:
            self._wake[destination.label] = asyncio.Event()
            self._tasks.append(
                asyncio.create_task(self._run(destination), name=f"outbox {destination.label}")
            )

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the tasks (a batch in flight gets ``timeout_s`` to finish), close the database.

        A batch cut off here stays pending and is sent again on the next start.
        """
        self._stopping = True
        self._wake_all()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._tasks.clear()
        self._wake.clear()
        if self._collector is not None and self.registry is not None:
            self.registry.unregister(self._collector)
            self._collector = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ---------------------------------------------------------------------- delivery task

    async def _run(self, destination: Destination) -> None:
        sender = self._sender_factory(destination)
        wake = self._wake[destination.label]
        try:
            while not self._stopping:
                wake.clear()  # before looking, so an enqueue during the look is not missed
                try:
                    rows, next_due = await asyncio.to_thread(self._due, destination.label)
                    if rows:
                        outcomes = await asyncio.to_thread(self._send, sender, rows)
                        await asyncio.to_thread(self._record, destination, rows, outcomes)
                        continue
                except Exception:
                    logger.exception("outbox task error", extra={"destination": destination.label})
                    next_due = time.time() + self.base_delay_s
                # Idle, look again after poll_s at most: rows re-queued by another process
                # (``python -m app.pacs.outbox retry-failed``) wake no event here.
                timeout = self.poll_s
                if next_due is not None:
                    timeout = min(timeout, max(0.0, next_due - time.time()))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout)
        finally:
            await asyncio.to_thread(sender.close)

    def _due(self, destination: str) -> tuple[list[_Row], float | None]:
        with self._lock:
            conn = self._connection()
            found = conn.execute(
                "SELECT id, study_instance_uid, series_instance_uid, sop_instance_uid, kind, "
                "path, model_name, model_version, attempts FROM outbox WHERE destination = ? "
                "AND state = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at, id "
                "LIMIT ?",
                (destination, time.time(), self.batch_size),
            ).fetchall()
            if found:
                return [_Row(*row) for row in found], None
            (next_due,) = conn.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE destination = ? "
                "AND state = 'pending'",
                (destination,),
            ).fetchone()
        return [], next_due

    @staticmethod
    def _send(sender: Sender, rows: list[_Row]) -> list[SendOutcome]:
        """Send the rows whose file exists; a missing file is a permanent failure."""
        present = [row for row in rows if Path(row.path).is_file()]
        try:
            sent = sender.send([Path(row.path) for row in present]) if present else []
        except Exception as exc:  # a sender bug must cost a retry, never the row
            logger.exception("sender error", extra={"destination": str(sender.destination)})
            return [SendOutcome(False, f"sender error ({type(exc).__name__})") for _ in rows]
        by_id = {row.id: outcome for row, outcome in zip(present, sent, strict=True)}
        missing = SendOutcome(False, "result file is missing", True)
        return [by_id.get(row.id, missing) for row in rows]

    def _record(
        self, destination: Destination, rows: list[_Row], outcomes: list[SendOutcome]
    ) -> None:
        now, now_iso = time.time(), utc_now()
        updates, untried = [], []
        for row, outcome in zip(rows, outcomes, strict=True):
            if not outcome.tried:  # never sent: due again at once, on a new association
                untried.append((now, row.id))
                continue
            attempts = row.attempts + 1
            if outcome.ok:
                updates.append(("delivered", attempts, now, now, None, now_iso, row.id))
            elif outcome.permanent:
                updates.append(("failed", attempts, now, now, outcome.detail, None, row.id))
            else:
                retry_at = now + self.backoff_s(attempts)
                updates.append(("pending", attempts, retry_at, now, outcome.detail, None, row.id))
        with self._lock:
            conn = self._connection()
            with conn:
                conn.executemany(
                    "UPDATE outbox SET state = ?, attempts = ?, next_attempt_at = ?, "
                    "last_attempt_at = ?, last_error = ?, delivered_at = ? WHERE id = ?",
                    updates,
                )
                conn.executemany("UPDATE outbox SET next_attempt_at = ? WHERE id = ?", untried)
        for row, outcome in zip(rows, outcomes, strict=True):
            if outcome.tried:
                self._report(destination, row, outcome)

    def _report(self, destination: Destination, row: _Row, outcome: SendOutcome) -> None:
        """Log (UIDs only) and audit what one attempt did."""
        extra = {
            "destination": destination.label,
            "kind": row.kind,
            "study_instance_uid": row.study_instance_uid,
            "sop_instance_uid": row.sop_instance_uid,
            "attempts": row.attempts + 1,
            "detail": outcome.detail,
        }
        if outcome.ok:
            logger.info("result delivered", extra=extra)
        elif outcome.permanent:
            logger.error("result refused by destination; marked failed", extra=extra)
        else:
            extra["retry_in_s"] = round(self.backoff_s(row.attempts + 1), 3)
            logger.warning("delivery failed; will retry", extra=extra)
            return
        if self.audit is not None:
            self.audit.record(
                AuditEntry(
                    request_id=new_request_id(),
                    status=200 if outcome.ok else 502,
                    outcome="delivered" if outcome.ok else "failed",
                    problem=None if outcome.ok else outcome.detail[:200],
                    model_name=row.model_name,
                    model_version=row.model_version,
                    source=f"deliver:{row.kind}:{destination.label}",
                    study_instance_uid=row.study_instance_uid,
                    series_instance_uid=row.series_instance_uid,
                    sop_instance_uid=row.sop_instance_uid,
                )
            )

    # ---------------------------------------------------------------------------- helpers

    def _connection(self) -> sqlite3.Connection:
        """The database, opened (and created, mode 0600) on first use; call with the lock."""
        if self._conn is None:
            self._conn = open_state_db(self.db_path, _SCHEMA, SCHEMA_VERSION)
        return self._conn

    def _resume(self) -> None:
        configured = {d.label for d in self.destinations}
        with self._lock:
            conn = self._connection()
            with conn:
                conn.execute(
                    "UPDATE outbox SET next_attempt_at = ? WHERE state = 'pending'", (time.time(),)
                )
            stranded = conn.execute(
                "SELECT destination, COUNT(*) FROM outbox WHERE state = 'pending' "
                "GROUP BY destination"
            ).fetchall()
        for destination, count in stranded:
            if destination not in configured:
                logger.warning(
                    "pending results for a destination no longer configured",
                    extra={"destination": destination, "pending": count},
                )

    def _wake_all(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for event in list(self._wake.values()):
            loop.call_soon_threadsafe(event.set)


def _describe(path: Path) -> tuple[str | None, str | None, str | None]:
    """Series UID, model name and version of a result file, for the audit trail (Nones when
    it cannot be read: the send then fails visibly, the enqueue never does)."""
    try:
        ds = dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["SeriesInstanceUID", "ManufacturerModelName", "SoftwareVersions"],
        )
    except (OSError, ValueError) as exc:
        logger.error(
            "result object unreadable at enqueue",
            extra={"file": Path(path).name, "error": type(exc).__name__},
        )
        return None, None, None
    version = ds.get("SoftwareVersions")
    if version is not None and not isinstance(version, str):
        version = str(version[0]) if len(version) else None
    return ds.get("SeriesInstanceUID"), ds.get("ManufacturerModelName"), version


def _age_s(iso: str | None, now: float) -> float:
    if not iso:
        return 0.0
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return max(0.0, now - moment.timestamp())


class _OutboxCollector(Collector):
    """``/metrics`` straight from the database, so the figures survive restarts."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.outbox.counts()
        except sqlite3.Error:
            logger.exception("outbox metrics unavailable")
            return iter(())
        return iter(self._families(counts))

    def _families(
        self, counts: Sequence[tuple[str, str, int, int, str | None]] = ()
    ) -> list[Metric]:
        labels = ["destination"]
        depth = GaugeMetricFamily(
            "cxr_outbox_depth", "Result objects waiting for delivery (pending)", labels=labels
        )
        failed = GaugeMetricFamily(
            "cxr_outbox_failed",
            "Result objects a destination refused (state failed)",
            labels=labels,
        )
        delivered = CounterMetricFamily(
            "cxr_outbox_delivered", "Result objects delivered", labels=labels
        )
        failures = CounterMetricFamily(
            "cxr_outbox_delivery_failures",
            "Delivery attempts that did not store the object (retried or refused)",
            labels=labels,
        )
        oldest = GaugeMetricFamily(
            "cxr_outbox_oldest_pending_seconds",
            "Age of the longest-waiting pending result object (0 when none)",
            labels=labels,
        )
        table: dict[str, dict[str, tuple[int, int, str | None]]] = {
            d.label: {} for d in self.outbox.destinations
        }
        for destination, state, rows, attempts, first in counts:
            table.setdefault(destination, {})[state] = (rows, attempts or 0, first)
        now = time.time()
        for destination, states in table.items():
            pending = states.get("pending", (0, 0, None))
            refused = states.get("failed", (0, 0, None))
            done = states.get("delivered", (0, 0, None))
            depth.add_metric([destination], pending[0])
            failed.add_metric([destination], refused[0])
            delivered.add_metric([destination], done[0])
            failures.add_metric([destination], pending[1] + refused[1] + done[1] - done[0])
            oldest.add_metric([destination], _age_s(pending[2], now) if pending[0] else 0.0)
        return [depth, failed, delivered, failures, oldest]


# ------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app.pacs.outbox status | retry-failed``: look at or re-queue the outbox of a
    running (or stopped) service; the service picks re-queued rows up within ``poll_s``."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m app.pacs.outbox", description=main.__doc__)
    parser.add_argument("--db", type=Path, help="outbox database (default: CXR_OUTBOX_DB)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="objects per destination and state, as JSON")
    retry = sub.add_parser("retry-failed", help="put refused objects back in the queue")
    retry.add_argument("--study", metavar="UID", help="only this StudyInstanceUID")
    args = parser.parse_args(argv)
    db = args.db
    if db is None:
        from app.settings import Settings

        db = Settings().outbox_db
    if not Path(db).is_file():
        print(f"no outbox database at {db}", file=sys.stderr)
        return 1
    outbox = Outbox(db, [])
    try:
        if args.command == "status":
            rows = [
                {"destination": d, "state": s, "objects": n, "attempts": a, "oldest": o}
                for d, s, n, a, o in outbox.counts()
            ]
            print(json.dumps(rows, indent=2))
        else:
            print(f"re-queued {outbox.retry_failed(args.study)} object(s)")
    finally:
        asyncio.run(outbox.stop())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
