"""``cxr-triage download``: fetch NIH ChestX-ray14 from the NIH Clinical Center's own release.

The 12 image archives (``images_001.tar.gz`` … ``images_012.tar.gz``, about 42 GiB) come from the
Box static links that NIH publishes in ``batch_download_zips.py``; the label and split files from
the same Box folder (https://nihcc.app.box.com/v/ChestXray-NIHCC). Downloads of that size break,
so every file is written to ``NAME.part`` and resumed with an HTTP ``Range`` request, across runs
and across retries within a run. Each finished file is checked against a manifest:

- the archives' MD5s are the ones NIH publishes (FAQ_CHESTXRAY.pdf, Q07); their byte sizes are
  the ``Content-Range`` totals NIH's server reports, as recorded by other users of these links;
- the metadata files have no published checksum: they are reported ``unverified`` until you pin
  them with ``--write-manifest FILE`` (size, MD5 and SHA-256 of what you downloaded) and pass
  that file back with ``--manifest FILE`` on later runs or other machines.

Standard library only (``urllib``), so it runs from the serving install too; ``tqdm`` draws
progress bars when it is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO, Literal

RELEASE_PAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
_BOX_STATIC = "https://nihcc.box.com/shared/static/{}.gz"
_BOX_FILE = (
    "https://nihcc.app.box.com/index.php?rm=box_download_shared_file"
    "&vanity_name=ChestXray-NIHCC&file_id=f_{}"
)
USER_AGENT = "cxr-triage-download/0.1 (+https://nihcc.app.box.com/v/ChestXray-NIHCC)"
CHUNK = 1 << 20
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}

Group = Literal["images", "metadata"]


@dataclass(frozen=True)
class Entry:
    """One file of the release and what is known about it (None: not known)."""

    name: str
    url: str | None
    group: Group
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None

    @property
    def is_archive(self) -> bool:
        return self.name.endswith((".tar.gz", ".tgz"))


# (Box static-link id, size in bytes, NIH-published MD5) for images_001 … images_012.
_ARCHIVES: tuple[tuple[str, int, str], ...] = (
    ("vfk49d74nhbxq3nqjg0900w5nvkorp5c", 2008470987, "fe8ed0a6961412fddcbb3603c11b3698"),
    ("i28rlmbvmfjbl8p2n3ril0pptcmcu9d1", 3952623504, "ab07a2d7cbe6f65ddd97b4ed7bde10bf"),
    ("f1t00wrtdk94satdfb9olcolqx20z2jp", 3929234850, "2301d03bde4c246388bad3876965d574"),
    ("0aowwzs5lhjrceb3qp67ahp0rd1l1etg", 3838903983, "9f1b7f5aae01b13f4bc8e2c44a4b8ef6"),
    ("v5e3goj22zr6h8tzualxfsqlqaygfbsn", 3935496531, "1861f3cd0ef7734df8104f2b0309023b"),
    ("asi7ikud9jwnkrnkj99jnpfkjdes7l6l", 3986301172, "456b53a8b351afd92a35bc41444c58c8"),
    ("jn1b4mw4n6lnh74ovmcjb8y48h8xj07n", 4016328426, "1075121ea20a137b87f290d6a4a5965e"),
    ("tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j", 4018347353, "b61f34cec3aa69f295fbb593cbd9d443"),
    ("upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj", 4111327929, "442a3caa61ae9b64e61c561294d1e183"),
    ("l6nilvfa9cg3s28tqv1qc1olm3gnz54p", 4181556296, "09ec81c4c31e32858ad8cf965c494b74"),
    ("hhq8fkdgvcari67vfhs7ppg2w6ni4jze", 4187084020, "499aefc67207a5a97692424cf5dbeed5"),
    ("ioqwiy20ihqwyr8pf4c24eazhh281pbu", 2914187733, "dc9fda1757c2de0032b63347a7d2895c"),
)
# Box file ids in the release folder; BBox_List_2017.csv has no direct link we could confirm.
_METADATA: tuple[tuple[str, str | None], ...] = (
    ("Data_Entry_2017_v2020.csv", "219760887468"),
    ("train_val_list.txt", "256056636701"),
    ("test_list.txt", "256055473534"),
    ("BBox_List_2017.csv", None),
)

DEFAULT_MANIFEST: tuple[Entry, ...] = (
    *(
        Entry(f"images_{i:03d}.tar.gz", _BOX_STATIC.format(box_id), "images", size, md5)
        for i, (box_id, size, md5) in enumerate(_ARCHIVES, start=1)
    ),
    *(
        Entry(name, _BOX_FILE.format(file_id) if file_id else None, "metadata")
        for name, file_id in _METADATA
    ),
)


class DownloadError(RuntimeError):
    """A file could not be fetched or did not verify; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Manifest


def load_manifest(path: Path) -> tuple[Entry, ...]:
    """Read a manifest written by ``--write-manifest`` (or by hand: name, url, group, ...)."""
    data = json.loads(path.read_text())
    return tuple(Entry(**item) for item in data["files"])


def write_manifest(path: Path, entries: Iterable[Entry]) -> None:
    payload = {"source": RELEASE_PAGE, "files": [asdict(e) for e in entries]}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def select(entries: Sequence[Entry], parts: Sequence[str] | None) -> list[Entry]:
    """Pick entries by ``all``, ``images``, ``metadata``, archive number (``3``) or file name."""
    if not parts:
        return list(entries)
    by_name = {e.name: e for e in entries}
    chosen: dict[str, Entry] = {}
    for part in parts:
        if part == "all":
            matches = list(entries)
        elif part in ("images", "metadata"):
            matches = [e for e in entries if e.group == part]
        elif part.isdigit():
            name = f"images_{int(part):03d}.tar.gz"
            if name not in by_name:
                raise DownloadError(f"no archive number {part} in the manifest")
            matches = [by_name[name]]
        elif part in by_name:
            matches = [by_name[part]]
        else:
            raise DownloadError(
                f"unknown part {part!r}: use all, images, metadata, 1-12 or a file name "
                f"({', '.join(sorted(by_name))})"
            )
        chosen.update((e.name, e) for e in matches)
    return [e for e in entries if e.name in chosen]


# ---------------------------------------------------------------------------------------------
# Fetching


class _Progress:
    """tqdm when installed and wanted, else silence (the summary lines still print)."""

    def __init__(self, name: str, total: int | None, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                print(f"{name}: fetching from byte {initial}", file=sys.stderr)
            else:
                self._bar = tqdm(
                    total=total,
                    initial=initial,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=name,
                    leave=False,
                )

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


def _copy(response: BinaryIO, sink: BinaryIO, progress: _Progress) -> int:
    written = 0
    while chunk := response.read(CHUNK):
        sink.write(chunk)
        written += len(chunk)
        progress.update(len(chunk))
    return written


def fetch(
    url: str,
    dest: Path,
    *,
    retries: int = 5,
    retry_wait_s: float = 2.0,
    timeout_s: float = 60.0,
    progress: bool = False,
) -> Literal["downloaded", "resumed"]:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming with ``Range`` when it can.

    Retries network failures and 5xx/429 answers ``retries`` times, each time continuing from
    the bytes already on disk; a server that ignores ``Range`` gets the file restarted.
    """
    part = dest.with_name(dest.name + ".part")
    resumed = part.exists() and part.stat().st_size > 0
    failures = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                if "text/html" in response.headers.get("Content-Type", ""):
                    raise DownloadError(
                        f"{dest.name}: {url} answered with a web page, not the file (Box may "
                        f"ask for a login or have moved it); see {RELEASE_PAGE}"
                    )
                total: int | None
                if offset and response.status == 206:
                    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                    if not match or int(match.group(1)) != offset:
                        raise DownloadError(f"{dest.name}: bad Content-Range for a resume")
                    total = None if match.group(3) == "*" else int(match.group(3))
                    mode = "ab"
                else:  # 200: a fresh start, or a server that ignored the Range header
                    offset, mode = 0, "wb"
                    length = response.headers.get("Content-Length")
                    total = int(length) if length is not None else None
                bar = _Progress(dest.name, total, offset, progress)
                try:
                    with part.open(mode) as sink:
                        _copy(response, sink, bar)
                finally:
                    bar.close()
                size = part.stat().st_size
                if total is not None and size != total:
                    raise http.client.IncompleteRead(b"", total - size)
        except urllib.error.HTTPError as error:
            if error.code == 416 and offset:
                # Nothing left to send from ``offset``: the .part is complete, or longer than
                # the file (a different file under that name): then start over.
                match = _UNSATISFIED_RANGE.match(error.headers.get("Content-Range", "") or "")
                if match and int(match.group(1)) == offset:
                    break
                part.unlink()
                continue
            if error.code not in _RETRY_STATUS or failures >= retries:
                raise DownloadError(f"{dest.name}: HTTP {error.code} from {url}") from error
        except (
            urllib.error.URLError,
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
        ) as error:
            if failures >= retries:
                raise DownloadError(f"{dest.name}: {error!r} after {retries} retries") from error
        else:
            break
        failures += 1
        time.sleep(retry_wait_s * 2 ** (failures - 1))
    part.replace(dest)
    return "resumed" if resumed or failures else "downloaded"


# ---------------------------------------------------------------------------------------------
# Verification and extraction


@dataclass(frozen=True)
class Digest:
    size: int
    md5: str
    sha256: str


def digest(path: Path) -> Digest:
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return Digest(path.stat().st_size, md5.hexdigest(), sha256.hexdigest())


def verify(path: Path, entry: Entry) -> tuple[list[str], list[str]]:
    """Check what the manifest knows; returns (checks passed, mismatches), both by name."""
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return [], [f"size {size} != expected {entry.size}"]
    passed = ["size"] if entry.size is not None else []
    if entry.md5 is None and entry.sha256 is None:
        return passed, []
    got = digest(path)
    mismatches = []
    for algo in ("md5", "sha256"):
        expected = getattr(entry, algo)
        if expected is not None:
            if getattr(got, algo) == expected.lower():
                passed.append(algo)
            else:
                mismatches.append(f"{algo} {getattr(got, algo)} != expected {expected}")
    return passed, mismatches


def extract(archive: Path, out: Path) -> int:
    """Unpack a tar.gz into ``out``, refusing members that would land outside it; returns count.

    A marker in ``out/.extracted/`` makes a re-run skip archives already unpacked.
    """
    marker = out / ".extracted" / archive.name
    stamp = str(archive.stat().st_size)
    if marker.is_file() and marker.read_text() == stamp:
        return 0
    root = out.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            target = (root / member.name).resolve()
            if not target.is_relative_to(root) or member.issym() or member.islnk():
                raise DownloadError(f"{archive.name}: refusing unsafe member {member.name!r}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, members=members, filter="data")
        else:  # Python without PEP 706 filters; members were checked above
            tar.extractall(root, members=members)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(stamp)
    return sum(1 for m in members if m.isfile())


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str
    detail: str = ""
    ok: bool = True


def _url_for(entry: Entry, base_url: str | None) -> str | None:
    return f"{base_url.rstrip('/')}/{entry.name}" if base_url else entry.url


def process(
    entry: Entry,
    out: Path,
    *,
    base_url: str | None,
    check: bool,
    unpack: bool,
    retries: int,
    retry_wait_s: float,
    timeout_s: float,
    progress: bool,
) -> Outcome:
    """Fetch (unless present), verify and optionally extract one file."""
    dest = out / entry.name
    url = _url_for(entry, base_url)
    status = "present"
    for attempt in range(2):
        if not dest.exists():
            if url is None:
                return Outcome(
                    entry.name,
                    "skipped",
                    f"no direct link known: download it from "
                    f"{RELEASE_PAGE} into {out}, or give --base-url",
                    ok=True,
                )
            try:
                status = fetch(
                    url,
                    dest,
                    retries=retries,
                    retry_wait_s=retry_wait_s,
                    timeout_s=timeout_s,
                    progress=progress,
                )
            except DownloadError as error:
                return Outcome(entry.name, "failed", str(error), ok=False)
        if not check:
            verdict = "not verified (--no-verify)"
            break
        passed, mismatches = verify(dest, entry)
        if not mismatches:
            verdict = (
                f"verified: {', '.join(passed)}"
                if passed
                else ("unverified: no checksum known (pin one with --write-manifest)")
            )
            break
        corrupt = dest.with_name(dest.name + ".corrupt")
        dest.replace(corrupt)
        if status != "present" or attempt == 1 or url is None:
            return Outcome(
                entry.name, "corrupt", f"{'; '.join(mismatches)}; kept as {corrupt.name}", ok=False
            )
        # A file that was already there did not verify (say, another tool's truncated copy):
        # fetch it once afresh.
    if unpack and entry.is_archive:
        try:
            count = extract(dest, out)
        except (DownloadError, tarfile.TarError, OSError) as error:
            return Outcome(entry.name, status, f"{verdict}; extraction failed: {error}", ok=False)
        verdict += f"; extracted {count} files" if count else "; already extracted"
    return Outcome(entry.name, status, verdict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-triage download",
        description="Download NIH ChestX-ray14 (images_001-012.tar.gz, labels, official split) "
        "with resume and checksum verification.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder to download into"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        metavar="PART",
        help="all (default), images, metadata, archive numbers 1-12, file names",
    )
    parser.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help="a mirror holding the files under their names (BASE/NAME)",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSON manifest to use instead of the built-in one",
    )
    parser.add_argument(
        "--write-manifest",
        type=Path,
        default=None,
        metavar="FILE",
        help="after downloading, pin size/MD5/SHA-256 of the files into FILE",
    )
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check sizes and checksums the manifest knows (default: on)",
    )
    parser.add_argument(
        "--extract",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="unpack the archives into OUT (images/*.png)",
    )
    parser.add_argument(
        "--retries", type=int, default=5, metavar="N", help="retries per file (default: 5)"
    )
    parser.add_argument(
        "--retry-wait",
        type=float,
        default=2.0,
        dest="retry_wait_s",
        metavar="SECONDS",
        help="seconds before the first retry, doubling after each",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        dest="timeout_s",
        metavar="SECONDS",
        help="socket timeout in seconds",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=sys.stderr.isatty(),
        help="progress bars (tqdm)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the download; exit status 1 when any file failed or did not verify."""
    args = build_parser().parse_args(argv)
    entries = load_manifest(args.manifest) if args.manifest else DEFAULT_MANIFEST
    try:
        chosen = select(entries, args.parts)
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for entry in chosen:
        outcome = process(
            entry,
            args.out,
            base_url=args.base_url,
            check=args.verify,
            unpack=args.extract,
            retries=args.retries,
            retry_wait_s=args.retry_wait_s,
            timeout_s=args.timeout_s,
            progress=args.progress,
        )
        outcomes.append(outcome)
        print(f"{outcome.name:28s} {outcome.status:10s} {outcome.detail}", flush=True)
    if args.write_manifest:
        pinned = []
        for entry in chosen:
            path = args.out / entry.name
            if path.is_file():
                got = digest(path)
                entry = replace(entry, size=got.size, md5=got.md5, sha256=got.sha256)
            pinned.append(entry)
        write_manifest(args.write_manifest, pinned)
        print(f"manifest written: {args.write_manifest}")
    failed = [o.name for o in outcomes if not o.ok]
    if failed:
        print(f"{len(failed)} file(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
