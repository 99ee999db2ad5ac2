"""The audit trail: one SQLite row per ``POST /predict``, and the ``cxr-triage audit`` reader.

A hospital has to be able to answer "was this study triaged, by which model, with what result,
and when?" months later, and "which studies did we fail to triage yesterday?" so they can be
sent again. So every prediction request gets a row, failures included (status 4xx/5xx with the
problem type), holding only what answers those questions: the request id, the DICOM study,
series and SOP instance UIDs, the model name and version, the positive findings, the HTTP
status and the timing. Never pixels, never a patient name or id.

Writing must never stall the event loop or a request: :meth:`AuditLog.record` puts the row on
a queue, one writer thread inserts queued rows in batches (one transaction, one fsync each) into a
WAL-mode database, and :meth:`AuditLog.close` at shutdown writes whatever is still queued.
``CXR_AUDIT_DB`` empty disables it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import queue
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.ops.logs import current_request_id, new_request_id
from app.ops.sqlite import open_state_db

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id                  INTEGER PRIMARY KEY,
    time                TEXT    NOT NULL,
    request_id          TEXT    NOT NULL,
    status              INTEGER,
    outcome             TEXT    NOT NULL,
    problem             TEXT,
    model_name          TEXT,
    model_version       TEXT,
    source              TEXT,
    study_instance_uid  TEXT,
    series_instance_uid TEXT,
    sop_instance_uid    TEXT,
    screening_positive  TEXT,
    diagnosis_positive  TEXT,
    abnormal            INTEGER,
    duration_ms         REAL
);
CREATE INDEX IF NOT EXISTS predictions_time ON predictions (time);
CREATE INDEX IF NOT EXISTS predictions_sop ON predictions (sop_instance_uid);
CREATE INDEX IF NOT EXISTS predictions_study ON predictions (study_instance_uid);
"""


def utc_now() -> str:
    """Now as ISO 8601 UTC with milliseconds: fixed width, so text order is time order."""
    return _iso(datetime.now(timezone.utc))


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(kw_only=True)
class AuditEntry:
    """One prediction request. The middleware fills status and timing, the route the rest."""

    time: str = field(default_factory=utc_now)
    request_id: str
    status: int | None = None
    outcome: str = "unknown"
    problem: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    source: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    screening_positive: list[str] | None = None
    diagnosis_positive: list[str] | None = None
    abnormal: bool | None = None
    duration_ms: float | None = None

    def note_image(self, source: str, dicom: Any = None) -> None:
        """What was decoded: its format and, for DICOM, its instance UIDs (nothing else)."""
        self.source = source
        if dicom is not None:
            self.study_instance_uid = getattr(dicom, "study_instance_uid", None)
            self.series_instance_uid = getattr(dicom, "series_instance_uid", None)
            self.sop_instance_uid = getattr(dicom, "sop_instance_uid", None)

    def note_model(self, name: str, version: str) -> None:
        self.model_name = name
        self.model_version = version

    def note_findings(
        self, screening_positive: Iterable[str], diagnosis_positive: Iterable[str], abnormal: bool
    ) -> None:
        self.screening_positive = list(screening_positive)
        self.diagnosis_positive = list(diagnosis_positive)
        self.abnormal = bool(abnormal)

    def row(self) -> tuple[Any, ...]:
        values = asdict(self)
        for name in ("screening_positive", "diagnosis_positive"):
            if values[name] is not None:
                values[name] = json.dumps(values[name])
        if values["abnormal"] is not None:
            values["abnormal"] = int(values["abnormal"])
        return tuple(values[name] for name in COLUMNS)


COLUMNS = tuple(f.name for f in fields(AuditEntry))


def outcome_for(status: int | None) -> str:
    """A word for a status that reads well in a report: ok, rejected, overloaded, timeout, error."""
    if status is None:
        return "cancelled"
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "unauthorized"
    if status == 503:
        return "overloaded"
    if status == 504:
        return "timeout"
    return "rejected" if status < 500 else "error"


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


class AuditLog:
    """Non-blocking, batched SQLite audit writer. ``AuditLog(None)`` records nothing.

    ``start``/``close`` pair with an app's lifespan and may repeat (tests run several lifespans
    on one app); entries recorded while closed are dropped and counted.
    """

    def __init__(
        self,
        path: Path | str | None,
        *,
        batch_size: int = 256,
        max_pending: int = 100_000,
        retry_delay_s: float = 0.5,
    ) -> None:
        self.path = Path(path) if path not in (None, "") else None
        self.batch_size = batch_size
        self.retry_delay_s = retry_delay_s
        self.dropped = 0
        self.written = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def start(self) -> None:
        """Open (or create) the database and start the writer; errors here stop start-up."""
        if not self.enabled or (self._thread is not None and self._thread.is_alive()):
            return
        assert self.path is not None
        self._conn = open_state_db(self.path, _SCHEMA, SCHEMA_VERSION)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        logger.info("audit trail open", extra={"audit_db": str(self.path)})

    def record(self, entry: AuditEntry) -> None:
        """Queue ``entry`` for writing; never blocks (a full queue drops it, loudly)."""
        if not self.enabled:
            return
        if self._closed:
            self._drop("audit log already closed")
            return
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._drop("audit queue full: the database is not keeping up")

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until every entry recorded so far is committed (for tests and shutdown)."""
        if not self.enabled or self._thread is None or not self._thread.is_alive():
            return self._queue.empty()
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Write everything still queued, then stop the writer and close the database."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("audit writer did not finish in time", extra={"timeout_s": timeout})
            return
        self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        logger.info("audit trail closed", extra={"written": self.written, "dropped": self.dropped})

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        logger.error(reason, extra={"dropped": self.dropped})

    def _run(self) -> None:
        assert self._conn is not None
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            entries = [item for item in batch if isinstance(item, AuditEntry)]
            if entries:
                self._write(entries)
            for item in batch:
                if isinstance(item, _Flush):
                    item.done.set()
                elif item is _STOP:
                    stop = True

    def _write(self, entries: list[AuditEntry]) -> None:
        assert self._conn is not None
        sql = (
            f"INSERT INTO predictions ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in COLUMNS)})"
        )
        rows = [entry.row() for entry in entries]
        for attempt in range(3):
            try:
                with self._conn:
                    self._conn.execute("BEGIN")
                    self._conn.executemany(sql, rows)
                self.written += len(rows)
                return
            except sqlite3.Error as exc:
                logger.error(
                    "audit write failed",
                    extra={"error": str(exc), "rows": len(rows), "attempt": attempt},
                )
                time.sleep(self.retry_delay_s * (attempt + 1))
        self.dropped += len(rows)


class AuditMiddleware:
    """Record one :class:`AuditEntry` per request to the audited routes, whatever its fate.

    Pure ASGI and outside the limits, so a 401, 413, 503 or 504 that never reached the route
    still leaves a row with its status and problem type. The route adds what it learns through
    ``request.state.audit`` (see :func:`entry_for`).
    """

    def __init__(self, app: ASGIApp, audit: AuditLog, paths: Sequence[str] = ("/predict",)) -> None:
        self.app = app
        self.audit = audit
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in self.paths
            or not self.audit.enabled
        ):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        request_id = state.get("request_id") or current_request_id() or new_request_id()
        state.setdefault("request_id", request_id)
        entry = AuditEntry(request_id=request_id)
        state["audit"] = entry
        started = time.perf_counter()
        problem_body = bytearray()
        is_problem = False

        async def capture(message: Message) -> None:
            nonlocal is_problem
            if message["type"] == "http.response.start":
                entry.status = message["status"]
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                is_problem = content_type.startswith(b"application/problem+json")
            elif message["type"] == "http.response.body" and is_problem:
                problem_body.extend(message.get("body", b"")[:4096])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except asyncio.CancelledError:
            raise
        except BaseException:
            if entry.status is None:
                entry.status = 500
            raise
        finally:
            entry.duration_ms = round((time.perf_counter() - started) * 1000.0, 3)
            entry.outcome = outcome_for(entry.status)
            if is_problem and entry.problem is None:
                entry.problem = _problem_slug(bytes(problem_body))
            self.audit.record(entry)


def entry_for(request: Any) -> AuditEntry | None:
    """The audit entry of this request (a Starlette ``Request``), if its route is audited."""
    state = request.scope.get("state") or {}
    entry = state.get("audit")
    return entry if isinstance(entry, AuditEntry) else None


def _problem_slug(body: bytes) -> str | None:
    try:
        kind = json.loads(body).get("type")
    except (ValueError, AttributeError):
        return None
    return kind.rsplit("/", 1)[-1] if isinstance(kind, str) else None


# ---------------------------------------------------------------------------------- reader CLI

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, *, now: datetime | None = None) -> str:
    """``24h``, ``7d``, ``30m`` (ago), or an ISO date/time (UTC unless it says) → stored form."""
    text = text.strip()
    match = _RELATIVE.fullmatch(text)
    if match:
        delta = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
        return _iso((now or datetime.now(timezone.utc)) - delta)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use e.g. 24h, 7d, 2026-01-31 or 2026-01-31T08:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return _iso(moment)


def query(
    db: Path,
    *,
    since: str | None = None,
    until: str | None = None,
    sop: str | None = None,
    study: str | None = None,
    request_id: str | None = None,
    failed: bool = False,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The most recent ``limit`` rows matching the filters, oldest first."""
    where: list[str] = []
    params: list[Any] = []
    for column, op, value in (
        ("time", ">=", since),
        ("time", "<", until),
        ("sop_instance_uid", "=", sop),
        ("study_instance_uid", "=", study),
        ("request_id", "=", request_id),
    ):
        if value is not None:
            where.append(f"{column} {op} ?")
            params.append(value)
    if failed:
        where.append("(status IS NULL OR status >= 400)")
    sql = f"SELECT {', '.join(COLUMNS)} FROM predictions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(limit)
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        rows = [dict(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()
    for row in rows:
        for name in ("screening_positive", "diagnosis_positive"):
            row[name] = json.loads(row[name]) if row[name] else []
        if row["abnormal"] is not None:
            row["abnormal"] = bool(row["abnormal"])
    rows.reverse()
    return rows


def _write_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    headers = (
        "time",
        "status",
        "request_id",
        "model",
        "sop_instance_uid",
        "screening+",
        "diagnosis+",
        "ms",
    )
    table = [
        (
            row["time"],
            f"{row['status'] or '-'} {row['outcome']}"
            + (f" ({row['problem']})" if row["problem"] else ""),
            row["request_id"],
            f"{row['model_name'] or '-'}:{row['model_version'] or '-'}",
            row["sop_instance_uid"] or "-",
            ",".join(row["screening_positive"]) or "-",
            ",".join(row["diagnosis_positive"]) or "-",
            f"{row['duration_ms']:.0f}" if row["duration_ms"] is not None else "-",
        )
        for row in rows
    ]
    widths = [max([len(h)] + [len(r[i]) for r in table]) for i, h in enumerate(headers)]
    for line in (headers, *table):
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")


def _write_csv(rows: list[dict[str, Any]], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                **row,
                "screening_positive": ";".join(row["screening_positive"]),
                "diagnosis_positive": ";".join(row["diagnosis_positive"]),
            }
        )


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """``cxr-triage audit``: print recent audit rows as a table, JSON or CSV."""
    parser = argparse.ArgumentParser(
        prog="cxr-triage audit",
        description="Show the most recent prediction audit rows (oldest first).",
    )
    parser.add_argument("--db", type=Path, help="audit database (default: CXR_AUDIT_DB)")
    parser.add_argument("--since", type=parse_when, help="e.g. 24h, 7d, 2026-01-31T08:00 (UTC)")
    parser.add_argument("--until", type=parse_when, help="same forms as --since")
    parser.add_argument("--sop", metavar="UID", help="only this SOP instance UID")
    parser.add_argument("--study", metavar="UID", help="only this study instance UID")
    parser.add_argument("--request-id", help="only this request id")
    parser.add_argument("--failed", action="store_true", help="only requests that did not get 2xx")
    parser.add_argument("--limit", type=int, default=100, help="at most N rows (default 100)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    args = parser.parse_args(argv)
    out = out or sys.stdout

    db = args.db
    if db is None:
        from app.settings import Settings

        db = Settings().audit_db
        if db is None or str(db) == "":
            parser.error("the audit trail is disabled (CXR_AUDIT_DB is empty); pass --db")
    if not db.is_file():
        print(f"cxr-triage audit: no audit database at {db}", file=sys.stderr)
        return 1
    try:
        rows = query(
            db,
            since=args.since,
            until=args.until,
            sop=args.sop,
            study=args.study,
            request_id=args.request_id,
            failed=args.failed,
            limit=max(0, args.limit),
        )
    except sqlite3.Error as exc:
        print(f"cxr-triage audit: cannot read {db}: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
    elif args.format == "csv":
        _write_csv(rows, out)
    else:
        _write_table(rows, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
