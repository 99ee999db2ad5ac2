"""The PACS side as one object the app's lifespan starts and stops.

Start order (each part needs the one before): the outbox (so results can be queued), the study
assembler (resumes studies stored but not scored, hands unqueued results to the outbox), then
the DICOM listener. Stop runs backwards: no new instances, then no new scoring (work cut off is
redone after the restart, from the state on disk), then delivery.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.inference.batcher import MicroBatcher
from app.inference.runtime import ModelRuntime
from app.ops.audit import AuditLog
from app.pacs.model import (
    ANY_FINDING,
    PriorityRule,
    ResultObject,
    StudyResult,
    parse_destinations,
    parse_priority_rules,
)
from app.pacs.outbox import Outbox
from app.pacs.results import write_results
from app.pacs.scp import StoreSCP, server_ssl_context
from app.pacs.store import InstanceStore, safe_name
from app.pacs.studies import Receipt, StudyAssembler, StudyDB
from app.pacs.triage import StudyScorer
from app.settings import Settings

logger = logging.getLogger(__name__)

_SCORING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class PacsMetrics:
    """The PACS receive/triage collectors (the outbox registers its own on the same registry).

    Built once per app, not per lifespan: a registry refuses a second collector of one name.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.instances_received = Counter(
            "cxr_pacs_instances_received",
            "DICOM instances received, by source (c-store, stow-rs) and outcome "
            "(stored, duplicate, own-result, refused)",
            ["source", "outcome"],
            registry=registry,
        )
        self.studies_scored = Counter(
            "cxr_pacs_studies_scored",
            "Study results written (each revision counts), by priority",
            ["priority"],
            registry=registry,
        )
        self.scoring_duration = Histogram(
            "cxr_pacs_study_scoring_seconds",
            "Wall time to score a stable study and write its result objects",
            buckets=_SCORING_BUCKETS,
            registry=registry,
        )
        self.studies_pending = Gauge(
            "cxr_pacs_studies_pending",
            "Studies received and waiting to be scored (stable window or retry)",
            registry=registry,
        )

    def receipt(self, source: str, receipt: Receipt) -> None:
        self.instances_received.labels(source=source, outcome=receipt.outcome).inc()

    def scored(self, result: StudyResult | None, seconds: float) -> None:
        self.scoring_duration.observe(seconds)
        if result is not None:
            self.studies_scored.labels(priority=result.priority).inc()


class OutboxSink:
    """pacs-out's writer and outbox behind the assembler's :class:`ResultSink` protocol."""

    def __init__(self, outbox: Outbox, runtime: ModelRuntime, results_root: Path) -> None:
        self.outbox = outbox
        self.runtime = runtime
        self.results_root = results_root

    async def write(self, result: StudyResult) -> list[ResultObject]:
        out_dir = self.results_root / safe_name(result.study_instance_uid)
        return await asyncio.to_thread(write_results, result, self.runtime.card, out_dir)

    async def enqueue(self, study_uid: str, objects: list[ResultObject]) -> None:
        await asyncio.to_thread(self.outbox.enqueue, study_uid, objects)

    async def deliveries(self, study_uid: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.outbox.deliveries, study_uid)


def priority_rules(settings: Settings, labels: list[str]) -> list[PriorityRule]:
    """The configured rules, checked against the model's labels.

    A rule an operator wrote for a label the model lacks is an error. The default rules name
    NIH labels; with a model trained on other labels those rules are left out (and logged)
    rather than stopping a service nobody configured.
    """
    default = Settings.model_fields["priority_rules"].default
    if settings.priority_rules != default:
        return parse_priority_rules(settings.priority_rules, labels)
    kept = [
        rule
        for rule in parse_priority_rules(settings.priority_rules, None)
        if rule.label == ANY_FINDING or rule.label in labels
    ]
    dropped = len(parse_priority_rules(settings.priority_rules, None)) - len(kept)
    if dropped:
        logger.warning(
            "default priority rules for labels this model lacks are off",
            extra={"rules_dropped": dropped},
        )
    return kept


class PacsService:
    """SCP thread + study assembler task + outbox, wired to the model's runtime and batcher."""

    def __init__(
        self,
        settings: Settings,
        runtime: ModelRuntime,
        batcher: MicroBatcher,
        pool: ThreadPoolExecutor,
        *,
        audit: AuditLog | None,
        metrics: PacsMetrics | None,
        registry: CollectorRegistry | None,
    ) -> None:
        self.settings = settings
        # Both raise ValueError on a bad setting: start-up fails rather than triaging wrongly.
        self.rules = priority_rules(settings, runtime.card.labels)
        self.destinations = parse_destinations(settings.destinations)
        storage = Path(settings.pacs_storage_dir).resolve()
        self.outbox = Outbox(
            Path(settings.outbox_db).resolve(),
            self.destinations,
            calling_ae_title=settings.dicom_ae_title,
            audit=audit,
            registry=registry,
        )
        self.sink = OutboxSink(self.outbox, runtime, storage / "results")
        self.metrics = metrics
        self.assembler = StudyAssembler(
            StudyDB(Path(settings.studies_db).resolve()),
            InstanceStore(storage / "instances"),
            StudyScorer(runtime, batcher, pool, self.rules, max_pixels=settings.max_pixels),
            self.sink,
            stable_s=settings.study_stable_s,
            audit=audit,
            on_receipt=metrics.receipt if metrics else None,
            on_scored=metrics.scored if metrics else None,
            on_pending=metrics.studies_pending.set if metrics else None,
        )
        self.scp: StoreSCP | None = None
        if settings.dicom_port:
            tls = None
            if settings.dicom_tls_cert or settings.dicom_tls_key:
                if not (settings.dicom_tls_cert and settings.dicom_tls_key):
                    raise ValueError("DICOM TLS needs both CXR_DICOM_TLS_CERT and _KEY")
                tls = server_ssl_context(
                    str(settings.dicom_tls_cert),
                    str(settings.dicom_tls_key),
                    str(settings.dicom_tls_ca) if settings.dicom_tls_ca else None,
                )
            self.scp = StoreSCP(
                self.assembler.receive,
                ae_title=settings.dicom_ae_title,
                bind=settings.dicom_bind,
                port=settings.dicom_port,
                allowed_aes=settings.allowed_aes,
                ssl_context=tls,
            )

    @property
    def dicom_port(self) -> int | None:
        return self.scp.port if self.scp is not None else None

    async def start(self) -> None:
        await self.outbox.start()
        try:
            await self.assembler.start()
            if self.scp is not None:
                await asyncio.to_thread(self.scp.start)
        except BaseException:
            await self.stop()
            raise
        logger.info(
            "PACS side ready",
            extra={
                "dicom_port": self.dicom_port,
                "destinations": [d.label for d in self.destinations],
                "priority_rules": [str(r) for r in self.rules],
            },
        )

    async def stop(self) -> None:
        if self.scp is not None:
            await asyncio.to_thread(self.scp.stop)
        await self.assembler.stop()
        await self.outbox.stop()

    def receive(self, data: bytes, **kwargs: Any) -> Receipt:
        """Store one received Part 10 instance (blocking; call from a thread)."""
        return self.assembler.receive(data, **kwargs)

    async def study(self, study_uid: str) -> dict[str, Any] | None:
        """Everything ``GET /v1/studies/{uid}`` shows, or None for an unknown study."""
        found = await self.assembler.study(study_uid)
        if found is None:
            return None
        found["deliveries"] = await self.sink.deliveries(study_uid)
        return found
