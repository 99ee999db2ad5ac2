"""``cxr-triage download`` against a real HTTP server on 127.0.0.1 that honours Range requests."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.download import DEFAULT_MANIFEST, DownloadError, Entry, main, select


@dataclass
class FileServer:
    """In-memory files behind http.server, with the faults a long download meets."""

    files: dict[str, bytes]
    drop_after: dict[str, int] = field(default_factory=dict)  # first GET sends only N bytes
    ignore_range: bool = False
    content_type: str = "application/octet-stream"
    log: list[tuple[str, str | None, int]] = field(default_factory=list)  # name, Range, bytes
    base_url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                data = server.files.get(name)
                range_header = self.headers.get("Range")
                if data is None:
                    server.log.append((name, range_header, 0))
                    self.send_error(404)
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if match and not server.ignore_range:
                    start, status = int(match.group(1)), 206
                    if start >= len(data):
                        server.log.append((name, range_header, 0))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Type", server.content_type)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = server.drop_after.pop(name, None)
                sent = body if cut is None else body[:cut]
                # Logged before the body goes out, so the client cannot finish first.
                server.log.append((name, range_header, len(sent)))
                self.wfile.write(sent)
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True

        return Handler


@pytest.fixture()
def served() -> Iterator[FileServer]:
    state = FileServer(files={})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def fake_archive(names: list[str], seed: int) -> bytes:
    """A tar.gz laid out like NIH's: images/<index>.png, noisy so gzip cannot shrink it away."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in names:
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (96, 96), dtype=np.uint8)).save(png, "PNG")
            info = tarfile.TarInfo(f"images/{name}")
            info.size = png.tell()
            png.seek(0)
            tar.addfile(info, png)
    return buffer.getvalue()


def manifest_for(tmp_path: Path, files: dict[str, bytes], **override: str) -> Path:
    """A manifest with the files' real MD5s (or overridden ones) as NIH's archives have."""
    entries = []
    for name, data in files.items():
        group = "images" if name.endswith(".tar.gz") else "metadata"
        md5 = override.get(name, hashlib.md5(data).hexdigest())
        entries.append(
            {
                "name": name,
                "url": None,
                "group": group,
                "size": len(data),
                "md5": md5,
                "sha256": None,
            }
        )
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"files": entries}))
    return path


def run(served: FileServer, out: Path, manifest: Path, *extra: str) -> int:
    return main(
        [
            "--out",
            str(out),
            "--base-url",
            served.base_url,
            "--manifest",
            str(manifest),
            "--retry-wait",
            "0",
            "--timeout",
            "10",
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture()
def release(served: FileServer) -> dict[str, bytes]:
    served.files.update(
        {
            "images_001.tar.gz": fake_archive(["00000001_000.png", "00000001_001.png"], seed=1),
            "images_002.tar.gz": fake_archive(["00000002_000.png"], seed=2),
            "Data_Entry_2017_v2020.csv": b"Image Index,Finding Labels\n00000001_000.png,Hernia\n",
        }
    )
    return served.files


def test_full_download_verifies_every_file(
    served: FileServer,
    release: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "nih"
    assert run(served, out, manifest_for(tmp_path, release)) == 0
    for name, data in release.items():
        assert (out / name).read_bytes() == data
    assert not list(out.glob("*.part"))
    lines = capsys.readouterr().out.splitlines()
    assert sum("verified: size, md5" in line for line in lines) == 3
    assert all(rng is None for _, rng, _ in served.log)


def test_resume_of_a_partial_file_asks_only_for_the_rest(
    served: FileServer, release: dict[str, bytes], tmp_path: Path
) -> None:
    out = tmp_path / "nih"
    out.mkdir()
    data = release["images_001.tar.gz"]
    half = len(data) // 2
    (out / "images_001.tar.gz.part").write_bytes(data[:half])
    assert run(served, out, manifest_for(tmp_path, release), "--parts", "1") == 0
    assert (out / "images_001.tar.gz").read_bytes() == data
    assert served.log == [("images_001.tar.gz", f"bytes={half}-", len(data) - half)]


def test_a_connection_dropped_mid_file_is_resumed_within_the_run(
    served: FileServer, release: dict[str, bytes], tmp_path: Path
) -> None:
    data = release["images_002.tar.gz"]
    served.drop_after["images_002.tar.gz"] = 1000
    out = tmp_path / "nih"
    assert run(served, out, manifest_for(tmp_path, release), "--parts", "images_002.tar.gz") == 0
    assert (out / "images_002.tar.gz").read_bytes() == data
    assert [(rng, sent) for _, rng, sent in served.log] == [
        (None, 1000),
        ("bytes=1000-", len(data) - 1000),
    ]


def test_a_server_ignoring_range_restarts_the_file_cleanly(
    served: FileServer, release: dict[str, bytes], tmp_path: Path
) -> None:
    served.ignore_range = True
    out = tmp_path / "nih"
    out.mkdir()
    (out / "images_002.tar.gz.part").write_bytes(b"stale bytes from another file")
    assert run(served, out, manifest_for(tmp_path, release), "--parts", "2") == 0
    assert (out / "images_002.tar.gz").read_bytes() == release["images_002.tar.gz"]


def test_a_complete_part_file_is_finished_without_a_body(
    served: FileServer, release: dict[str, bytes], tmp_path: Path
) -> None:
    out = tmp_path / "nih"
    out.mkdir()
    data = release["images_002.tar.gz"]
    (out / "images_002.tar.gz.part").write_bytes(data)
    assert run(served, out, manifest_for(tmp_path, release), "--parts", "2") == 0
    assert (out / "images_002.tar.gz").read_bytes() == data
    assert [sent for _, _, sent in served.log] == [0]


def test_checksum_mismatch_fails_and_keeps_the_evidence(
    served: FileServer,
    release: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "nih"
    manifest = manifest_for(tmp_path, release, **{"images_001.tar.gz": "0" * 32})
    assert run(served, out, manifest, "--parts", "images") == 1
    assert not (out / "images_001.tar.gz").exists()
    assert (out / "images_001.tar.gz.corrupt").read_bytes() == release["images_001.tar.gz"]
    assert (out / "images_002.tar.gz").is_file(), "one bad file must not stop the others"
    captured = capsys.readouterr()
    assert re.search(
        r"images_001\.tar\.gz\s+corrupt\s+md5 [0-9a-f]{32} != expected 0{32}", captured.out
    )
    assert "1 file(s) failed: images_001.tar.gz" in captured.err


def test_no_verify_accepts_what_the_server_sent(
    served: FileServer, release: dict[str, bytes], tmp_path: Path
) -> None:
    manifest = manifest_for(tmp_path, release, **{"images_001.tar.gz": "0" * 32})
    assert run(served, tmp_path / "nih", manifest, "--parts", "1", "--no-verify") == 0


def test_a_bad_file_already_on_disk_is_fetched_again(
    served: FileServer, release: dict[str, bytes], tmp_path: Path
) -> None:
    out = tmp_path / "nih"
    out.mkdir()
    data = release["images_001.tar.gz"]
    (out / "images_001.tar.gz").write_bytes(data[:-10])  # truncated by some other tool
    assert run(served, out, manifest_for(tmp_path, release), "--parts", "1") == 0
    assert (out / "images_001.tar.gz").read_bytes() == data


def test_extraction_unpacks_images_once(
    served: FileServer,
    release: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "nih"
    manifest = manifest_for(tmp_path, release)
    assert run(served, out, manifest, "--parts", "images", "--extract") == 0
    pngs = sorted(p.name for p in (out / "images").glob("*.png"))
    assert pngs == ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    with Image.open(out / "images" / "00000002_000.png") as image:
        assert image.size == (96, 96)
    requests = len(served.log)
    capsys.readouterr()
    assert run(served, out, manifest, "--parts", "images", "--extract") == 0
    assert len(served.log) == requests, "files present and verified must not be fetched again"
    assert capsys.readouterr().out.count("already extracted") == 2


def test_extraction_refuses_members_outside_the_folder(served: FileServer, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    served.files["images_001.tar.gz"] = buffer.getvalue()
    out = tmp_path / "nih"
    manifest = manifest_for(tmp_path, served.files)
    assert run(served, out, manifest, "--extract") == 1
    assert not (tmp_path / "escaped.txt").exists()


def test_write_manifest_pins_sha256_that_later_runs_enforce(
    served: FileServer, release: dict[str, bytes], tmp_path: Path
) -> None:
    out = tmp_path / "nih"
    loose = tmp_path / "loose.json"
    loose.write_text(
        json.dumps(
            {"files": [{"name": "Data_Entry_2017_v2020.csv", "url": None, "group": "metadata"}]}
        )
    )
    pinned = tmp_path / "pinned.json"
    assert run(served, out, loose, "--write-manifest", str(pinned)) == 0
    (entry,) = json.loads(pinned.read_text())["files"]
    data = release["Data_Entry_2017_v2020.csv"]
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["size"] == len(data)
    (out / "Data_Entry_2017_v2020.csv").write_bytes(data.replace(b"Hernia", b"Hernio"))
    served.files["Data_Entry_2017_v2020.csv"] = data.replace(b"Hernia", b"Hernio")
    assert run(served, out, pinned) == 1


def test_an_html_page_instead_of_the_file_is_an_error(
    served: FileServer,
    release: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    served.content_type = "text/html; charset=utf-8"
    assert run(served, tmp_path / "nih", manifest_for(tmp_path, release), "--parts", "1") == 1
    assert "web page" in capsys.readouterr().out
    assert not (tmp_path / "nih" / "images_001.tar.gz").exists()


def test_missing_file_on_the_server_fails_without_retrying_forever(
    served: FileServer, release: dict[str, bytes], tmp_path: Path
) -> None:
    manifest = manifest_for(tmp_path, {**release, "test_list.txt": b"x"})
    assert run(served, tmp_path / "nih", manifest, "--parts", "test_list.txt") == 1
    assert len(served.log) == 1


def test_default_manifest_names_the_official_release() -> None:
    images = [e for e in DEFAULT_MANIFEST if e.group == "images"]
    assert [e.name for e in images] == [f"images_{i:03d}.tar.gz" for i in range(1, 13)]
    assert all(e.url and e.url.startswith("https://nihcc.box.com/shared/static/") for e in images)
    assert all(e.md5 and re.fullmatch(r"[0-9a-f]{32}", e.md5) for e in images)
    assert len({e.url for e in images}) == 12
    names = {e.name for e in DEFAULT_MANIFEST if e.group == "metadata"}
    assert names == {
        "Data_Entry_2017_v2020.csv",
        "BBox_List_2017.csv",
        "train_val_list.txt",
        "test_list.txt",
    }


def test_select_parts() -> None:
    entries = (
        Entry("images_001.tar.gz", None, "images"),
        Entry("images_002.tar.gz", None, "images"),
        Entry("test_list.txt", None, "metadata"),
    )
    assert [e.name for e in select(entries, ["2", "metadata"])] == [
        "images_002.tar.gz",
        "test_list.txt",
    ]
    assert select(entries, None) == list(entries)
    with pytest.raises(DownloadError, match="unknown part"):
        select(entries, ["nope"])
