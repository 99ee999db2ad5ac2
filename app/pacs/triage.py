"""Score a study: the eligibility gate on every header, the eligible images through the same
decoder and micro-batcher as ``POST /predict``, per-finding maxima, and the priority rules.

Why the maximum: a finding seen on any frontal view of the study is a finding of the study
(DESIGN.md). It is taken over logits, which the sigmoid maps in the same order, so the study's
findings are exactly :func:`app.inference.scoring.score` of the strongest evidence per label.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom

from app.api.problems import Problem
from app.api.schemas import Finding, Triage
from app.card import ModelCard
from app.imaging.eligibility import check_eligibility
from app.imaging.heatmap import explained_label, select_map
from app.imaging.prepare import prepare
from app.inference.batcher import MicroBatcher, NotAccepting, QueueFull
from app.inference.runtime import ModelRuntime
from app.inference.scoring import score
from app.labels import NO_FINDING
from app.pacs.model import (
    ANY_FINDING,
    Explained,
    InstanceOutcome,
    InstanceStatus,
    Priority,
    PriorityRule,
)
from app.pacs.studies import Scored, ScoringDeferred

logger = logging.getLogger(__name__)


def study_priority(findings: Sequence[Finding], rules: Sequence[PriorityRule]) -> Priority:
    """ROUTINE, raised by every rule whose finding carries its flag (never lowered)."""
    priority = Priority.ROUTINE
    for rule in rules:
        for finding in findings:
            if finding.label == NO_FINDING and rule.label == ANY_FINDING:
                continue
            if rule.label not in (ANY_FINDING, finding.label):
                continue
            flagged = (
                finding.diagnosis_positive
                if rule.flag == "diagnosis"
                else finding.screening_positive
            )
            if flagged and rule.priority.rank > priority.rank:
                priority = rule.priority
    return priority


@dataclass(frozen=True)
class _Scored:
    outcome: InstanceOutcome
    logits: np.ndarray
    heatmap: np.ndarray
    decoded_hash: str


class StudyScorer:
    """Scores a study's instances with the service's runtime, batcher and decode pool."""

    def __init__(
        self,
        runtime: ModelRuntime,
        batcher: MicroBatcher,
        pool: ThreadPoolExecutor,
        rules: Sequence[PriorityRule],
        *,
        max_pixels: int,
    ) -> None:
        self.runtime = runtime
        self.batcher = batcher
        self.pool = pool
        self.rules = list(rules)
        self.max_pixels = max_pixels

    @property
    def card(self) -> ModelCard:
        return self.runtime.card

    @property
    def model_name(self) -> str:
        return self.card.name

    @property
    def model_version(self) -> str:
        return self.card.version

    async def score(self, instances: list[InstanceOutcome]) -> Scored:
        """Every instance's outcome, and the study's findings over the scored ones.

        Raises :class:`ScoringDeferred` when the batcher cannot take the images now; nothing
        is recorded then and the study is tried again later.
        """
        # At most one batch of a study's images in the queue at a time: a large study neither
        # overflows the queue (which would defer it for ever) nor crowds out POST /predict.
        in_flight = asyncio.Semaphore(self.batcher.max_batch_size)
        results = await asyncio.gather(
            *(self._one(instance, in_flight) for instance in instances), return_exceptions=True
        )
        for result in results:
            if isinstance(result, (QueueFull, NotAccepting)):
                raise ScoringDeferred(result.detail)
            if isinstance(result, BaseException):
                raise result
        done: list[InstanceOutcome | _Scored] = list(results)  # type: ignore[arg-type]
        outcomes = [r.outcome if isinstance(r, _Scored) else r for r in done]
        scored = [r for r in done if isinstance(r, _Scored)]
        card = self.card
        if not scored:
            findings: list[Finding] = []
            triage = Triage(screening_positive=[], diagnosis_positive=[], abnormal=False)
            explained = None
        else:
            logits = np.stack([s.logits for s in scored])
            findings, triage = score(card, logits.max(axis=0))
            flagged = triage.diagnosis_positive or triage.screening_positive
            label = explained_label(card.labels, [f.probability for f in findings], flagged)
            index = card.labels.index(label)
            best = int(np.argmax(logits[:, index]))
            explained = Explained(
                sop_instance_uid=scored[best].outcome.sop_instance_uid,
                label=label,
                probability=findings[index].probability,
                grid=np.asarray(select_map(scored[best].heatmap, index), np.float32),
            )
        return Scored(
            instances=outcomes,
            findings=findings,
            triage=triage,
            priority=study_priority(findings, self.rules),
            explained=explained,
            model_name=card.name,
            model_version=card.version,
            decoded_hashes={s.outcome.sop_instance_uid: s.decoded_hash for s in scored},
        )

    async def _one(
        self, instance: InstanceOutcome, in_flight: asyncio.Semaphore
    ) -> InstanceOutcome | _Scored:
        loop = asyncio.get_running_loop()
        header = await loop.run_in_executor(self.pool, _read_header, instance.path)
        if header is None:
            return replace(
                instance,
                status=InstanceStatus.UNDECODABLE,
                reason="the stored file cannot be read as DICOM",
            )
        verdict = check_eligibility(header)
        if not verdict.eligible:
            return replace(instance, status=InstanceStatus.INELIGIBLE, reason=verdict.reason)
        async with in_flight:
            with self.batcher.admit() as slot:
                try:
                    prepared = await loop.run_in_executor(
                        self.pool, _prepare_file, instance.path, self.card, self.max_pixels
                    )
                except Problem as exc:
                    return replace(instance, status=InstanceStatus.UNDECODABLE, reason=exc.detail)
                result = await slot.submit(prepared.model_input)
        return _Scored(
            replace(instance, status=InstanceStatus.SCORED, reason=None),
            result.logits,
            result.heatmap,
            prepared.decoded_hash,
        )


def _read_header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # a file that cannot be read is "undecodable", whatever pydicom raises
        return None


@dataclass(frozen=True)
class _Prepared:
    model_input: np.ndarray
    decoded_hash: str


def _prepare_file(path: Path, card: ModelCard, max_pixels: int) -> _Prepared:
    """Decode and preprocess a stored file; hash the decoded image (transfer-syntax free)."""
    try:
        data = path.read_bytes()
    except OSError:
        raise Problem(422, "The stored file cannot be read.", slug="undecodable-image") from None
    prepared = prepare(data, "application/dicom", card, max_pixels)
    pixels = np.ascontiguousarray(prepared.decoded.pixels)
    digest = hashlib.sha256(f"{pixels.shape}{pixels.dtype}".encode())
    digest.update(memoryview(pixels).cast("B"))
    return _Prepared(prepared.model_input, digest.hexdigest())
