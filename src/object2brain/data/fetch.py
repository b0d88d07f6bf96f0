"""Download FindingEmo's images from their published URLs (``object2brain findingemo fetch``).

FindingEmo (Mertens et al.) is distributed as annotations plus URLs: the PyPI package
``findingemo-light`` ships

- ``findingemo_light/data/annotations_single.ann``: the annotation CSV; column ``image_path`` is
  the image's path relative to the image root, with a leading ``/``
  (``/Run_2/Loving toddlers sports/haiti-kids.jpg``);
- ``findingemo_light/data/dataset_urls_exploded.json``: a JSON list of records ``{"rel_path":
  <image_path>, "idx_url": <1-based rank of this alternative>, "url": <address>}``; an image has
  one record per alternative URL (the package's list: 25,623 images, 60,554 records, up to 58
  alternatives; some alternatives are already Wayback Machine copies).

The package's own downloader (``findingemo_light/paper/download_multi.py``) walks the records in
file order, which lists an image's alternatives by ascending ``idx_url``, stops at the first URL
that answers, and writes the file to ``<target>/<rel_path split on '/'>``; after a failed URL it
asks the Wayback Machine's availability API (``https://archive.org/wayback/available``) for the
closest snapshot and fetches the raw copy (the snapshot address with ``if_`` appended to its
timestamp). It keeps any existing file without looking at it and never checks that the bytes are
an image.

:func:`fetch_findingemo` writes the same layout (``out / rel_path`` without the leading ``/``,
which is what ``train-head --findingemo ANNOTATIONS --image-root OUT`` reads) and differs in that:

- every image of the annotation file is fetched (an image without any listed URL is a failure,
  ``no URL listed``), each trying its alternatives in ascending ``idx_url``;
- downloads run on a thread pool (``workers``) with at most ``per_host`` concurrent requests per
  host, a socket timeout (``timeout`` seconds, per connection and per read), and ``retries``
  retries with exponential backoff (``backoff * 2**attempt`` seconds, plus up to 25 % jitter) for
  transient failures (timeouts, connection errors, HTTP 429 and 5xx); HTTP 4xx and content that
  is not an image move on to the next URL at once;
- every download is decoded in full with Pillow before it is kept (an HTML error page saved as
  ``.jpg`` or a truncated JPEG is rejected), written to a hidden temporary name
  (``.<name>.<random>.o2b-part``) in the target folder and renamed into place atomically;
- a rerun keeps every existing file that decodes in full and fetches only missing or damaged ones;
- ``out/manifest.csv`` lists every image on disk: ``rel_path`` (without the leading ``/``),
  ``url`` (the address it came from; empty for a file found on disk with no earlier manifest
  entry), ``sha256`` and ``bytes``; ``out/failures.csv`` lists the images not obtained:
  ``rel_path``, ``n_tried``, ``tried_urls`` (JSON list, in the order tried) and ``reason`` (each
  URL's failure, ``; ``-separated);
- Ctrl-C (``KeyboardInterrupt``) stops the pool promptly: queued images are dropped, running
  downloads are abandoned at their next chunk, temporary files are removed, the manifest and the
  failure list of what was done so far are written, and the interrupt is raised again;
- the Wayback Machine fallback is opt-in (``archive_fallback=True``) and is tried only after all
  listed URLs failed, for each listed URL that is not already an archive address.

Tested against a local HTTP server built from the package's formats; the package's full URL list
was not downloaded here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import secrets
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from PIL import Image

from object2brain.errors import DataError
from object2brain.io import atomic_path
from object2brain.options import FetchOptions, OptionsError, resolve_options

log = logging.getLogger(__name__)

PACKAGE = "findingemo_light"
URLS_FILE = "dataset_urls_exploded.json"
ANNOTATIONS_FILE = "annotations_single.ann"
MANIFEST_NAME = "manifest.csv"
FAILURES_NAME = "failures.csv"
PART_SUFFIX = ".o2b-part"
WAYBACK_API = "https://archive.org/wayback/available"
USER_AGENT = "Mozilla/5.0 (compatible; object2brain-findingemo-fetch)"
MAX_BYTES = 64 * 1024 * 1024
CHUNK = 64 * 1024
MANIFEST_COLUMNS = ("rel_path", "url", "sha256", "bytes")
FAILURE_COLUMNS = ("rel_path", "n_tried", "tried_urls", "reason")


@dataclass(frozen=True)
class FetchResult:
    """Outcome of :func:`fetch_findingemo`.

    Attributes:
        fetched: images downloaded (and verified) by this call.
        present: images already on disk that decode in full (kept, not downloaded).
        failed: images that could not be obtained (listed in ``failures``).
        manifest: ``out/manifest.csv`` (every image on disk: rel_path, url, sha256, bytes).
        failures: ``out/failures.csv`` (rel_path, n_tried, tried_urls, reason).
        interrupted: the run was stopped by Ctrl-C before every image was tried.
    """

    fetched: int
    present: int
    failed: int
    manifest: Path
    failures: Path
    interrupted: bool = False

    def summary(self) -> str:
        """One line: ``fetched N, already present M, failed K (failures: PATH)``."""
        text = f"fetched {self.fetched}, already present {self.present}, failed {self.failed}"
        if self.failed:
            text += f" (failures: {self.failures})"
        return text + (" [interrupted]" if self.interrupted else "")


@dataclass(frozen=True)
class ImageJob:
    """One image to obtain: ``rel_path`` (POSIX, no leading ``/``) and its URLs in order."""

    rel_path: str
    urls: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """What happened to one image: ``status`` is ``fetched``, ``present`` or ``failed``."""

    rel_path: str
    status: str
    url: str = ""
    sha256: str = ""
    size: int = 0
    tried: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    """How to download: timeouts (s), retries of transient failures, backoff base (s)."""

    timeout: float
    retries: int
    backoff: float
    archive_fallback: bool


class _TransientError(Exception):
    """A failure worth retrying (timeout, connection error, HTTP 429/5xx)."""


class _StoppedError(Exception):
    """The run was interrupted."""


# --- inputs ---------------------------------------------------------------------------------


def package_file(name: str) -> Path:
    """A data file of the installed ``findingemo-light`` package (``DataError`` if absent)."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the package findingemo-light is not installed (pip install findingemo-light), so "
            f"its {name} is unavailable; pass the file explicitly"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise DataError(f"{path}: not found in the installed findingemo-light package")
    return path


def read_url_list(path: Path) -> dict[str, list[str]]:
    """``rel_path`` (leading ``/`` dropped) -> URLs in ascending ``idx_url`` (file order on ties)
    from a JSON list of records ``{rel_path, idx_url, url}``; a record with an empty ``url`` is
    skipped."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON URL list ({exc})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of {{rel_path, idx_url, url}} records")
    ranked: dict[str, list[tuple[float, int, str]]] = {}
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not (
            isinstance(record.get("rel_path"), str)
            and record["rel_path"]
            and isinstance(record.get("url"), str)
        ):
            raise DataError(f"{path}: record {number} lacks a 'rel_path' or 'url' string")
        if not record["url"].strip():
            continue  # the package lists three images with an empty URL
        rank = record.get("idx_url", 0)
        if not isinstance(rank, int | float):
            raise DataError(f"{path}: record {number} has a non-numeric 'idx_url' {rank!r}")
        key = record["rel_path"].lstrip("/")
        ranked.setdefault(key, []).append((float(rank), number, record["url"].strip()))
    return {key: [url for _, _, url in sorted(entries)] for key, entries in ranked.items()}


def read_annotation_paths(path: Path) -> list[str]:
    """The distinct ``image_path`` values of an annotation CSV (leading ``/`` dropped), in order."""
    try:
        table = pd.read_csv(path, usecols=["image_path"], dtype=str, keep_default_na=False)
    except ValueError as exc:
        raise DataError(f"{path}: needs an 'image_path' column ({exc})") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not a readable annotation CSV ({exc})") from None
    paths = [p.strip().lstrip("/") for p in table["image_path"] if p.strip()]
    return list(dict.fromkeys(paths))


def _safe(rel_path: str) -> bool:
    """A relative path that stays under the output folder."""
    parts = PurePosixPath(rel_path).parts
    return bool(parts) and not PurePosixPath(rel_path).is_absolute() and ".." not in parts


# --- one image ------------------------------------------------------------------------------


def verify_image(data: bytes) -> str:
    """``""`` if ``data`` decodes in full as an image, else the reason it does not."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Image.DecompressionBombError as exc:
        return f"image too large ({exc})"
    except Exception as exc:  # PIL raises many types for bad data
        head = data[:200].lstrip().lower()
        if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
            return "not an image (an HTML/XML page)"
        if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
            return f"damaged image ({exc})"
        return f"not a decodable image ({type(exc).__name__}: {exc})"
    return ""


class _HostSlots:
    """A semaphore per host: at most ``limit`` concurrent requests to one host."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.slots: dict[str, threading.Semaphore] = {}

    @contextlib.contextmanager
    def hold(self, url: str, stop: threading.Event) -> Iterator[None]:
        host = urllib.parse.urlsplit(url).netloc.lower()
        with self.lock:
            slot = self.slots.setdefault(host, threading.Semaphore(self.limit))
        while not slot.acquire(timeout=0.2):
            if stop.is_set():
                raise _StoppedError
        try:
            yield
        finally:
            slot.release()


def _download(url: str, policy: Policy, stop: threading.Event) -> bytes:
    """The body of ``url``; raises ``_TransientError`` (retry), ``_StoppedError`` or ValueError."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout) as response:
            chunks: list[bytes] = []
            total = 0
            while chunk := response.read(CHUNK):
                if stop.is_set():
                    raise _StoppedError
                total += len(chunk)
                if total > MAX_BYTES:
                    raise ValueError(f"larger than {MAX_BYTES // 2**20} MiB")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        if exc.code == 429 or exc.code >= 500:
            raise _TransientError(f"HTTP {exc.code}") from None
        raise ValueError(f"HTTP {exc.code}") from None
    except TimeoutError:
        raise _TransientError(f"timeout after {policy.timeout:g} s") from None
    except (urllib.error.URLError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise _TransientError(f"timeout after {policy.timeout:g} s") from None
        raise _TransientError(f"connection error ({reason})") from None


def _try_url(url: str, policy: Policy, slots: _HostSlots, stop: threading.Event) -> bytes | str:
    """The verified image bytes of ``url``, or the reason (after retries) it failed."""
    reason = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            delay = policy.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
            if stop.wait(delay):
                raise _StoppedError
        try:
            with slots.hold(url, stop):
                data = _download(url, policy, stop)
        except _TransientError as exc:
            reason = str(exc)
            continue
        except ValueError as exc:
            return str(exc)
        problem = verify_image(data)
        return problem if problem else data
    return f"{reason} ({policy.retries + 1} attempts)"


def _wayback_url(url: str, policy: Policy, slots: _HostSlots, stop: threading.Event) -> str:
    """The raw-content address of the closest Wayback Machine snapshot of ``url``, or ``""``."""
    query = f"{WAYBACK_API}?{urllib.parse.urlencode({'url': url})}"
    try:
        with slots.hold(query, stop):
            answer = json.loads(_download(query, policy, stop))
        closest = str(answer["archived_snapshots"]["closest"]["url"])
    except (_TransientError, ValueError, KeyError, TypeError):
        return ""
    # .../web/<timestamp>/<original> -> .../web/<timestamp>if_/<original> (raw bytes, no banner)
    head, sep, tail = closest.partition("/web/")
    stamp, slash, rest = tail.partition("/")
    if not sep or not slash or stamp.endswith("if_"):
        return closest
    return f"{head}/web/{stamp}if_/{rest}"


def _store(target: Path, data: bytes) -> None:
    """Write ``data`` to a hidden temporary name next to ``target``, then rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}{PART_SUFFIX}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _existing(target: Path) -> bytes | None:
    """The bytes of ``target`` if it exists and decodes in full as an image."""
    if not target.is_file():
        return None
    try:
        data = target.read_bytes()
    except OSError:
        return None
    return None if verify_image(data) else data


def _fetch_one(
    job: ImageJob, out: Path, policy: Policy, slots: _HostSlots, stop: threading.Event
) -> Outcome:
    """Obtain one image: keep a good existing file, else try each URL (then the archive)."""
    if stop.is_set():
        raise _StoppedError
    target = out.joinpath(*PurePosixPath(job.rel_path).parts)
    data = _existing(target)
    if data is not None:
        sha = hashlib.sha256(data).hexdigest()
        return Outcome(job.rel_path, "present", sha256=sha, size=len(data))
    tried: list[str] = []
    reasons: list[str] = []
    candidates = list(job.urls)
    fallback_done = False
    while candidates:
        url = candidates.pop(0)
        result = _try_url(url, policy, slots, stop)
        tried.append(url)
        if isinstance(result, bytes):
            _store(target, result)
            sha = hashlib.sha256(result).hexdigest()
            return Outcome(job.rel_path, "fetched", url, sha, len(result), tuple(tried))
        reasons.append(result)
        if not candidates and policy.archive_fallback and not fallback_done:
            fallback_done = True
            for original in job.urls:
                if "web.archive.org" not in urllib.parse.urlsplit(original).netloc:
                    archived = _wayback_url(original, policy, slots, stop)
                    if archived and archived not in tried:
                        candidates.append(archived)
    if not job.urls:
        reasons.append("no URL listed")
    return Outcome(job.rel_path, "failed", tried=tuple(tried), reasons=tuple(reasons))


# --- the run --------------------------------------------------------------------------------


def _remove_partials(out: Path) -> int:
    """Delete temporary files left by an earlier run that was killed; return how many."""
    removed = 0
    for part in out.rglob(f".*{PART_SUFFIX}"):
        with contextlib.suppress(OSError):
            part.unlink()
            removed += 1
    return removed


def _previous_urls(manifest: Path) -> dict[str, str]:
    """``rel_path -> url`` of an earlier manifest (empty if none or unreadable)."""
    if not manifest.is_file():
        return {}
    try:
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return {}
    if not {"rel_path", "url"} <= set(table.columns):
        return {}
    return dict(zip(table["rel_path"], table["url"], strict=True))


def _write_reports(
    out: Path, outcomes: list[Outcome], previous: dict[str, str]
) -> tuple[Path, Path]:
    """Write ``manifest.csv`` (images on disk) and ``failures.csv``, each atomically."""
    kept = [o for o in outcomes if o.status != "failed"]
    kept_paths = {o.rel_path for o in kept}
    manifest = pd.DataFrame(
        [(o.rel_path, o.url or previous.get(o.rel_path, ""), o.sha256, o.size) for o in kept],
        columns=list(MANIFEST_COLUMNS),
    ).sort_values("rel_path", kind="stable")
    failed = [o for o in outcomes if o.status == "failed" and o.rel_path not in kept_paths]
    failures = pd.DataFrame(
        [
            (o.rel_path, len(o.tried), json.dumps(list(o.tried)), "; ".join(o.reasons))
            for o in failed
        ],
        columns=list(FAILURE_COLUMNS),
    ).sort_values("rel_path", kind="stable")
    paths = (out / MANIFEST_NAME, out / FAILURES_NAME)
    for frame, path in zip((manifest, failures), paths, strict=True):
        with atomic_path(path) as temp:
            frame.to_csv(temp, index=False)
    return paths


def plan_jobs(
    urls: dict[str, list[str]], image_paths: list[str]
) -> tuple[list[ImageJob], list[str]]:
    """One job per annotated image (its URLs in order) and the image paths that are unsafe
    (absolute, or leaving the output folder with ``..``)."""
    jobs, unsafe = [], []
    for rel_path in image_paths:
        if not _safe(rel_path):
            unsafe.append(rel_path)
            continue
        jobs.append(ImageJob(rel_path, tuple(urls.get(rel_path, ()))))
    return jobs, unsafe


def fetch_findingemo(
    out: Path,
    *,
    urls: Path | None = None,
    annotations: Path | None = None,
    options: FetchOptions | None = None,
    progress: bool = True,
    on_outcome: Callable[[Outcome], None] | None = None,
    **option_values: Any,
) -> FetchResult:
    """Download every image of a FindingEmo annotation file into ``out`` (see module docstring).

    Args:
        out: image root; image ``/Run_1/a/b.jpg`` is written to ``out/Run_1/a/b.jpg``.
        urls: URL list (JSON records ``rel_path``, ``idx_url``, ``url``); default: the
            ``findingemo-light`` package's ``dataset_urls_exploded.json``.
        annotations: annotation CSV with ``image_path``; default: the package's
            ``annotations_single.ann``. Only its images are fetched.
        options: :class:`~object2brain.options.FetchOptions` (workers, timeout, retries,
            per_host, backoff, archive_fallback); ``option_values`` override its fields. A
            transient failure (timeout, connection error, HTTP 429/5xx) is retried after
            ``backoff * 2**k`` s (+ up to 25 % jitter) before retry k+1.
        progress: show a progress bar and print the summary line to stderr.
        on_outcome: called in the calling thread after each image is settled (for callers that
            report elsewhere; an exception raised here, e.g. ``KeyboardInterrupt``, stops the
            run like Ctrl-C).

    Returns:
        :class:`FetchResult` with the counts and the two report files.

    Raises:
        DataError: unreadable URL list or annotation file, bad arguments.
        KeyboardInterrupt: re-raised after an interrupted run has written its reports.
    """
    try:
        settings = resolve_options(FetchOptions, options, **option_values)
    except OptionsError as exc:
        raise DataError(f"fetch_findingemo: {exc}") from None
    url_file = Path(urls) if urls is not None else package_file(URLS_FILE)
    ann_file = Path(annotations) if annotations is not None else package_file(ANNOTATIONS_FILE)
    jobs, unsafe = plan_jobs(read_url_list(url_file), read_annotation_paths(ann_file))
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if removed := _remove_partials(out):
        log.info("%s: removed %d temporary file(s) of an interrupted run", out, removed)
    previous = _previous_urls(out / MANIFEST_NAME)
    outcomes = [
        Outcome(p, "failed", reasons=("unsafe path (absolute or with '..')",)) for p in unsafe
    ]
    policy = Policy(settings.timeout, settings.retries, settings.backoff, settings.archive_fallback)
    interrupted = False
    try:
        _run_pool(
            jobs, out, policy, settings.workers, settings.per_host, progress, outcomes, on_outcome
        )
    except KeyboardInterrupt:
        interrupted = True
    manifest, failures = _write_reports(out, outcomes, previous)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("fetched", "present", "failed")}
    result = FetchResult(
        counts["fetched"], counts["present"], counts["failed"], manifest, failures, interrupted
    )
    log.info("findingemo fetch into %s: %s", out, result.summary())
    if progress:
        print(f"findingemo fetch: {result.summary()}", file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt
    return result


def _run_pool(
    jobs: list[ImageJob],
    out: Path,
    policy: Policy,
    workers: int,
    per_host: int,
    progress: bool,
    outcomes: list[Outcome],
    on_outcome: Callable[[Outcome], None] | None,
) -> None:
    """Run the jobs on a thread pool, appending to ``outcomes`` as each settles. On
    ``KeyboardInterrupt`` (from Ctrl-C or ``on_outcome``), stop the workers, wait for them to
    drop their downloads, record what finished meanwhile, and re-raise."""
    from tqdm import tqdm

    stop = threading.Event()
    slots = _HostSlots(per_host)
    bar = tqdm(total=len(jobs), unit="img", disable=not progress, desc="findingemo fetch")
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="findingemo-fetch")
    futures: list[Future[Outcome]] = []
    recorded: set[Future[Outcome]] = set()
    try:
        futures = [pool.submit(_fetch_one, job, out, policy, slots, stop) for job in jobs]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                outcomes.append(future.result())
                recorded.add(future)
                bar.update(1)
                if on_outcome is not None:
                    on_outcome(outcomes[-1])
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        for future in futures:
            settled = future.done() and not future.cancelled() and future.exception() is None
            if settled and future not in recorded:
                outcomes.append(future.result())
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
