"""Seeded-random checkpoints with exactly the published files' layout (keys, shapes, wrapper
key), written where the real files would be, plus a manifest that names them. They load
through the product's own code path (enhancer.models / enhancer.pipeline).

    make_checkpoint(arch, path, seed=0) -> str (sha256 of the file)
    make_weights_dir(weights_dir, names, seed=0, real=("retinaface-mobile0.25",)) -> manifest

`real` names are produced by the product's offline conversions (enhancer.weights.fetch with
the converter source), so they are the real weights: the mobilenet0.25 detector (0.2 s) and
realesrgan-x4plus (2 s).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

import torch

from enhancer import models, weights


def make_checkpoint(arch: str, path: str | Path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    module = models.ARCHS[arch].build()
    if arch == "gfpgan-clean":
        # PyTorch's default init makes the StyleGAN decoder's output blow up to ±1 saturation;
        # shrink the weights so the random model gives a mid-grey, finite face.
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(0.5)
    torch.save(models.make_checkpoint(arch, module.state_dict()), path)
    return weights.sha256_file(path)


def make_weights_dir(weights_dir: str | Path, names: Iterable[str], seed: int = 0,
                     real: Iterable[str] = ("retinaface-mobile0.25",),
                     manifest: dict | None = None) -> dict[str, weights.WeightSpec]:
    """Fill weights_dir and return a manifest whose sha256 values match these files (real
    names keep their pinned converted source)."""
    base = manifest or weights.load_manifest()
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    real = set(real)
    out = dict(base)
    for name in names:
        spec = base[name]
        if name in real:
            converted = [s for s in spec.sources if s.converter]
            rows = weights.fetch(weights_dir, [name], sources=[s.name for s in converted],
                                 manifest=base)
            assert rows[0]["ok"], rows
            continue
        digest = make_checkpoint(spec.architecture, weights_dir / spec.file, seed)
        source = weights.Source(name="test-random", sha256=digest,
                                bytes=(weights_dir / spec.file).stat().st_size,
                                url="http://127.0.0.1:9/never")
        out[name] = dataclasses.replace(spec, sources=(source,))
    return out
