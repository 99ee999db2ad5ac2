"""The DICOM listener: a pynetdicom C-STORE and C-ECHO SCP in the service process.

Security model (README "Connect your PACS"): the SCP binds ``CXR_DICOM_BIND`` (loopback unless
an operator opens it), answers only to its own AE title (``CXR_DICOM_AE_TITLE``; a wrong called
AE is rejected), and, when ``CXR_DICOM_ALLOWED_AES`` is set, only to those calling AE titles
(others get a clean A-ASSOCIATE-RJ, "calling AE title not recognised"). AE titles are not
authentication, so a deployment that leaves the host should also set ``CXR_DICOM_TLS_CERT`` /
``_KEY`` (DICOM TLS, PS3.15 Annex B) and, to demand client certificates, ``CXR_DICOM_TLS_CA``.

What is accepted: every standard storage SOP class pynetdicom knows, in the transfer syntaxes
pydicom can decode here. A PACS routing a study pushes everything in it (the lateral, a dose
report, a GSPS, an earlier AI's SR); refusing those would fail the PACS's whole routing job and
have it retry forever. So they are stored and listed as ineligible with the reason, and only
frontal chest radiographs are scored. Private SOP classes and non-storage services are refused
at association negotiation (the presentation context is rejected), which is also clean.

A C-STORE is answered 0x0000 only after the file and its study row are on disk (see
:mod:`app.pacs.store`).
"""

from __future__ import annotations

import logging
import ssl
import threading
import weakref
from collections.abc import Callable
from typing import Any

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from app.ops.logs import new_request_id
from app.pacs.studies import Receipt

logger = logging.getLogger(__name__)

# pynetdicom logs every PDU at DEBUG and some datasets too; this module says what matters.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

_UNCOMPRESSED = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]
_COMPRESSED = [
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

Receiver = Callable[..., Receipt]


def transfer_syntaxes() -> list[str]:
    """Uncompressed, then every compressed syntax pydicom has a working decoder for here."""
    usable = list(_UNCOMPRESSED)
    for uid in _COMPRESSED:
        try:
            if get_decoder(UID(uid)).is_available:
                usable.append(uid)
        except (NotImplementedError, ValueError):
            continue
    return [str(u) for u in usable]


def storage_contexts() -> list[Any]:
    syntaxes = transfer_syntaxes()
    contexts = [build_context(Verification, syntaxes)]
    contexts += [
        build_context(cx.abstract_syntax, syntaxes) for cx in AllStoragePresentationContexts
    ]
    return contexts


def server_ssl_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    """TLS 1.2+ server context; with ``ca`` the SCU must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cert, keyfile=key)
    if ca:
        context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class StoreSCP:
    """Runs the pynetdicom server in its own threads; ``receive`` is the assembler's."""

    def __init__(
        self,
        receive: Receiver,
        *,
        ae_title: str,
        bind: str,
        port: int,
        allowed_aes: tuple[str, ...] = (),
        ssl_context: ssl.SSLContext | None = None,
        max_associations: int = 10,
    ) -> None:
        self._receive = receive
        self.ae_title = ae_title
        self.bind = bind
        self.port = port
        self.allowed_aes = allowed_aes
        self.ssl_context = ssl_context
        self._ae = AE(ae_title=ae_title)
        self._ae.supported_contexts = storage_contexts()
        self._ae.require_called_aet = True
        if allowed_aes:
            self._ae.require_calling_aet = list(allowed_aes)
        self._ae.maximum_associations = max_associations
        # A stalled peer must not hold an association thread for ever.
        self._ae.network_timeout = 60
        self._ae.dimse_timeout = 60
        self._ae.acse_timeout = 30
        self._server: Any = None
        self._ids: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._ids_lock = threading.Lock()

    def start(self) -> int:
        """Listen; returns the bound port. An address in use fails start-up (loudly)."""
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = self._ae.start_server(
            (self.bind, self.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self.ssl_context,
        )
        self.port = int(self._server.server_address[1])
        logger.info(
            "DICOM SCP listening",
            extra={
                "ae_title": self.ae_title,
                "bind": self.bind,
                "port": self.port,
                "tls": self.ssl_context is not None,
                "allowed_aes": len(self.allowed_aes) or "any",
            },
        )
        return self.port

    def stop(self) -> None:
        """Stop listening and end open associations (a sender retries what was not confirmed)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._ae.shutdown()

    # -- handlers (pynetdicom's threads) -------------------------------------------------------

    def _request_id(self, assoc: Any) -> str:
        with self._ids_lock:
            rid = self._ids.get(assoc)
            if rid is None:
                rid = self._ids[assoc] = "dimse-" + new_request_id()
            return rid

    def _on_accepted(self, event: Any) -> None:
        requestor = event.assoc.requestor
        logger.info(
            "association accepted",
            extra={
                "calling_ae": str(requestor.ae_title).strip(),
                "peer": requestor.address,
                "request_id": self._request_id(event.assoc),
            },
        )

    def _on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        logger.warning(
            "association rejected",
            extra={"calling_ae": str(requestor.ae_title).strip(), "peer": requestor.address},
        )

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_store(self, event: Any) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # a dataset pynetdicom cannot re-encode with its meta
            logger.warning("C-STORE dataset unreadable: %s", type(exc).__name__)
            return 0xC000
        receipt = self._receive(data, source="c-store", request_id=self._request_id(event.assoc))
        return 0x0000 if receipt.ok else receipt.status
