"""`photoenhanced enhance IN OUT`: the same steps as the daemon, once, without a queue. The input is
never moved or changed; results and sidecars are written durably (temp name, fsync, rename)."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import structlog

from enhancer import imageio
from enhancer.errors import EnhanceError, WeightsMissingError
from .config import Config
from .logs import say
from .discover import READ_EXTENSIONS
from . import names, sidecar as sidecar_mod
from .publish import Publisher, atomic_write
from .worker import _DecodeFailed, prepare, render

log = structlog.get_logger(__name__)


def _inputs(src: Path) -> list[tuple[Path, str]]:
    if src.is_file():
        return [(src, src.name)]
    out = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith(".") and f.rsplit(".", 1)[-1].lower() in READ_EXTENSIONS:
                p = Path(root) / f
                out.append((p, p.relative_to(src).as_posix()))
    return out


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def enhance_paths(cfg: Config, src: Path, dst: Path, profile: str | None, upscale: float | None,
                  factory=None) -> int:
    if not src.exists():
        say(f"photoenhanced: {src} does not exist")
        return 2
    items = _inputs(src)
    if not items:
        say(f"photoenhanced: no photos in {src}")
        return 1
    enh_cfg = replace(cfg.enhance, profile=profile or cfg.enhance.profile, upscale=upscale or cfg.enhance.upscale,
                      folders=())
    cfg = replace(cfg, enhance=enh_cfg)
    if factory is None:
        from .daemon import default_factory as factory
    try:
        enhancer = factory(cfg.enhancer_settings())
    except WeightsMissingError as exc:
        say(f"photoenhanced: {exc}")
        return 1
    limits = imageio.Limits(max_input_megapixels=cfg.enhance.max_input_megapixels,
                            max_output_megapixels=cfg.enhance.max_output_megapixels)
    single = src.is_file()
    failures = 0
    from tqdm import tqdm
    bar = tqdm(items, unit="photo", file=sys.stderr, disable=len(items) < 2 and not sys.stderr.isatty())
    for path, rel in bar:
        bar.set_postfix_str(names.safe(rel[-40:]))
        t0 = time.perf_counter()
        try:
            data = path.read_bytes()
            prep = prepare(data, path.name, cfg, limits, enh_cfg.profile, enh_cfg.upscale, "", 1)
            r = render(data, path.name, prep, enhancer, limits, cfg.enhance.jpeg_quality, lambda **_: None,
                       provenance=cfg.enhance.provenance)
        except (_DecodeFailed, EnhanceError, OSError) as exc:
            err = exc.__cause__ if isinstance(exc, _DecodeFailed) else exc
            failures += 1
            say(f"photoenhanced: {names.display(rel)}: {getattr(err, 'kind', 'internal')}: {names.safe(str(err))}")
            continue
        if single and not (dst.is_dir() or str(dst).endswith(os.sep)):
            out = dst
        else:
            out = dst / Path(rel).parent / prep.result_name
            if out.exists():
                out = Publisher.free_name(out.parent, out.name)
        r.timings["total"] = round((time.perf_counter() - t0) * 1000, 1)
        st = path.stat()
        sidecar = sidecar_mod.build("done", job=None, path=str(path), size=st.st_size,
                                    sha256=hashlib.sha256(data).hexdigest(), now=time.time(), info=prep.info,
                                    eff=prep.eff, timings=r.timings)
        sidecar.update(r.sidecar_extra)
        sidecar["metadata"] = sidecar_mod.metadata_block(r.notes)
        sidecar["outputs"][0]["path"] = str(out)
        _write(out, r.data)
        _write(Path(str(out) + ".json"), sidecar_mod.render(sidecar))
        log.info("enhance.done", input=str(path), output=str(out), faces=r.faces, ms=r.timings["total"])
    bar.close()
    return 1 if failures else 0
