"""FindingEmo fetcher against a local HTTP server: good, missing, HTML, truncated, slow and
second-URL images; reruns, damaged files on disk, Ctrl-C, the archive fallback. No internet."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from object2brain.data import fetch
from object2brain.data.fetch import FetchResult, Outcome, fetch_findingemo, verify_image


def _jpeg(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class _Site:
    """What the server answers: path -> (status, content type, body, delay in s)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, str, bytes, float]] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    def add(
        self,
        path: str,
        body: bytes,
        *,
        status: int = 200,
        kind: str = "image/jpeg",
        delay: float = 0.0,
    ) -> None:
        self.routes[path] = (status, kind, body, delay)


@pytest.fixture
def site() -> Iterator[tuple[_Site, str]]:
    state = _Site()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path
            with state.lock:
                state.hits[path.split("?")[0]] += 1
            status, kind, body, delay = state.routes.get(
                path.split("?")[0] if path.startswith("/wayback") else path,
                (404, "text/html", b"<html>not found</html>", 0.0),
            )
            if path.startswith("/wayback"):
                status, kind, body, delay = state.routes["/wayback/available"]
            time.sleep(delay)
            try:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the client gave up (timeout test)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda *args: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _lists(
    tmp_path: Path, records: list[tuple[str, int, str]], extra: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """A URL list (records rel_path, idx_url, url) and an annotation CSV naming every image."""
    urls = tmp_path / "urls.json"
    urls.write_text(json.dumps([{"rel_path": r, "idx_url": i, "url": u} for r, i, u in records]))
    paths = list(dict.fromkeys([r for r, _, _ in records] + list(extra)))
    table = pd.DataFrame(
        {"index": range(len(paths)), "image_path": paths, "valence": 0, "arousal": 1}
    )
    annotations = tmp_path / "annotations.ann"
    table.to_csv(annotations, index=False)
    return urls, annotations


def _run(out: Path, urls: Path, annotations: Path, **kwargs: Any) -> FetchResult:
    options: dict[str, Any] = dict(
        workers=4, timeout=0.5, retries=1, per_host=3, backoff=0.01, progress=False
    )
    options.update(kwargs)
    return fetch_findingemo(out, urls=urls, annotations=annotations, **options)


def test_fetch_keeps_good_images_and_lists_failures(
    tmp_path: Path, site: tuple[_Site, str]
) -> None:
    server, base = site
    good = {f"/Run_1/Happy kids/img{i}.jpg": _jpeg(i) for i in range(4)}
    for i, body in enumerate(good.values()):
        server.add(f"/good{i}.jpg", body)
    server.add("/html.jpg", b"<!DOCTYPE html><html><body>Moved</body></html>", kind="text/html")
    server.add("/trunc.jpg", _jpeg(9, size=160)[:1500])
    server.add("/slow.jpg", _jpeg(10), delay=1.5)
    server.add("/second.jpg", _jpeg(11))
    records = [(rel, 1, f"{base}/good{i}.jpg") for i, rel in enumerate(good)]
    records += [
        ("/Run_2/a b/missing.jpg", 1, f"{base}/gone.jpg"),
        ("/Run_2/a b/page.jpg", 1, f"{base}/html.jpg"),
        ("/Run_2/a b/cut.jpg", 1, f"{base}/trunc.jpg"),
        ("/Run_2/a b/slow.jpg", 1, f"{base}/slow.jpg"),
        ("/Run_2/a b/second.jpg", 2, f"{base}/second.jpg"),  # listed out of order on purpose
        ("/Run_2/a b/second.jpg", 1, f"{base}/gone2.jpg"),
    ]
    urls, annotations = _lists(tmp_path, records, extra=("/Run_3/unlisted.jpg",))
    out = tmp_path / "images"

    result = _run(out, urls, annotations)

    assert (result.fetched, result.present, result.failed) == (5, 0, 5)
    for rel, body in good.items():
        assert (out / rel.lstrip("/")).read_bytes() == body
    assert (out / "Run_2/a b/second.jpg").read_bytes() == server.routes["/second.jpg"][2]
    for name in ("missing", "page", "cut", "slow"):
        assert not (out / f"Run_2/a b/{name}.jpg").exists()
    assert not list(out.rglob("*.o2b-part"))
    # the second URL is tried only after the first (idx_url 1) failed
    assert server.hits["/gone2.jpg"] == 1 and server.hits["/second.jpg"] == 1

    manifest = pd.read_csv(result.manifest, keep_default_na=False)
    assert list(manifest.columns) == ["rel_path", "url", "sha256", "bytes"]
    row = manifest.set_index("rel_path").loc["Run_2/a b/second.jpg"]
    assert row["url"] == f"{base}/second.jpg"
    assert row["sha256"] == hashlib.sha256(server.routes["/second.jpg"][2]).hexdigest()
    assert row["bytes"] == len(server.routes["/second.jpg"][2])

    failures = pd.read_csv(result.failures, keep_default_na=False).set_index("rel_path")
    assert list(failures.columns) == ["n_tried", "tried_urls", "reason"]
    assert failures.loc["Run_2/a b/missing.jpg", "reason"] == "HTTP 404"
    assert "not an image" in failures.loc["Run_2/a b/page.jpg", "reason"]
    assert "damaged image" in failures.loc["Run_2/a b/cut.jpg", "reason"]
    assert "timeout" in failures.loc["Run_2/a b/slow.jpg", "reason"]
    assert failures.loc["Run_3/unlisted.jpg", "reason"] == "no URL listed"
    assert json.loads(failures.loc["Run_2/a b/slow.jpg", "tried_urls"]) == [f"{base}/slow.jpg"]
    assert server.hits["/slow.jpg"] == 2  # one retry after the timeout
    assert server.hits["/gone.jpg"] == 1  # a 404 is not retried
    assert result.summary().startswith("fetched 5, already present 0, failed 5")

    # rerun: nothing new is downloaded; a damaged file on disk is fetched again
    before = server.hits.copy()
    (out / "Run_1/Happy kids/img0.jpg").write_bytes(b"<html>oops</html>")
    again = _run(out, urls, annotations)
    assert (again.fetched, again.present, again.failed) == (1, 4, 5)
    assert server.hits["/good0.jpg"] == before["/good0.jpg"] + 1
    for i in range(1, 4):
        assert server.hits[f"/good{i}.jpg"] == before[f"/good{i}.jpg"]
    assert server.hits["/second.jpg"] == before["/second.jpg"]
    kept = pd.read_csv(again.manifest, keep_default_na=False).set_index("rel_path")
    assert kept.loc["Run_2/a b/second.jpg", "url"] == f"{base}/second.jpg"  # from last manifest


def test_interrupt_keeps_everything_fetched(tmp_path: Path, site: tuple[_Site, str]) -> None:
    server, base = site
    bodies = {f"/Run_1/set/img{i:02d}.jpg": _jpeg(i) for i in range(16)}
    for i, body in enumerate(bodies.values()):
        server.add(f"/img{i}.jpg", body, delay=0.05)
    records = [(rel, 1, f"{base}/img{i}.jpg") for i, rel in enumerate(bodies)]
    urls, annotations = _lists(tmp_path, records)
    out = tmp_path / "images"
    seen: list[Outcome] = []

    def hook(outcome: Outcome) -> None:
        seen.append(outcome)
        if len(seen) == 3:
            raise KeyboardInterrupt

    (out / "Run_1/set").mkdir(parents=True)
    (out / "Run_1/set/.img00.jpg.dead.o2b-part").write_bytes(b"partial")  # an earlier kill
    with pytest.raises(KeyboardInterrupt):
        _run(out, urls, annotations, workers=2, per_host=2, on_outcome=hook)

    assert not list(out.rglob("*.o2b-part"))
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg"))
    assert sorted(manifest["rel_path"]) == on_disk  # every kept file is listed, none lost
    assert 3 <= len(on_disk) < len(bodies)
    for rel, sha in zip(manifest["rel_path"], manifest["sha256"], strict=True):
        data = (out / rel).read_bytes()
        assert data == bodies["/" + rel] and hashlib.sha256(data).hexdigest() == sha

    hits = server.hits.copy()
    result = _run(out, urls, annotations)
    assert (result.fetched, result.present, result.failed) == (16 - len(on_disk), len(on_disk), 0)
    for i, rel in enumerate(bodies):
        assert server.hits[f"/img{i}.jpg"] == hits[f"/img{i}.jpg"] + (
            rel.lstrip("/") not in on_disk
        )


def test_archive_fallback_is_opt_in(
    tmp_path: Path, site: tuple[_Site, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, base = site
    original = "http://example.org/pics/lost.jpg"
    snapshot = f"{base}/web/20200101000000/{original}"
    server.add(
        "/wayback/available",
        json.dumps({"archived_snapshots": {"closest": {"url": snapshot}}}).encode(),
        kind="application/json",
    )
    server.add(f"/web/20200101000000if_/{original}", _jpeg(3))
    monkeypatch.setattr(fetch, "WAYBACK_API", f"{base}/wayback/available")
    urls, annotations = _lists(tmp_path, [("/Run_1/x/lost.jpg", 1, f"{base}/lost.jpg")])
    out = tmp_path / "images"

    assert _run(out, urls, annotations).failed == 1
    assert server.hits["/wayback/available"] == 0
    result = _run(out, urls, annotations, archive_fallback=True)
    assert (result.fetched, result.failed) == (1, 0)
    manifest = pd.read_csv(result.manifest, keep_default_na=False)
    assert manifest["url"].tolist() == [f"{base}/web/20200101000000if_/{original}"]


def test_verify_image_and_package_defaults() -> None:
    assert verify_image(_jpeg(1)) == ""
    assert "not an image" in verify_image(b"<html><body>404</body></html>")
    assert "damaged" in verify_image(_jpeg(2, size=160)[:1200])
    urls = fetch.read_url_list(fetch.package_file(fetch.URLS_FILE))
    paths = fetch.read_annotation_paths(fetch.package_file(fetch.ANNOTATIONS_FILE))
    assert len(paths) > 20000 and not paths[0].startswith("/")
    assert sum(p in urls for p in paths[:200]) > 150


def test_cli_fetch_with_options_from_the_options_model(
    tmp_path: Path, site: tuple[_Site, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``object2brain findingemo fetch``: flags generated from FetchOptions; a bad value is one
    error line (exit 2); a run prints the summary and a rerun fetches nothing new."""
    from object2brain.cli import main

    server, base = site
    server.add("/a.jpg", _jpeg(1))
    urls, annotations = _lists(
        tmp_path,
        [("/Run_1/x/a.jpg", 1, f"{base}/a.jpg"), ("/Run_1/x/b.jpg", 1, f"{base}/none.jpg")],
    )
    out = tmp_path / "images"
    argv = ["findingemo", "fetch", "--out", str(out), "--urls", str(urls)]
    argv += ["--annotations", str(annotations), "--workers", "2", "--timeout", "2", "--quiet"]
    with pytest.raises(SystemExit) as bad:
        main([*argv[:-1], "--retries", "-1"])
    assert bad.value.code == 2
    assert "retries" in capsys.readouterr().err
    main(argv)
    assert "fetched 1, already present 0, failed 1" in capsys.readouterr().out
    assert (out / "Run_1" / "x" / "a.jpg").read_bytes() == _jpeg(1)
    main(argv)
    assert "fetched 0, already present 1, failed 1" in capsys.readouterr().out
