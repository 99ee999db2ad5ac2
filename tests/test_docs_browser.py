"""/docs and /redoc work in a real browser that can reach nothing but the service.

Debian's headless Chromium, driven over its DevTools protocol (a websocket; no browser download,
no Node), opens the pages of a real ``cxr-triage serve`` process. The browser is cut off from
everything else three ways: its resolver knows only the service's host name (``MAP * ~NOTFOUND``),
every request the page makes is intercepted and any not bound for the service is failed, and
the pages' own Content-Security-Policy allows only their origin. The service is reached under a
non-loopback-looking name (``cxr-triage.hospital.test``, mapped to 127.0.0.1) because that is
how a hospital opens it, and Swagger UI behaves differently on localhost (it skips its online
validator badge there). Asserted: the page renders the ``POST /predict`` operation; in Swagger
UI, "Try it out" with a shared NIH PNG shows a 200 with findings; no request for another host
was even attempted (every request the page issued, blocked or not, is recorded), and no CSP
violation happened.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow

websockets_sync = pytest.importorskip("websockets.sync.client", reason="needs websockets")

CHROMIUM = os.environ.get("CXR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
HOSPITAL_HOST = "cxr-triage.hospital.test"
# Generous: only a hang reaches these (a busy 2-core machine renders Swagger UI in seconds).
START_S = 120.0
RENDER_S = 90.0
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--metrics-recording-only",
    "--password-store=basic",
    "--use-mock-keychain",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication",
    "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
    f"--host-resolver-rules=MAP {HOSPITAL_HOST} 127.0.0.1, MAP * ~NOTFOUND",
)


class CdpError(RuntimeError):
    """A DevTools command failed, or the browser stopped answering."""


@dataclass
class Page:
    """One browser tab over a flattened CDP session: commands, and every request it issued."""

    ws: Any
    session_id: str
    allowed_origin: str
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def send(self, method: str, params: dict[str, Any] | None = None, *, wait: bool = True) -> Any:
        message_id = next(self.ids)
        message = {"id": message_id, "method": method, "params": params or {}}
        message["sessionId"] = self.session_id
        self.ws.send(json.dumps(message))
        if not wait:
            return None
        while True:
            reply = self._receive()
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _receive(self) -> dict[str, Any]:
        try:
            reply = json.loads(self.ws.recv(timeout=RENDER_S))
        except TimeoutError as exc:
            raise CdpError(f"no message from Chromium in {RENDER_S} s") from exc
        self._on_event(reply)
        return reply

    def _on_event(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Fetch.requestPaused":
            url = params["request"]["url"]
            if _origin(url) == self.allowed_origin:
                self.send("Fetch.continueRequest", {"requestId": params["requestId"]}, wait=False)
            else:
                self.blocked.append(url)
                self.send(
                    "Fetch.failRequest",
                    {"requestId": params["requestId"], "errorReason": "BlockedByClient"},
                    wait=False,
                )
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console_errors.append(
                " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.console_errors.append(
                details.get("exception", {}).get("description") or details.get("text", "")
            )

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout_s: float = RENDER_S) -> Any:
        """Poll ``expression`` in the page until it is truthy (events are handled meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                body = self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
                raise AssertionError(f"{what}: not seen within {timeout_s} s; page text:\n{body}")
            # Let the page work between polls; the wait is a poll interval, not a synchronisation.
            self.evaluate("new Promise(resolve => setTimeout(resolve, 100))")

    def navigate(self, url: str) -> None:
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigate {url}: {result['errorText']}")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _outside(urls: list[str], origin: str) -> list[str]:
    """Requests for anything but the service (data:/blob:/about: never touch the network)."""
    local = ("data:", "blob:", "about:")
    return [u for u in urls if not u.startswith(local) and _origin(u) != origin]


@contextlib.contextmanager
def chromium() -> Iterator[Callable[[str], Page]]:
    """A fresh headless Chromium (own profile); yields a factory of pages allowed one origin."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package 'chromium'; .ci/run installs it)")
    with tempfile.TemporaryDirectory(prefix="cxr-chromium-") as profile:
        log_path = Path(profile) / "chromium.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: teardown stops every child
            )
        try:
            active = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + START_S
            while not (active.is_file() and len(active.read_text().splitlines()) >= 2):
                if process.poll() is not None:
                    pytest.skip(f"Chromium cannot start here: {log_path.read_text()[-1500:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"Chromium gave no DevTools port in {START_S} s")
                time.sleep(0.1)  # polling for the file Chromium writes once it listens
            port, browser_path = active.read_text().splitlines()[:2]
            with websockets_sync.connect(
                f"ws://127.0.0.1:{port}{browser_path}", max_size=None, open_timeout=START_S
            ) as ws:

                def open_page(origin: str) -> Page:
                    target = _browser_call(ws, "Target.createTarget", {"url": "about:blank"})
                    attached = _browser_call(
                        ws,
                        "Target.attachToTarget",
                        {"targetId": target["targetId"], "flatten": True},
                    )
                    page = Page(ws, attached["sessionId"], origin)
                    for method, params in (
                        ("Network.enable", {}),
                        ("Fetch.enable", {"patterns": [{"urlPattern": "*"}]}),
                        ("Page.enable", {}),
                        ("Runtime.enable", {}),
                        ("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_RECORDER}),
                    ):
                        page.send(method, params)
                    return page

                yield open_page
        finally:
            _stop_group(process)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM Chromium's process group (renderers, zygote), SIGKILL it if that hangs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


_browser_ids = itertools.count(1_000_000)


def _browser_call(ws: Any, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """A browser-level command (no session); events for pages are not expected yet."""
    message_id = next(_browser_ids)
    ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
    while True:
        reply = json.loads(ws.recv(timeout=START_S))
        if reply.get("id") == message_id:
            if "error" in reply:
                raise CdpError(f"{method}: {reply['error']}")
            return reply["result"]


CSP_RECORDER = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', e =>
    window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));
"""


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tiny_model_dir, tmp_path_factory.mktemp("docs-browser"))
    try:
        yield live
    finally:
        live.stop()


def hospital_url(server: LiveServer) -> str:
    return server.url.replace("127.0.0.1", HOSPITAL_HOST)


def assert_nothing_left_the_machine(page: Page) -> None:
    assert page.requests, "the page issued no request at all: nothing was observed"
    outside = _outside(page.requests, page.allowed_origin)
    assert not outside, f"requests for other hosts were attempted: {outside}"
    assert not page.blocked, f"requests for other hosts were blocked: {page.blocked}"
    assert page.evaluate("window.__cspViolations") == []
    assert not page.console_errors, page.console_errors  # a script the policy broke, say


def test_every_openapi_reference_resolves() -> None:
    """Both UIs resolve ``$ref`` against the document: one dangling reference (a pydantic
    ``#/$defs/...`` left inside a response schema, say) and ReDoc shows only an error."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    spec = TestClient(create_app()).get("/openapi.json").json()
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    assert refs, "no references at all: nothing was checked"
    for ref in set(refs):
        assert ref.startswith("#/"), ref
        target: Any = spec
        for part in ref[2:].split("/"):
            assert isinstance(target, dict) and part in target, f"{ref} does not resolve"
            target = target[part]


def test_swagger_ui_try_it_out_posts_a_png(server: LiveServer, nih_dir: Path) -> None:
    png = sorted((nih_dir / "images" / "nih-1024").glob("*.png"))[0]
    origin = hospital_url(server)
    with chromium() as open_page:
        page = open_page(origin)
        page.navigate(f"{origin}/docs")
        block = "document.querySelector('#operations-prediction-predict_predict_post')"
        page.wait_for(f"!!{block}", "the POST /predict operation")
        summary = page.evaluate(f"{block}.querySelector('.opblock-summary').innerText")
        assert "POST" in summary and "/predict" in summary, summary
        page.evaluate(f"{block}.querySelector('.opblock-summary-control').click()")
        page.wait_for(f"!!{block}.querySelector('.try-out__btn')", "the 'Try it out' button")
        page.evaluate(f"{block}.querySelector('.try-out__btn').click()")
        file_input = page.wait_for(
            f"!!{block}.querySelector('input[type=file]')", "the file input of 'Try it out'"
        )
        assert file_input
        document = page.send("DOM.getDocument", {"depth": 0})
        node = page.send(
            "DOM.querySelector",
            {
                "nodeId": document["root"]["nodeId"],
                "selector": "#operations-prediction-predict_predict_post input[type=file]",
            },
        )
        page.send("DOM.setFileInputFiles", {"nodeId": node["nodeId"], "files": [str(png)]})
        page.evaluate(f"{block}.querySelector('.execute').click()")
        status = page.wait_for(
            f"(() => {{ const c = {block}.querySelector("
            "'.live-responses-table .response .response-col_status');"
            " return c && c.innerText.trim(); })()",
            "a live response in 'Try it out'",
        )
        assert status.startswith("200"), status
        body = page.evaluate(f"{block}.querySelector('.live-responses-table .microlight, "
                             ".live-responses-table pre').innerText")  # fmt: skip
        assert '"findings"' in body and '"triage"' in body, body[:500]
        predicted = [u for u in page.requests if urlsplit(u).path == "/predict"]
        assert predicted, page.requests
        assert_nothing_left_the_machine(page)


def test_redoc_renders_the_predict_operation(server: LiveServer) -> None:
    origin = hospital_url(server)
    section = "document.querySelector('[data-section-id=\"operation/predict_predict_post\"]')"
    with chromium() as open_page:
        page = open_page(origin)
        page.navigate(f"{origin}/redoc")
        text = page.wait_for(
            f"(() => {{ const s = {section}; return s && s.innerText.includes('/predict')"
            " ? s.innerText : ''; })()",
            "ReDoc's POST /predict operation",
        )
        assert "post" in text.lower(), text[:1500]
        assert "multipart/form-data" in text and "application/dicom" in text, text[:1500]
        assert "Atelectasis" in text or "findings" in text, text[:1500]
        assert_nothing_left_the_machine(page)
