"""Study assembly: received instances grouped by StudyInstanceUID, scored once the study is stable.

State lives in SQLite (``studies.sqlite`` beside the outbox), so a restart loses nothing: an
instance stored but not yet scored is scored after the restart, and a result written but not yet
handed to the outbox is handed over then.

Timeline of a study: each stored instance sets ``due = now + CXR_STUDY_STABLE_S``; one asyncio
task sleeps until the earliest ``due`` (or until woken by a receipt) and scores every study whose
``due`` has passed. A late instance re-opens a scored study; the next result supersedes the
earlier result objects. A resend of an instance already scored with the same pixels and model
version is a ``duplicate``: counted, audited, and nothing else (no re-triage, no second result).
Our own SR/SC coming back (a PACS that routes whole studies) are recognised by their SOP
Instance UIDs and ignored, so a route cannot loop.

Nothing here stores a patient field: rows hold UIDs, file paths, hashes and model output only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from app.api.schemas import Finding, Triage
from app.ops.audit import AuditEntry, AuditLog, utc_now
from app.ops.logs import new_request_id
from app.ops.sqlite import open_state_db
from app.pacs.model import (
    Explained,
    InstanceOutcome,
    InstanceStatus,
    Priority,
    ResultObject,
    StudyResult,
)
from app.pacs.store import (
    PROCESSING_FAILURE,
    InstanceStore,
    ParsedInstance,
    StoreRefused,
    parse_instance,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    state              TEXT NOT NULL,            -- receiving | scored | failed
    due                REAL,                     -- unix time to score; NULL when nothing pending
    last_received      REAL NOT NULL,            -- unix time of the latest stored instance
    generation         INTEGER NOT NULL DEFAULT 0,  -- bumped by every stored instance
    revision           INTEGER NOT NULL DEFAULT 0,  -- results written so far
    attempts           INTEGER NOT NULL DEFAULT 0,  -- failed scoring attempts in a row
    priority           TEXT,
    model_name         TEXT,
    model_version      TEXT,
    findings           TEXT,                     -- JSON list of Finding
    triage             TEXT,                     -- JSON Triage
    scored_inputs      TEXT,                     -- JSON [[sop, decoded hash], ...] of the revision
    enqueue_pending    INTEGER,                  -- revision written but not yet in the outbox
    first_received     TEXT NOT NULL,
    updated            TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_due ON studies (due);
CREATE TABLE IF NOT EXISTS instances (
    study_instance_uid  TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    path                TEXT NOT NULL,
    pixel_hash          TEXT NOT NULL,
    status              TEXT NOT NULL,
    reason              TEXT,
    model_version       TEXT,
    duplicates          INTEGER NOT NULL DEFAULT 0,
    received            TEXT NOT NULL,
    PRIMARY KEY (study_instance_uid, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS results (
    sop_instance_uid   TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    revision           INTEGER NOT NULL,
    kind               TEXT NOT NULL,
    path               TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_study ON results (study_instance_uid);
"""

# Instance states that mean "triage has seen this exact file with this model".
_FINAL = (InstanceStatus.SCORED, InstanceStatus.INELIGIBLE, InstanceStatus.UNDECODABLE)
MAX_ATTEMPTS = 5
_RETRY_CAP_S = 60.0
# The scheduler also looks every POLL_S, so a study re-queued from another process
# (``python -m app.pacs.studies retry-failed``) is picked up without a restart.
POLL_S = 30.0


class ScoringDeferred(Exception):
    """The model cannot take the study now (queue full, shutting down): try again later."""


@dataclass(frozen=True)
class Scored:
    """What the scorer made of a study's instances (see :mod:`app.pacs.triage`)."""

    instances: list[InstanceOutcome]
    findings: list[Finding]
    triage: Triage
    priority: Priority
    explained: Explained | None
    model_name: str
    model_version: str
    # SOP Instance UID -> SHA-256 of the decoded image, for each scored instance: the same
    # pixels resent in another (lossless) transfer syntax hash the same here.
    decoded_hashes: dict[str, str] = dataclasses.field(default_factory=dict)


class Scorer(Protocol):
    model_name: str
    model_version: str

    async def score(self, instances: list[InstanceOutcome]) -> Scored: ...


class ResultSink(Protocol):
    """Where results go: pacs-out's writer and outbox (see :mod:`app.pacs.service`)."""

    async def write(self, result: StudyResult) -> list[ResultObject]: ...

    async def enqueue(self, study_uid: str, objects: list[ResultObject]) -> None: ...

    async def deliveries(self, study_uid: str) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Receipt:
    """The answer to one received instance: DIMSE status 0x0000 or a failure with a reason."""

    outcome: str  # stored | duplicate | own-result | refused
    status: int
    reason: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 0


# --------------------------------------------------------------------------------- the database


class StudyDB:
    """The SQLite state; thread-safe (one connection behind a lock, WAL, synchronous=FULL)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()

    def open(self) -> None:
        self._conn = open_state_db(self.path, _SCHEMA, SCHEMA_VERSION, rows=True)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextlib.contextmanager
    def _tx(self) -> Any:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise RuntimeError("study database is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("study database is closed")
            return list(self._conn.execute(sql, params))

    # -- receiving -----------------------------------------------------------------------------

    def is_own_result(self, sop_uid: str) -> bool:
        return bool(self._read("SELECT 1 FROM results WHERE sop_instance_uid = ?", (sop_uid,)))

    def existing(self, study_uid: str, sop_uid: str) -> sqlite3.Row | None:
        rows = self._read(
            "SELECT * FROM instances WHERE study_instance_uid = ? AND sop_instance_uid = ?",
            (study_uid, sop_uid),
        )
        return rows[0] if rows else None

    def count_duplicate(self, study_uid: str, sop_uid: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE instances SET duplicates = duplicates + 1 "
                "WHERE study_instance_uid = ? AND sop_instance_uid = ?",
                (study_uid, sop_uid),
            )

    def record_instance(self, parsed: ParsedInstance, path: Path, stable_s: float) -> None:
        """The instance is on disk: (re)open its study, due for scoring ``stable_s`` from now."""
        now = utc_now()
        received = time.time()
        study = parsed.study_instance_uid
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO instances (study_instance_uid, sop_instance_uid, "
                "series_instance_uid, sop_class_uid, path, pixel_hash, status, received) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (study_instance_uid, sop_instance_uid) DO UPDATE SET "
                "series_instance_uid = excluded.series_instance_uid, "
                "sop_class_uid = excluded.sop_class_uid, path = excluded.path, "
                "duplicates = CASE WHEN instances.pixel_hash = excluded.pixel_hash "
                "THEN instances.duplicates ELSE 0 END, "
                "pixel_hash = excluded.pixel_hash, status = excluded.status, reason = NULL, "
                "model_version = NULL, received = excluded.received",
                (
                    study,
                    parsed.sop_instance_uid,
                    parsed.series_instance_uid,
                    parsed.sop_class_uid,
                    str(path),
                    parsed.pixel_hash,
                    InstanceStatus.RECEIVED.value,
                    now,
                ),
            )
            conn.execute(
                "INSERT INTO studies (study_instance_uid, state, due, last_received, generation, "
                "first_received, updated) VALUES (?, 'receiving', ?, ?, 1, ?, ?) "
                "ON CONFLICT (study_instance_uid) DO UPDATE SET state = 'receiving', "
                "due = excluded.due, last_received = excluded.last_received, "
                "generation = generation + 1, attempts = 0, updated = excluded.updated",
                (study, received + stable_s, received, now, now),
            )

    # -- scheduling ----------------------------------------------------------------------------

    def reschedule(self, stable_s: float) -> int:
        """At start-up: every waiting study is due ``stable_s`` after its last instance (the
        setting may have changed; retry back-offs of the previous run start afresh)."""
        with self._tx() as conn:
            return conn.execute(
                "UPDATE studies SET due = last_received + ? WHERE due IS NOT NULL", (stable_s,)
            ).rowcount

    def due(self, now: float, exclude: set[str]) -> tuple[list[str], float | None, int]:
        """Studies due by ``now`` (not in ``exclude``), the next due time after those, and how
        many studies wait in all."""
        rows = self._read(
            "SELECT study_instance_uid, due FROM studies WHERE due IS NOT NULL ORDER BY due"
        )
        ready = [r[0] for r in rows if r[1] <= now and r[0] not in exclude]
        later = [r[1] for r in rows if r[1] > now and r[0] not in exclude]
        return ready, (later[0] if later else None), len(rows)

    def snapshot(self, study_uid: str) -> tuple[sqlite3.Row, list[InstanceOutcome]] | None:
        rows = self._read("SELECT * FROM studies WHERE study_instance_uid = ?", (study_uid,))
        if not rows:
            return None
        instances = [
            _outcome(r)
            for r in self._read(
                "SELECT * FROM instances WHERE study_instance_uid = ? ORDER BY received, "
                "sop_instance_uid",
                (study_uid,),
            )
        ]
        return rows[0], instances

    def result_uids(self, study_uid: str, revision: int | None = None) -> list[str]:
        if revision is None:
            rows = self._read(
                "SELECT sop_instance_uid FROM results WHERE study_instance_uid = ? "
                "ORDER BY revision, kind",
                (study_uid,),
            )
        else:
            rows = self._read(
                "SELECT sop_instance_uid FROM results WHERE study_instance_uid = ? "
                "AND revision = ? ORDER BY kind",
                (study_uid, revision),
            )
        return [r[0] for r in rows]

    def result_objects(self, study_uid: str, revision: int) -> list[ResultObject]:
        rows = self._read(
            "SELECT kind, sop_instance_uid, path FROM results WHERE study_instance_uid = ? "
            "AND revision = ? ORDER BY kind",
            (study_uid, revision),
        )
        return [ResultObject(r["kind"], r["sop_instance_uid"], Path(r["path"])) for r in rows]

    def defer(self, study_uid: str, generation: int, delay_s: float) -> None:
        """The model could not take the study now: try again in ``delay_s`` (unless a newer
        instance already rescheduled it). Not a failure: the study keeps its state."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE studies SET due = ?, updated = ? "
                "WHERE study_instance_uid = ? AND generation = ?",
                (time.time() + delay_s, utc_now(), study_uid, generation),
            )

    def record_failure(self, study_uid: str, generation: int, scored: Scored | None = None) -> int:
        """Scoring or writing the result failed: state ``failed``, instance statuses kept when
        known, retried with back-off until :data:`MAX_ATTEMPTS` failures in a row."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT generation, attempts FROM studies WHERE study_instance_uid = ?",
                (study_uid,),
            ).fetchone()
            if row is None or row["generation"] != generation:
                return 0  # a newer instance re-opened the study: its own run comes next
            if scored is not None:
                _update_instances(conn, study_uid, scored)
            attempts = row["attempts"] + 1
            due = (
                None if attempts >= MAX_ATTEMPTS else time.time() + min(_RETRY_CAP_S, 2.0**attempts)
            )
            conn.execute(
                "UPDATE studies SET state = 'failed', due = ?, attempts = ?, updated = ? "
                "WHERE study_instance_uid = ?",
                (due, attempts, utc_now(), study_uid),
            )
            return attempts

    def commit(
        self,
        study_uid: str,
        generation: int,
        scored: Scored,
        inputs: list[list[str]],
        revision: int | None,
        objects: list[ResultObject],
    ) -> None:
        """Record a scoring run: instance statuses, and (``revision`` set) the new result."""
        now = utc_now()
        with self._tx() as conn:
            _update_instances(conn, study_uid, scored)
            if revision is not None:
                conn.executemany(
                    "INSERT INTO results (sop_instance_uid, study_instance_uid, revision, kind, "
                    "path) VALUES (?, ?, ?, ?, ?)",
                    [
                        (o.sop_instance_uid, study_uid, revision, o.kind, str(o.path))
                        for o in objects
                    ],
                )
                conn.execute(
                    "UPDATE studies SET revision = ?, priority = ?, model_name = ?, "
                    "model_version = ?, findings = ?, triage = ?, scored_inputs = ?, "
                    "enqueue_pending = ? WHERE study_instance_uid = ?",
                    (
                        revision,
                        scored.priority.value,
                        scored.model_name,
                        scored.model_version,
                        json.dumps([f.model_dump() for f in scored.findings]),
                        scored.triage.model_dump_json(),
                        json.dumps(inputs),
                        revision if objects else None,
                        study_uid,
                    ),
                )
            conn.execute(
                "UPDATE studies SET state = CASE WHEN generation = ? THEN 'scored' ELSE state END, "
                "due = CASE WHEN generation = ? THEN NULL ELSE due END, attempts = 0, "
                "updated = ? WHERE study_instance_uid = ?",
                (generation, generation, now, study_uid),
            )

    def enqueued(self, study_uid: str, revision: int) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE studies SET enqueue_pending = NULL "
                "WHERE study_instance_uid = ? AND enqueue_pending = ?",
                (study_uid, revision),
            )

    def counts(self) -> dict[str, int]:
        """Studies per state."""
        rows = self._read("SELECT state, count(*) FROM studies GROUP BY state")
        return {r[0]: int(r[1]) for r in rows}

    def failed(self) -> list[dict[str, Any]]:
        """The studies scoring gave up on or is retrying (UIDs and times only)."""
        rows = self._read(
            "SELECT study_instance_uid, attempts, due, updated FROM studies "
            "WHERE state = 'failed' ORDER BY updated"
        )
        return [dict(r) for r in rows]

    def retry_failed(self, study_uid: str | None = None) -> int:
        """Failed studies due now with a fresh attempt count; returns how many."""
        sql = (
            "UPDATE studies SET state = 'receiving', due = ?, attempts = 0, updated = ? "
            "WHERE state = 'failed'"
        )
        params: list[Any] = [time.time(), utc_now()]
        if study_uid is not None:
            sql += " AND study_instance_uid = ?"
            params.append(study_uid)
        with self._tx() as conn:
            return conn.execute(sql, params).rowcount

    def pending_enqueues(self) -> list[tuple[str, int]]:
        rows = self._read(
            "SELECT study_instance_uid, enqueue_pending FROM studies "
            "WHERE enqueue_pending IS NOT NULL"
        )
        return [(r[0], int(r[1])) for r in rows]

    # -- reading -------------------------------------------------------------------------------

    def study(self, study_uid: str) -> dict[str, Any] | None:
        """The study's row and instances as plain data (for ``GET /v1/studies``), read under one
        lock hold so a commit cannot land between the row and its instances."""
        with self._lock:
            rows = self._read("SELECT * FROM studies WHERE study_instance_uid = ?", (study_uid,))
            if not rows:
                return None
            instances = self._read(
                "SELECT sop_instance_uid, status, reason, duplicates, model_version "
                "FROM instances WHERE study_instance_uid = ? ORDER BY received, sop_instance_uid",
                (study_uid,),
            )
            latest = self.result_uids(study_uid, rows[0]["revision"])
        return {
            "study": dict(rows[0]),
            "instances": [dict(r) for r in instances],
            "latest_results": latest,
        }


def _update_instances(conn: sqlite3.Connection, study_uid: str, scored: Scored) -> None:
    """Each instance's status, where its row still holds the file that was scored."""
    conn.executemany(
        "UPDATE instances SET status = ?, reason = ?, model_version = ? "
        "WHERE study_instance_uid = ? AND sop_instance_uid = ? AND pixel_hash = ? AND path = ?",
        [
            (
                inst.status.value,
                inst.reason,
                scored.model_version,
                study_uid,
                inst.sop_instance_uid,
                inst.pixel_hash,
                str(inst.path),
            )
            for inst in scored.instances
        ],
    )


def _where(exc: BaseException) -> str:
    """Exception type and innermost frame: enough to find a bug, and never the message, which
    may quote a header value (a malformed birth date is a patient field)."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{place}"


def _outcome(row: sqlite3.Row) -> InstanceOutcome:
    return InstanceOutcome(
        sop_instance_uid=row["sop_instance_uid"],
        series_instance_uid=row["series_instance_uid"],
        sop_class_uid=row["sop_class_uid"],
        path=Path(row["path"]),
        status=InstanceStatus(row["status"]),
        reason=row["reason"],
        pixel_hash=row["pixel_hash"],
    )


# --------------------------------------------------------------------------------- the assembler


class StudyAssembler:
    """Receives instances (any thread), and scores stable studies (one asyncio task)."""

    def __init__(
        self,
        db: StudyDB,
        store: InstanceStore,
        scorer: Scorer,
        sink: ResultSink | None,
        *,
        stable_s: float,
        audit: AuditLog | None = None,
        on_receipt: Callable[[str, Receipt], None] | None = None,
        on_scored: Callable[[StudyResult | None, float], None] | None = None,
        on_pending: Callable[[int], None] | None = None,
        concurrency: int = 2,
    ) -> None:
        self.db = db
        self.store = store
        self.scorer = scorer
        self.sink = sink
        self.stable_s = stable_s
        self.audit = audit
        self._on_receipt = on_receipt
        self._on_scored = on_scored
        self._on_pending = on_pending
        self._receive_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[str] = set()
        self._jobs: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._deferrals: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the state, hand over results a crash left unqueued, then start scheduling."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await asyncio.to_thread(self.store.open)
        await asyncio.to_thread(self.db.open)
        resumed = await asyncio.to_thread(self.db.reschedule, self.stable_s)
        if resumed:
            logger.info("resuming studies received before the restart", extra={"studies": resumed})
        for study_uid, revision in await asyncio.to_thread(self.db.pending_enqueues):
            await self._enqueue(study_uid, revision, resumed=True)
        self._task = asyncio.create_task(self._run(), name="cxr-study-assembler")

    async def stop(self) -> None:
        """Stop scheduling; scoring in progress is abandoned (it reruns after a restart)."""
        for task in [self._task, *self._jobs]:
            if task is not None:
                task.cancel()
        for task in [self._task, *self._jobs]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = None
        self._jobs.clear()
        self._inflight.clear()
        await asyncio.to_thread(self.db.close)

    def wake(self) -> None:
        """Re-evaluate the schedule soon; safe from any thread."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wake.set)

    # -- receiving (any thread; blocking I/O) --------------------------------------------------

    def receive(
        self,
        data: bytes,
        *,
        source: str,
        request_id: str | None = None,
        expected_study: str | None = None,
    ) -> Receipt:
        """Store one Part 10 instance durably and schedule its study; never raises on bad input.

        ``status`` 0x0000 is returned only once the file and its row are on disk.
        """
        started = time.perf_counter()
        try:
            parsed = parse_instance(data)
        except StoreRefused as exc:
            receipt = Receipt("refused", exc.status, exc.reason)
            self._note(source, request_id, receipt, started)
            return receipt
        ids = {
            "sop_class_uid": parsed.sop_class_uid,
            "sop_instance_uid": parsed.sop_instance_uid,
            "study_instance_uid": parsed.study_instance_uid,
        }
        if expected_study is not None and parsed.study_instance_uid != expected_study:
            receipt = Receipt(
                "refused",
                0xA900,
                "StudyInstanceUID differs from the study in the request URL",
                **ids,
            )
            self._note(source, request_id, receipt, started, parsed)
            return receipt
        try:
            with self._receive_lock:
                receipt = self._receive_locked(parsed, ids)
        except StoreRefused as exc:
            receipt = Receipt("refused", exc.status, exc.reason, **ids)
        except sqlite3.Error as exc:
            logger.error("study state not written: %s", exc)
            receipt = Receipt("refused", 0xA700, "the study state could not be written", **ids)
        except Exception as exc:
            # A bug must cost this one instance a failure status (the sender retries), never the
            # association or the service.
            logger.error("receiving an instance failed: %s", _where(exc))
            receipt = Receipt("refused", PROCESSING_FAILURE, "processing failure", **ids)
        self._note(source, request_id, receipt, started, parsed)
        if receipt.outcome == "stored":
            self.wake()
        return receipt

    def _receive_locked(self, parsed: ParsedInstance, ids: dict[str, str]) -> Receipt:
        if self.db.is_own_result(parsed.sop_instance_uid):
            return Receipt("own-result", 0, "a result object of this service", **ids)
        known = self.db.existing(parsed.study_instance_uid, parsed.sop_instance_uid)
        if (
            known is not None
            and known["pixel_hash"] == parsed.pixel_hash
            and known["status"] in {s.value for s in _FINAL}
            and known["model_version"] == self.scorer.model_version
        ):
            self.db.count_duplicate(parsed.study_instance_uid, parsed.sop_instance_uid)
            return Receipt(
                "duplicate",
                0,
                f"already triaged by model {self.scorer.model_version} (same pixels)",
                **ids,
            )
        path = self.store.write(parsed)
        self.db.record_instance(parsed, path, self.stable_s)
        return Receipt("stored", 0, None, **ids)

    def _note(
        self,
        source: str,
        request_id: str | None,
        receipt: Receipt,
        started: float,
        parsed: ParsedInstance | None = None,
    ) -> None:
        if receipt.ok:
            logger.info(
                "instance %s",
                receipt.outcome,
                extra={"source": source, "sop_instance_uid": receipt.sop_instance_uid},
            )
        else:
            logger.warning(
                "instance refused: %s",
                receipt.reason,
                extra={"source": source, "status": f"0x{receipt.status:04X}"},
            )
        if self.audit is not None:
            self.audit.record(
                AuditEntry(
                    request_id=request_id or new_request_id(),
                    status=200 if receipt.ok else 409,
                    outcome=receipt.outcome,
                    problem=None if receipt.outcome == "stored" else _slug(receipt),
                    source=source,
                    study_instance_uid=receipt.study_instance_uid,
                    series_instance_uid=parsed.series_instance_uid if parsed else None,
                    sop_instance_uid=receipt.sop_instance_uid,
                    duration_ms=round(1000.0 * (time.perf_counter() - started), 3),
                )
            )
        if self._on_receipt is not None:
            self._on_receipt(source, receipt)

    # -- scheduling (the event loop) -----------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                ready, next_due, waiting = await asyncio.to_thread(
                    self.db.due, time.time(), set(self._inflight)
                )
            except (sqlite3.Error, RuntimeError) as exc:
                logger.error("study schedule unreadable: %s", exc)
                ready, next_due, waiting = [], time.time() + 1.0, 0
            if self._on_pending is not None:
                self._on_pending(waiting)
            for study_uid in ready:
                self._inflight.add(study_uid)
                job = asyncio.create_task(self._score_job(study_uid), name="cxr-study-score")
                self._jobs.add(job)
                job.add_done_callback(self._job_done(study_uid))
            timeout = POLL_S if next_due is None else min(POLL_S, max(0.0, next_due - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _job_done(self, study_uid: str) -> Callable[[asyncio.Task[None]], None]:
        def done(job: asyncio.Task[None]) -> None:
            self._jobs.discard(job)
            self._inflight.discard(study_uid)
            if self._wake is not None:
                self._wake.set()

        return done

    async def _score_job(self, study_uid: str) -> None:
        async with self._slots:
            try:
                await self._score(study_uid)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._failed(study_uid, exc)

    async def _failed(
        self,
        study_uid: str,
        exc: BaseException,
        scored: Scored | None = None,
        generation: int | None = None,
    ) -> None:
        if generation is None:
            snap = await asyncio.to_thread(self.db.snapshot, study_uid)
            if snap is None:
                return
            generation = snap[0]["generation"]
        attempts = await asyncio.to_thread(self.db.record_failure, study_uid, generation, scored)
        if attempts >= MAX_ATTEMPTS:
            logger.error("gave up on a study after %d attempts: %s", attempts, _where(exc))
        else:
            logger.error("scoring a study failed (attempt %d, retried): %s", attempts, _where(exc))

    async def _score(self, study_uid: str) -> None:
        started = time.perf_counter()
        snap = await asyncio.to_thread(self.db.snapshot, study_uid)
        if snap is None:
            return
        row, instances = snap
        generation = row["generation"]
        try:
            scored = await self.scorer.score(instances)
        except ScoringDeferred as exc:
            self._deferrals[study_uid] = deferrals = self._deferrals.get(study_uid, 0) + 1
            delay = min(_RETRY_CAP_S, 0.5 * 2.0 ** min(deferrals, 7))
            logger.info("study scoring deferred %.1fs: %s", delay, exc)
            await asyncio.to_thread(self.db.defer, study_uid, generation, delay)
            return
        self._deferrals.pop(study_uid, None)
        inputs = sorted(
            [i.sop_instance_uid, scored.decoded_hashes.get(i.sop_instance_uid, i.pixel_hash)]
            for i in scored.instances
            if i.status is InstanceStatus.SCORED
        )
        previous_inputs = json.loads(row["scored_inputs"]) if row["scored_inputs"] else None
        unchanged = (
            row["revision"] > 0
            and previous_inputs == inputs
            and row["model_version"] == scored.model_version
        )
        current = await asyncio.to_thread(self.db.snapshot, study_uid)
        if current is not None and current[0]["generation"] != generation:
            return  # a newer instance arrived while scoring: its own run comes next
        if unchanged:
            # Late instances that change nothing scored (a lateral, the same image resent in
            # another lossless transfer syntax) are listed, but the result stands: no new SR/SC.
            await asyncio.to_thread(self.db.commit, study_uid, generation, scored, inputs, None, [])
            self._scored(None, started)
            return
        revision = row["revision"] + 1
        previous = Priority(row["priority"]) if row["priority"] else Priority.ROUTINE
        priority = max(previous, scored.priority, key=lambda p: p.rank)
        scored = dataclasses.replace(scored, priority=priority)
        result = StudyResult(
            study_instance_uid=study_uid,
            model_name=scored.model_name,
            model_version=scored.model_version,
            findings=scored.findings,
            triage=scored.triage,
            priority=priority.value,
            instances=scored.instances,
            explained=scored.explained,
            supersedes=await asyncio.to_thread(self.db.result_uids, study_uid),
            revision=revision,
        )
        try:
            objects = await self.sink.write(result) if self.sink is not None else []
        except Exception as exc:
            await self._failed(study_uid, exc, scored, generation)
            return
        await asyncio.to_thread(
            self.db.commit, study_uid, generation, scored, inputs, revision, objects
        )
        self._audit_scored(result)
        self._scored(result, started)
        if objects:
            await self._enqueue(study_uid, revision)

    async def _enqueue(self, study_uid: str, revision: int, *, resumed: bool = False) -> None:
        """Hand a written revision to the outbox once (skipping objects it already holds)."""
        if self.sink is None:
            return
        objects = await asyncio.to_thread(self.db.result_objects, study_uid, revision)
        if resumed:
            held = {d["sop_instance_uid"] for d in await self.sink.deliveries(study_uid)}
            objects = [o for o in objects if o.sop_instance_uid not in held]
        if objects:
            await self.sink.enqueue(study_uid, objects)
        await asyncio.to_thread(self.db.enqueued, study_uid, revision)

    def _scored(self, result: StudyResult | None, started: float) -> None:
        if self._on_scored is not None:
            self._on_scored(result, time.perf_counter() - started)

    def _audit_scored(self, result: StudyResult) -> None:
        if self.audit is None:
            return
        entry = AuditEntry(
            request_id=new_request_id(),
            status=200,
            outcome="scored",
            source="study",
            study_instance_uid=result.study_instance_uid,
        )
        entry.note_model(result.model_name, result.model_version)
        entry.note_findings(
            result.triage.screening_positive,
            result.triage.diagnosis_positive,
            result.triage.abnormal,
        )
        self.audit.record(entry)

    # -- reading -------------------------------------------------------------------------------

    async def study(self, study_uid: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.db.study, study_uid)


def _slug(receipt: Receipt) -> str:
    if receipt.outcome in ("duplicate", "own-result"):
        return receipt.outcome
    return f"dimse-status-{receipt.status:04x}"


def main(argv: list[str] | None = None) -> int:
    """``python -m app.pacs.studies status | retry-failed``: the study state of a running (or
    stopped) service; a running service picks re-queued studies up within ``POLL_S``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m app.pacs.studies", description=main.__doc__)
    parser.add_argument("--db", type=Path, help="study database (default: beside CXR_OUTBOX_DB)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="studies per state and the failed ones, as JSON")
    retry = sub.add_parser("retry-failed", help="score failed studies again")
    retry.add_argument("--study", metavar="UID", help="only this StudyInstanceUID")
    args = parser.parse_args(argv)
    db_path = args.db
    if db_path is None:
        from app.settings import Settings

        db_path = Settings().studies_db
    if not Path(db_path).is_file():
        print(f"no study database at {db_path}", file=sys.stderr)
        return 1
    db = StudyDB(db_path)
    db.open()
    try:
        if args.command == "status":
            print(json.dumps({"studies": db.counts(), "failed": db.failed()}, indent=2))
        else:
            print(f"re-queued {db.retry_failed(args.study)} study(ies)")
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
