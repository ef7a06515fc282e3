"""The real enhancer: warm GFPGAN + Real-ESRGAN behind `enhancer.api.Enhancer`.

    build_enhancer(settings, *, manifest=None) -> RealEnhancer

loads every model the settings' `needs` require from local files (manifest names under
settings.weights_dir, or .pth paths), picks device and precision, runs a warm-up inference per
model, and returns an object whose `enhance(image, params, progress)` is pure: nothing about
one call is stored on the object.

Profiles: faces (RetinaFace -> 5-point alignment -> GFPGAN per face -> paste back with a
ParseNet mask over a classically resized background), full (the same over a Real-ESRGAN
background), upscale (Real-ESRGAN only). The face glue is re-implemented here after facexlib's
FaceRestoreHelper (which keeps per-call state and downloads to a CWD-relative folder), and a
failed face raises instead of pasting the unrestored crop (GFPGANer prints and pastes).
"""
from __future__ import annotations

from enhancer import _compat  # noqa: F401

import contextlib
import copy
import ctypes
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import cv2
import numpy as np
import structlog
import torch

from enhancer import models, tiles, weights
from enhancer.api import EnhancerSettings, ModelInfo, Params, Result, mem_available
from enhancer.errors import (DeviceError, EnhanceError, OutOfMemoryError, UnsupportedError,
                             WeightsMissingError)

log = structlog.get_logger(__name__)

PARSER_MODEL = "parsenet"
GPU_TILE_BATCH = 4                  # tiles per forward pass on CUDA (a band's tiles, batched)
RESIZE_BAND = 1024                  # input rows/cols per band of the classic (faces) resize
TILE_FLOOR = 64
TILE_PAD = 32                       # overlap per side (capped at tile // 4)
MAX_FACES = 50
DETECT_MAX_SIDE = 1600
FACE_SIZE = 512
QUALITY_MIN_PSNR_DB = 40.0          # reduced precision kept only if this close to fp32
FACE_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936],
                          [256.63416, 314.01935], [201.26117, 371.41043],
                          [313.08905, 371.15118]], dtype=np.float32)
# ParseNet classes kept in the paste mask (facexlib's MASK_COLORMAP: face, brows, eyes, …)
PARSE_KEEP = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0], dtype=np.float32)
# Estimated peak bytes per input pixel at fp32 (RECIPES: RRDBNet x4 512² -> 4.4 GB).
BYTES_PER_INPUT_PX = {"rrdbnet-x4": 17_000, "rrdbnet-x2": 6_000, "srvgg-x4": 4_000}
PROFILE_ROLES = {"faces": ("face", "detector", "parser"),
                 "full": ("face", "detector", "parser", "background"),
                 "upscale": ("background",)}


@dataclass(frozen=True)
class LoadedModel:
    name: str
    arch: str
    sha256: str
    source: str
    path: Path
    module: torch.nn.Module
    precision: str          # what this model runs in: fp32 | bf16 | fp16
    cast: bool = False      # weights cast once to `precision` (else autocast per call)
    channels_last: bool = False
    fallback: torch.nn.Module | None = None    # the fp32 module, when `module` was cast
    details: models.ArchInfo | None = None     # user-brought checkpoints (spandrel)
    # builds the fp32 module again from its file, when `module` was cast and no resident
    # `fallback` is kept (saves a second full copy of the weights: GFPGAN 350 MB)
    reload: Callable[[], torch.nn.Module] | None = None

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, sha256=self.sha256, source=self.source,
                         details=self.details.as_dict() if self.details else None)

    @property
    def scale(self) -> int:
        return self.details.scale if self.details else models.ARCHS[self.arch].scale

    @property
    def family(self) -> str:
        """Architecture family for the calling convention (gfpgan-clean, GFPGAN, CodeFormer …)."""
        return self.details.architecture if self.details else self.arch


class _Passthrough(Exception):
    """Carries an exception raised by the caller's progress callback through our
    translation of library errors, so it reaches the caller unchanged."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


def _ping(progress: Callable[..., None] | None, **info) -> None:
    if progress is None:
        return
    try:
        progress(**info)
    except BaseException as exc:  # noqa: BLE001  (re-raised unchanged by enhance())
        raise _Passthrough(exc) from exc


# ------------------------------------------------------------------------ device, dtype

def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {setting!r} requested but CUDA is not available")
    return torch.device(setting)


# oneDNN ISAs with native bf16 dot products (its ONEDNN_MAX_CPU_ISA names, upper case)
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512",
                     "AVX10_2_512", "AVX2_VNNI_2", "DEFAULT", "ALL")


def cpu_has_native_bf16(environ: Mapping[str, str] | None = None) -> bool:
    """Whether bf16 convolutions run natively here: the CPU flags (avx512_bf16, amx_bf16) and
    what oneDNN is allowed to use. ONEDNN_MAX_CPU_ISA (read by oneDNN itself at start, e.g.
    AVX2) caps its kernels below the CPU's: bf16 is then emulated, ~100x slower, and `auto`
    must choose fp32 as on an AVX2-only CPU (scripts/bench --isa avx2 simulates one this way)."""
    env = os.environ if environ is None else environ
    cap = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    if cap and cap.strip().upper() not in _ONEDNN_BF16_ISAS:
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" in capability and "BF16" in capability:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_candidate(setting: str, device: torch.device) -> str:
    if setting == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if setting not in _DTYPES:
        raise ValueError(f"precision must be auto|fp32|bf16|fp16, got {setting!r}")
    if setting == "fp16" and device.type != "cuda":
        raise ValueError("fp16 runs only on CUDA (it fails on CPU); use bf16 or fp32")
    return setting


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def _forward(lm: LoadedModel, x: torch.Tensor, device: torch.device, precision: str,
             **kwargs) -> torch.Tensor:
    if lm.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if lm.cast:
        if precision == lm.precision:
            module = lm.module
        elif lm.fallback is not None:
            module = lm.fallback
        elif lm.reload is not None:      # rare (non-finite output): read the file again
            log.info("precision.reload_fp32", model=lm.name)
            module = lm.reload()
        else:
            module = lm.module
        out = module(x, **kwargs)
    else:
        with _autocast(device, precision):
            out = lm.module(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_model(lm: LoadedModel, x: torch.Tensor, device: torch.device, **kwargs) -> torch.Tensor:
    """One forward pass in the model's precision; non-finite output -> again in fp32."""
    out = _forward(lm, x, device, lm.precision, **kwargs).float()
    if lm.precision != "fp32" and not bool(torch.isfinite(out).all()):
        log.warning("precision.fallback", model=lm.name, precision=lm.precision)
        out = _forward(lm, x.float(), device, "fp32", **kwargs).float()
    if not bool(torch.isfinite(out).all()):
        raise EnhanceError(f"model {lm.name} produced non-finite output")
    return out


# Conv models whose speed gains from channels_last (oneDNN's NHWC kernels; measured in
# scripts/bench). Transformer SR models (SwinIR, HAT, DAT, OmniSR) reshape NCHW views: left alone.
CHANNELS_LAST_FAMILIES = frozenset({"rrdbnet-x4", "rrdbnet-x2", "srvgg-x4", "ESRGAN", "Compact",
                                    "SPAN", "RealCUGAN", "PLKSR", "parsenet"})


def _cast_inputs(module: torch.nn.Module, args: tuple) -> tuple | None:
    dtype = next(module.parameters(recurse=False)).dtype
    if not any(isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype
               for a in args):
        return None
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def prepare_module(module: torch.nn.Module, precision: str, *, channels_last: bool = True,
                   keep_fp32: int = 1) -> torch.nn.Module:
    """Make `module` fast once, at load time: channels_last memory format (conv models) and,
    for bf16/fp16, weights cast once to that dtype (instead of autocast casting them on every
    call). The first and last `keep_fp32` convolutions stay fp32: the quality loss of bf16 sits
    mostly there (RECIPES: 44 -> 47 dB on a real photo for ~4 % of the time). Every module
    holding parameters casts its floating inputs to its own dtype (a pre-hook), so any
    architecture's mix of fp32 ends and reduced-precision body works."""
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if precision == "fp32":
        return module
    dtype = _DTYPES[precision]
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    ends = set(map(id, convs[:keep_fp32] + convs[-keep_fp32:])) if keep_fp32 and convs else set()
    module = module.to(dtype)
    for m in module.modules():
        if id(m) in ends:
            m.float()
        if any(True for _ in m.parameters(recurse=False)):
            m.register_forward_pre_hook(lambda mod, args: _cast_inputs(mod, args))
    if ends and len(convs) > 1:
        # the first conv's output goes on in the body's dtype: a residual stream left in
        # fp32 (x + 0.2 * bf16 …) would make every conv cast its input (measured 7x slower)
        convs[0].register_forward_hook(
            lambda mod, args, out: out.to(dtype) if out.is_floating_point() else out)
    return module


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile (inductor) for a warm daemon: call once at warm-up, never per photo."""
    return torch.compile(module, dynamic=False)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def test_pattern(height: int, width: int) -> np.ndarray:
    """A deterministic photo-like float RGB pattern (gradients, edges, texture)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / max(width - 1, 1), y / max(height - 1, 1),
                    0.5 + 0.4 * np.sin(x / 3.0) * np.cos(y / 5.0)], axis=-1)
    img[height // 3: 2 * height // 3, width // 4: width // 2] *= 0.3
    return np.clip(img, 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------ upscale

def sr_callable(lm: LoadedModel, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """numpy HxWx3 float RGB -> numpy (H*s)x(W*s)x3 through an SR model. Inputs are padded
    (reflect) to the side multiple / minimum a model needs (window sizes) and cropped back."""
    multiple = max(2, lm.details.multiple_of) if lm.details else 2   # 2: pixel-unshuffle (x2)
    minimum = lm.details.minimum if lm.details else 0
    scale = lm.scale

    def fn(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        ph = max(minimum, -(-h // multiple) * multiple) - h
        pw = max(minimum, -(-w // multiple) * multiple) - w
        if ph or pw:
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)),
                         mode="reflect" if ph < h and pw < w else "edge")
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].to(device)
        out = run_model(lm, x, device)[..., :h * scale, :w * scale]
        return np.ascontiguousarray(out[0].clamp_(0, 1).permute(1, 2, 0).cpu().numpy())
    return fn


def upscale_array(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, scale: int,
                  tile: int, *, floor: int = TILE_FLOOR, pad: int = TILE_PAD,
                  progress: Callable[[], None] | None = None) -> tuple[np.ndarray, int]:
    """Run fn over image tile by tile; on CUDA out-of-memory halve the tile (from the whole
    image when tile = 0) down to `floor`, then raise OutOfMemoryError. Returns the output and
    the tile edge finally used. `fn` is injectable (tests pass one that raises OOM)."""
    h, w = image.shape[:2]
    ph, pw = h % 2, w % 2          # pixel-unshuffle models need even sizes
    padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect") if ph or pw else image
    t = tile
    while True:
        try:
            out = tiles.run_tiled(fn, padded, scale, t, pad, progress)
            return out[:h * scale, :w * scale], t
        except torch.cuda.OutOfMemoryError as exc:
            nxt = (max(h, w) if t == 0 else t) // 2
            nxt -= nxt % 2
            if nxt < floor:
                raise OutOfMemoryError(
                    f"out of memory even with {t or max(h, w)} px tiles (floor {floor})") from exc
            log.warning("upscale.oom_retry", tile=t, next_tile=nxt)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            t = nxt


def sr_batch_callable(lm: LoadedModel, device: torch.device, batch: int = 4
                      ) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """Many tiles -> their SR outputs, `batch` per forward pass. Tiles of a batch are padded
    (edge) to the batch's largest shape and cropped back. On CUDA: pinned host buffers,
    non-blocking copies on a side stream, so the upload of batch k+1 overlaps batch k's
    compute (cudnn.benchmark then sees few distinct shapes). On CPU the same code runs without
    pinning or streams (used by the tests; no speed gain there)."""
    single = sr_callable(lm, device)
    cuda = device.type == "cuda"
    scale = lm.scale

    def upload(group: list[np.ndarray], stream):
        hh = max(g.shape[0] for g in group) + max(g.shape[0] for g in group) % 2
        ww = max(g.shape[1] for g in group) + max(g.shape[1] for g in group) % 2
        host = torch.empty((len(group), 3, hh, ww), dtype=torch.float32, pin_memory=cuda)
        for i, g in enumerate(group):
            padded = np.pad(g, ((0, hh - g.shape[0]), (0, ww - g.shape[1]), (0, 0)), mode="edge")
            host[i].copy_(torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1))))
        if not cuda:
            return host
        with torch.cuda.stream(stream):
            return host.to(device, non_blocking=True)

    def fn_many(tiles_in: list[np.ndarray]) -> list[np.ndarray]:
        if lm.details and lm.details.multiple_of > 2:
            return [single(t) for t in tiles_in]        # window models: one at a time
        groups = [tiles_in[i:i + batch] for i in range(0, len(tiles_in), max(1, batch))]
        stream = torch.cuda.Stream(device) if cuda else None
        outs: list[np.ndarray] = []
        nxt = upload(groups[0], stream)
        for k, group in enumerate(groups):
            x = nxt
            if cuda:
                torch.cuda.current_stream(device).wait_stream(stream)
                x.record_stream(torch.cuda.current_stream(device))
            if k + 1 < len(groups):
                nxt = upload(groups[k + 1], stream)     # overlaps the forward below
            y = run_model(lm, x, device).clamp_(0, 1)
            if cuda:
                host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
                host.copy_(y, non_blocking=True)
                torch.cuda.current_stream(device).synchronize()
                y = host
            y = y.permute(0, 2, 3, 1).numpy()
            for i, g in enumerate(group):
                outs.append(np.ascontiguousarray(y[i, :g.shape[0] * scale, :g.shape[1] * scale]))
        return outs
    return fn_many


def stream_upscale(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, scale: int,
                   out: np.ndarray, tile: int, *, floor: int = TILE_FLOOR, pad: int = TILE_PAD,
                   progress: Callable[..., None] | None = None, many=None) -> int:
    """upscale_array, but the blended result goes, resampled to out's size, straight into the
    preallocated `out` (uint8/uint16/float32) band by band. Same OOM halving. Returns the tile
    edge finally used. `progress(tiles_done=i, tiles_total=n)` after each tile."""
    h, w = image.shape[:2]
    t = tile
    while True:
        try:
            n = len(tiles.plan_tiles(h, w, t, pad))
            done = iter(range(1, n + 1))
            tick = progress and (lambda: progress(tiles_done=next(done, n), tiles_total=n))
            tiles.stream_tiled(fn, image, scale, out, t, pad, tick, many=many)
            return t
        except torch.cuda.OutOfMemoryError as exc:
            nxt = (max(h, w) if t == 0 else t) // 2
            nxt -= nxt % 2
            if nxt < floor:
                raise OutOfMemoryError(
                    f"out of memory even with {t or max(h, w)} px tiles (floor {floor})") from exc
            log.warning("upscale.oom_retry", tile=t, next_tile=nxt)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            t = nxt


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc keeps what the load and the last
    photo freed: measured 370 MB after loading the faces models). Linux/glibc only; a no-op
    elsewhere."""
    with contextlib.suppress(OSError, AttributeError):     # no glibc: nothing to give back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = mem_available()
    if free is None:
        raise EnhanceError("cannot read MemAvailable from /proc/meminfo")
    return free


# CPU: more than this for a tile's activations buys no speed (time per pixel is flat from
# ~256² up, measured in scripts/bench) but pushes a 24 MP photo's peak RSS past 3 GB. fp32
# activations (CPUs without native bf16) are twice bf16's: a 24 MP `full` photo peaked at
# 3065 MB with 416 px x2plus tiles in fp32 (the upsampling tail holds 64 channels at 4× the
# tile's area); 384 px tiles take ~115 MB less for ~2 % more overlap. bf16 keeps 416.
CPU_TILE_BUDGET = {"fp32": 1_300_000_000, "bf16": 1_500_000_000}


def auto_tile(device: torch.device, arch: str, free_bytes: int | None = None,
              precision: str = "fp32") -> int:
    free = available_memory(device) if free_bytes is None else free_bytes
    cap = CPU_TILE_BUDGET["fp32" if precision == "fp32" else "bf16"]
    budget = free * 0.6 if device.type == "cuda" else min(free * 0.4, cap)
    t = int(math.sqrt(budget / BYTES_PER_INPUT_PX.get(arch, 17_000)))
    t = max(TILE_FLOOR, min(2048, t))
    return t - t % 32


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    shrink = height < image.shape[0] or width < image.shape[1]
    out = cv2.resize(image, (width, height),
                     interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)
    return np.clip(out, 0.0, 1.0)


# -------------------------------------------------------------------------------- faces

@dataclass(frozen=True)
class Face:
    score: float
    landmarks: np.ndarray    # (5, 2) in input pixels


def face_box(face: Face, w: int, h: int) -> tuple[float, float, float, float, float]:
    """The face's box relative to the image (0–1): the landmarks (eyes, nose, mouth corners) span
    about the inner half of a face, so their box is widened to the whole face."""
    lm = face.landmarks
    cx, cy = float(lm[:, 0].mean()), float(lm[:, 1].mean())
    side = 2.2 * max(float(np.ptp(lm[:, 0])), float(np.ptp(lm[:, 1])), 1.0)
    x0, x1 = max(0.0, cx - side / 2), min(float(w), cx + side / 2)
    y0, y1 = max(0.0, cy - side / 2), min(float(h), cy + side / 2)
    return (round(x0 / w, 4), round(y0 / h, 4), round(x1 / w, 4), round(y1 / h, 4), round(face.score, 4))


def detect_faces(det: LoadedModel, image: np.ndarray, device: torch.device,
                 threshold: float = 0.97) -> list[Face]:
    h, w = image.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    small = image if scale == 1.0 else cv2.resize(
        image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    bgr = np.ascontiguousarray(small[..., ::-1] * 255.0, dtype=np.float32)
    dets = det.module.detect_faces(bgr, conf_threshold=threshold)
    faces = []
    for row in dets:
        lm = np.asarray(row[5:15], dtype=np.float32).reshape(5, 2) / scale
        if np.linalg.norm(lm[0] - lm[1]) < 5:    # side or tiny faces (as GFPGANer)
            continue
        faces.append(Face(float(row[4]), lm))
    faces.sort(key=lambda f: -f.score)
    if len(faces) > MAX_FACES:
        log.warning("faces.capped", found=len(faces), kept=MAX_FACES)
        faces = faces[:MAX_FACES]
    return faces


def align_face(image: np.ndarray, face: Face) -> tuple[np.ndarray, np.ndarray] | None:
    affine = cv2.estimateAffinePartial2D(face.landmarks, FACE_TEMPLATE, method=cv2.LMEDS)[0]
    if affine is None:
        return None
    crop = cv2.warpAffine(image, affine, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(135 / 255, 133 / 255, 132 / 255))
    return crop, affine


# All faces of a photo go through the face model (and the parser) in one forward pass, up to
# a cap derived from memory. Peak bytes a forward pass adds per 512² face, measured on CPU
# (GFPGAN v1.4, ParseNet; scripts/bench --group and /proc/self/status VmHWM): with weights cast
# to bf16 once, GFPGAN 0.3–0.46 GB, ParseNet 0.13–0.16 GB; in fp32 (AVX2-only CPUs) GFPGAN
# 0.74–0.78 GB and ParseNet 0.38 GB plus 0.17 GB per pass (one face 0.54 GB, three 1.29 GB:
# the old "twice bf16" guess let a batch of three parses take a 2 MP photo to 2.96 GB). On
# CPU the cap is what binds: a face costs the same time alone or in a batch (1.4–1.5 s bf16,
# 2 cores), while each face in the batch adds its activations to the peak, and a 24 MP photo
# must stay under 3 GB RSS (models, input and runtime already hold ~1.6 GB) — so CPU batches
# hold what FACE_BUDGET_CPU allows. Faces run before the output buffer exists (RealEnhancer).
FACE_BYTES = {("face", "bf16"): 460_000_000, ("face", "fp32"): 800_000_000,
              ("parser", "bf16"): 160_000_000, ("parser", "fp32"): 420_000_000}
FACE_BUDGET_CPU = 1_000_000_000
MAX_FACE_BATCH = {"cpu": 16, "cuda": 16}


def face_batch(device: torch.device, role: str, precision: str = "fp32",
               free_bytes: int | None = None) -> int:
    """Faces per forward pass for `role` (face | parser): as many as the memory budget holds
    (CPU: min(40 % of free RAM, FACE_BUDGET_CPU); CUDA: half the free device memory). fp16
    activations are the size of bf16's."""
    per = FACE_BYTES[(role, "fp32" if precision == "fp32" else "bf16")]
    free = available_memory(device) if free_bytes is None else free_bytes
    budget = free * 0.5 if device.type == "cuda" else min(free * 0.4, FACE_BUDGET_CPU)
    return max(1, min(MAX_FACE_BATCH.get(device.type, 16), int(budget // per)))


def _face_call(lm: LoadedModel, fidelity: float) -> dict:
    """Keyword arguments of the face model's forward (families differ)."""
    if lm.family in ("gfpgan-clean", "GFPGAN"):
        return {"return_rgb": False, "randomize_noise": False}
    if lm.family == "CodeFormer":
        return {"weight": float(fidelity)}
    return {}


def _batches(items: list, size: int):
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + size]


def restore_faces(face: LoadedModel, crops: list[np.ndarray], device: torch.device, *,
                  fidelity: float = 0.5, batch: int | None = None,
                  progress: Callable[[], None] | None = None) -> list[np.ndarray]:
    """All aligned 512² crops of a photo through the face model, `batch` at a time (one
    forward pass for a group photo instead of one per face). float [0,1] in and out."""
    batch = batch or face_batch(device, "face", face.precision)
    kwargs = _face_call(face, fidelity)
    out: list[np.ndarray] = []
    for chunk in _batches(crops, batch):
        x = np.ascontiguousarray(np.stack([c.transpose(2, 0, 1) for c in chunk]))
        x = torch.from_numpy(x).to(device)
        y = run_model(face, (x - 0.5) / 0.5, device, **kwargs)
        y = ((y.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        out.extend(np.ascontiguousarray(r) for r in y)
        if progress:
            progress()
    return out


def restore_face(gfpgan: LoadedModel, crop: np.ndarray, device: torch.device) -> np.ndarray:
    """One face (kept for callers and the one-at-a-time baseline in scripts/bench)."""
    return restore_faces(gfpgan, [crop], device, batch=1)[0]


def _soft_mask(labels: np.ndarray) -> np.ndarray:
    mask = PARSE_KEEP[labels] * 255.0
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    border = 10
    mask[:border, :] = 0
    mask[-border:, :] = 0
    mask[:, :border] = 0
    mask[:, -border:] = 0
    return (mask / 255.0).astype(np.float32)


def face_masks(parser: LoadedModel, restored: list[np.ndarray], device: torch.device, *,
               batch: int | None = None) -> list[np.ndarray]:
    batch = batch or face_batch(device, "parser", parser.precision)
    out: list[np.ndarray] = []
    for chunk in _batches(restored, batch):
        x = np.ascontiguousarray(np.stack([r.transpose(2, 0, 1) for r in chunk]))
        x = torch.from_numpy(x).to(device)
        labels = run_model(parser, (x - 0.5) / 0.5, device).argmax(dim=1).cpu().numpy()
        out.extend(_soft_mask(lab) for lab in labels)
    return out


def face_mask(parser: LoadedModel, restored: np.ndarray, device: torch.device) -> np.ndarray:
    return face_masks(parser, [restored], device, batch=1)[0]


def _maxval(a: np.ndarray) -> float:
    return 255.0 if a.dtype == np.uint8 else 65535.0 if a.dtype == np.uint16 else 1.0


def paste_face(background: np.ndarray, restored: np.ndarray, mask: np.ndarray,
               affine: np.ndarray, sy: float, sx: float) -> np.ndarray:
    """Blend the restored face into `background` (float or uint8/uint16, changed in place and
    returned) over the face's bounding box only: a group photo at 24 MP pays per face for its
    box, not for two warps of the whole output."""
    oh, ow = background.shape[:2]
    inverse = cv2.invertAffineTransform(affine)
    inverse[0] *= sx
    inverse[1] *= sy
    inverse[0, 2] += 0.5 * sx - 0.5       # pixel centres: out = s * (in + 0.5) - 0.5
    inverse[1, 2] += 0.5 * sy - 0.5
    n = restored.shape[0]
    corners = np.array([[0, 0, 1], [n, 0, 1], [0, n, 1], [n, n, 1]], np.float64) @ inverse.T
    x0 = max(0, int(np.floor(corners[:, 0].min())) - 2)
    y0 = max(0, int(np.floor(corners[:, 1].min())) - 2)
    x1 = min(ow, int(np.ceil(corners[:, 0].max())) + 3)
    y1 = min(oh, int(np.ceil(corners[:, 1].max())) + 3)
    if x1 <= x0 or y1 <= y0:
        return background
    shifted = inverse.copy()
    shifted[0, 2] -= x0
    shifted[1, 2] -= y0
    size = (x1 - x0, y1 - y0)
    face = cv2.warpAffine(restored, shifted, size)
    m = cv2.warpAffine(mask, shifted, size, flags=cv2.INTER_AREA)[..., None]
    region = background[y0:y1, x0:x1]
    maxval = _maxval(background)
    base = region.astype(np.float32) / np.float32(maxval) if maxval != 1.0 else region
    blended = m * face + (1.0 - m) * base
    if maxval != 1.0:
        blended = np.clip(blended * np.float32(maxval) + np.float32(0.5), 0, maxval)
    background[y0:y1, x0:x1] = blended
    return background


# ----------------------------------------------------------------------------- enhancer

class RealEnhancer:
    """Built once by build_enhancer; `enhance` keeps nothing about a call on self."""

    def __init__(self, settings: EnhancerSettings, device: torch.device,
                 loaded: Mapping[str, LoadedModel], profiles: frozenset[str]):
        self._settings = settings
        self._device = device
        self._models = dict(loaded)
        self._profiles = profiles

    def model(self, role: str) -> LoadedModel | None:
        """The loaded model for a role (face, background, detector, parser), if any (probe.py)."""
        return self._models.get(role)

    def describe(self) -> dict:
        precisions = {lm.precision for r, lm in self._models.items()
                      if r in ("face", "background")}
        return {"device": str(self._device),
                "precision": "/".join(sorted(precisions)) or "fp32",
                "profiles": sorted(self._profiles),
                "models": [lm.info() for lm in self._models.values()],
                "precisions": {lm.name: lm.precision for lm in self._models.values()}}

    def _tile_for(self, params: Params, h: int, w: int) -> int:
        bg = self._models["background"]
        if params.tile is not None:
            t = params.tile
        elif self._settings.tile is not None:
            t = self._settings.tile
        else:
            t = auto_tile(self._device, bg.arch, precision=bg.precision)
            if self._device.type == "cpu":
                if h * w <= t * t:             # the whole image fits the activation budget:
                    t = 0                      # one tile, no overlap computed twice
                else:                          # the budget holds the padded tile (measured:
                    t = max(TILE_FLOOR, t - 2 * TILE_PAD)   # 12 MP full peaked 3.6 GB at 480+64)
        if params.attempt > 1:
            base = t if t > 0 else max(h, w)
            t = max(TILE_FLOOR, base // 2 ** (params.attempt - 1))
        return t

    def enhance(self, image: np.ndarray, params: Params,
                progress: Callable[[], None] | None = None) -> Result:
        try:
            return self._enhance(image, params, progress)
        except _Passthrough as p:
            raise p.exc from None
        except EnhanceError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemoryError(f"out of memory: {exc}") from exc
        except RuntimeError as exc:
            if "CUDA" in str(exc) or "cuda" in str(exc):
                raise DeviceError(f"device error: {exc}") from exc
            raise EnhanceError(f"inference failed: {exc}") from exc
        except (ValueError, cv2.error, MemoryError) as exc:
            raise EnhanceError(f"inference failed: {type(exc).__name__}: {exc}") from exc
        finally:
            release_free_memory()       # the next photo starts from the models' footprint

    def _enhance(self, image: np.ndarray, params: Params,
                 progress: Callable[[], None] | None) -> Result:
        if params.profile not in PROFILE_ROLES:
            raise UnsupportedError(f"unknown profile {params.profile!r}")
        missing = [r for r in PROFILE_ROLES[params.profile] if r not in self._models]
        if missing:
            raise EnhanceError(f"profile {params.profile!r} was not loaded (models for "
                               f"{', '.join(missing)} missing); add it to settings.needs")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.float32:
            raise UnsupportedError(f"expected float32 HxWx3, got {image.dtype} {image.shape}")
        if not params.upscale > 0:
            raise UnsupportedError(f"upscale must be > 0, got {params.upscale}")
        if params.bits not in (0, 8, 16):
            raise UnsupportedError(f"bits must be 0, 8 or 16, got {params.bits}")
        h, w = image.shape[:2]
        oh, ow = max(1, round(h * params.upscale)), max(1, round(w * params.upscale))
        dev = self._device
        timings: dict[str, float] = {}
        used_tile = 0
        faces_done = 0
        dtype = {0: np.float32, 8: np.uint8, 16: np.uint16}[params.bits]
        ping = progress and (lambda **info: _ping(progress, **info))
        with torch.inference_mode():
            # Faces first, pasted last: their models' activations peak before the output buffer
            # exists, and the tiles' activations after the face crops were let go (a 24 MP photo's
            # peak is the larger of the two stages, not their sum). The result is the same.
            boxes: list = []
            restored: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            if params.profile in ("faces", "full"):
                restored = self._restore(image, timings, progress, boxes)
            t0 = time.monotonic()
            if params.profile in ("full", "upscale"):
                bg = self._models["background"]
                tile = self._tile_for(params, h, w)
                background = np.empty((oh, ow, 3), dtype)
                many = sr_batch_callable(bg, dev, GPU_TILE_BATCH) if dev.type == "cuda" else None
                used_tile = stream_upscale(sr_callable(bg, dev), image, bg.scale, background, tile,
                                           progress=ping, many=many)
            elif params.bits == 0:
                background = resize_to(image, oh, ow)
            else:   # the classic resize, streamed into the integer output in bands
                background = np.empty((oh, ow, 3), dtype)
                tiles.stream_tiled(lambda x: x, image, 1, background, RESIZE_BAND, pad=8)
            timings["upscale"] = (time.monotonic() - t0) * 1000
            _ping(progress)
            if restored:
                t0 = time.monotonic()
                sy, sx = oh / h, ow / w
                while restored:                  # each face let go once it is in the output
                    face_img, mask, affine = restored.pop(0)
                    paste_face(background, face_img, mask, affine, sy, sx)
                    faces_done += 1
                    _ping(progress)
                timings["paste"] = (time.monotonic() - t0) * 1000
        if background.dtype == np.float32:
            background = np.clip(background, 0.0, 1.0, out=background)
        used = [lm for role, lm in self._models.items()
                if role in PROFILE_ROLES[params.profile]]
        prec = {lm.precision for lm in used if lm.arch not in ("parsenet",)
                and not lm.arch.startswith("retinaface")}
        return Result(image=background, faces=faces_done, models=[lm.info() for lm in used],
                      device=str(dev), precision="/".join(sorted(prec)) or "fp32",
                      tile=used_tile, timings_ms={k: round(v, 1) for k, v in timings.items()},
                      bits=params.bits, face_boxes=boxes)

    def _restore(self, image: np.ndarray, timings: dict[str, float],
                 progress: Callable[[], None] | None, boxes: list | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Detect, align, restore all faces in batches, parse: (face float32 512², mask, affine)
        per face, ready for paste_face onto the output. The boxes of the faces restored go into
        `boxes` (relative coordinates, see Result.face_boxes)."""
        dev = self._device
        h, w = image.shape[:2]
        t0 = time.monotonic()
        faces = detect_faces(self._models["detector"], image, dev)
        timings["detect"] = (time.monotonic() - t0) * 1000
        _ping(progress)
        t0 = time.monotonic()
        aligned = []
        for face in faces:
            got = align_face(image, face)
            if got is None:
                log.warning("faces.unalignable", score=face.score)
                continue
            aligned.append(got)
            if boxes is not None:
                boxes.append(face_box(face, w, h))
        if not aligned:
            timings["restore"] = (time.monotonic() - t0) * 1000
            return []
        crops = [c for c, _ in aligned]
        try:
            restored = restore_faces(self._models["face"], crops, dev,
                                     fidelity=self._settings.face_fidelity,
                                     progress=progress and (lambda: _ping(progress)))
        except (EnhanceError, _Passthrough):
            raise
        except Exception as exc:
            raise EnhanceError(f"face restoration failed: {exc}") from exc
        strength = float(self._settings.face_strength)
        masks = face_masks(self._models["parser"], restored, dev)
        out = []
        for crop, (_, affine), face_img, mask in zip(crops, aligned, restored, masks):
            if strength < 1.0:      # identity over beauty: part of the original face stays
                face_img = strength * face_img + (1.0 - strength) * crop
            out.append((face_img.astype(np.float32, copy=False), mask, affine))
        timings["restore"] = (time.monotonic() - t0) * 1000
        return out


# ---------------------------------------------------------------------------- building

def _resolve(ref: str, role: str, weights_dir: Path, manifest: Mapping[str, weights.WeightSpec]
             ) -> tuple[str, Path, str, str, str]:
    """(name, path, sha256, source, arch) for a manifest name or a .pth path."""
    if ref in manifest:
        path, digest, source = weights.require(ref, weights_dir, manifest)
        arch = manifest[ref].architecture
        if models.ARCHS[arch].role != role:
            raise EnhanceError(f"{ref} is a {models.ARCHS[arch].role} model, not a {role} model")
        return ref, path, digest, source, arch
    path = Path(ref).expanduser()
    if not path.is_file():
        raise WeightsMissingError(
            f"weights {ref}: not a manifest name and no such file — run "
            f"`photoenhanced weights fetch NAME` (names: {', '.join(sorted(manifest))})",
            missing=[ref])
    if role in ("face", "background"):
        return path.name, path, weights.sha256_file(path), "local", SPANDREL
    arch = models.guess_arch(models.read_state_dict(path), role)
    return path.name, path, weights.sha256_file(path), "local", arch


SPANDREL = "spandrel"       # _resolve's arch for a user's file: spandrel tells what it is


def _load(arch: str, path: Path, role: str, device: torch.device
          ) -> tuple[str, torch.nn.Module, models.ArchInfo | None]:
    if arch == SPANDREL:
        module, info = models.load_spandrel(path, role, device)
        return f"spandrel:{info.architecture}", module, info
    return arch, models.load_model(arch, path, device), None


def _reloader(arch: str, path: Path, role: str, device: torch.device
              ) -> Callable[[], torch.nn.Module]:
    """The fp32 module again, from its (already verified) file: the rare fallback of a cast
    model, so that no second full-precision copy stays in memory."""
    def reload() -> torch.nn.Module:
        return _load(arch, path, role, device)[1]
    return reload


def _quality(ref: np.ndarray, got: np.ndarray) -> float:
    lo, hi = float(ref.min()), float(ref.max())
    span = max(hi - lo, 1e-6)
    return psnr((ref - lo) / span, (got - lo) / span) if np.isfinite(got).all() else 0.0


def _choose_precision(lm: LoadedModel, candidate: str, device: torch.device, explicit: bool,
                      sample: torch.Tensor, *, cast: bool = False, compile: bool = False,
                      reload: Callable[[], torch.nn.Module] | None = None,
                      **kwargs) -> LoadedModel:
    """Warm up in fp32; in auto mode keep `candidate` only when it is close to fp32.
    cast=True: the candidate is a copy of the module prepared once (channels_last where it
    helps, weights cast to bf16/fp16 with the end convolutions in fp32); the fp32 module stays
    as the fallback for non-finite output. compile=True: torch.compile the module used, here,
    at warm-up (never per photo). reload: rebuilds the fp32 module from its file; given, the
    fp32 module is not kept beside the cast one. (TorchScript trace + freeze was measured too,
    scripts/bench: no faster than this eager module on CPU, and its first call per input shape
    costs tens of CPU seconds of profiling: not used.)"""
    ref = run_model(lm, sample, device, **kwargs).cpu().numpy()
    cl = cast and lm.family in CHANNELS_LAST_FAMILIES
    if candidate == "fp32" and not cl and not compile:
        return lm
    trial = lm
    if cl or (cast and candidate != "fp32"):
        try:
            fast = prepare_module(copy.deepcopy(lm.module), candidate, channels_last=cl)
            trial = LoadedModel(**{**lm.__dict__, "module": fast, "precision": candidate,
                                   "cast": True, "channels_last": cl,
                                   "fallback": None if reload else lm.module, "reload": reload})
            got = run_model(trial, sample, device, **kwargs).cpu().numpy()
        except (RuntimeError, TypeError) as exc:     # an architecture that will not cast
            if explicit:
                raise EnhanceError(f"{lm.name}: {candidate} failed: {exc}") from exc
            log.info("precision.cast_failed", model=lm.name, precision=candidate,
                     error=str(exc)[:200])
            return lm
    elif candidate != "fp32":
        trial = LoadedModel(**{**lm.__dict__, "precision": candidate})
        got = _forward(trial, sample, device, candidate, **kwargs).float().cpu().numpy()
    else:
        got = ref
    if candidate != "fp32" and not explicit:
        quality = _quality(ref, got)
        keep = quality >= QUALITY_MIN_PSNR_DB
        log.info("precision.checked", model=lm.name, precision=candidate,
                 psnr_db=round(quality, 1), kept=keep)
        if not keep:
            return lm
    if compile:
        t0 = time.monotonic()
        trial = LoadedModel(**{**trial.__dict__, "module": compile_module(trial.module)})
        run_model(trial, sample, device, **kwargs)
        log.info("model.compiled", model=lm.name, ms=round((time.monotonic() - t0) * 1000))
    return trial


def build_enhancer(settings: EnhancerSettings, *,
                   manifest: Mapping[str, weights.WeightSpec] | None = None) -> RealEnhancer:
    started = time.monotonic()
    manifest = manifest if manifest is not None else weights.load_manifest()
    weights_dir = Path(settings.weights_dir)
    profiles = frozenset(p for p, _ in settings.needs)
    unknown = profiles - set(PROFILE_ROLES)
    if unknown:
        raise UnsupportedError(f"unknown profile(s) in needs: {sorted(unknown)}")
    roles = sorted({r for p in profiles for r in PROFILE_ROLES[p]})
    refs = {"face": settings.face_model, "background": settings.background_model,
            "detector": settings.detector_model, "parser": PARSER_MODEL}

    resolved, missing, reasons = {}, [], []
    for role in roles:
        try:
            resolved[role] = _resolve(refs[role], role, weights_dir, manifest)
        except WeightsMissingError as exc:
            missing += exc.missing
            reasons.append(str(exc).split(" — ")[0])
    if missing:
        raise WeightsMissingError(
            f"weights missing or unverified: {'; '.join(reasons)} — run "
            f"`photoenhanced weights fetch {' '.join(missing)}`", missing=missing)

    device = resolve_device(settings.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    else:       # tiles come in few fixed shapes: let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = True
    candidate = precision_candidate(settings.precision, device)
    explicit = settings.precision != "auto"

    loaded: dict[str, LoadedModel] = {}
    with torch.inference_mode():
        for role in roles:
            name, path, digest, source, arch = resolved[role]
            t0 = time.monotonic()
            try:
                arch, module, details = _load(arch, path, role, device)
            except models.CheckpointError as exc:
                if source == "local":    # the user's own file: fetching will not help
                    raise UnsupportedError(f"weights {name}: {exc}") from exc
                raise WeightsMissingError(f"weights {name}: {exc} — run `photoenhanced "
                                          f"weights fetch {name}`", missing=[name]) from exc
            lm = LoadedModel(name, arch, digest, source, path, module, "fp32", details=details)
            reload = _reloader(resolved[role][4], path, role, device)
            del module
            if role == "background":
                multiple = max(2, details.multiple_of if details else 1)
                side = max(48, details.minimum if details else 0, multiple)
                side = -(-side // multiple) * multiple
                sample = torch.from_numpy(test_pattern(side, side).transpose(2, 0, 1).copy())[None]
                lm = _choose_precision(lm, candidate, device, explicit, sample.to(device),
                                       cast=True, compile=settings.compile, reload=reload)
            elif role == "face":
                sample = torch.from_numpy(test_pattern(512, 512).transpose(2, 0, 1).copy())[None]
                lm = _choose_precision(lm, candidate, device, explicit,
                                       ((sample - 0.5) / 0.5).to(device), cast=True,
                                       reload=reload, **_face_call(lm, settings.face_fidelity))
            elif role == "parser":     # only its argmax is used: bf16 + channels_last (auto)
                sample = torch.from_numpy(test_pattern(512, 512).transpose(2, 0, 1).copy())[None]
                lm = _choose_precision(lm, candidate, device, explicit,
                                       ((sample - 0.5) / 0.5).to(device), cast=True,
                                       reload=reload)
            else:   # detector
                lm.module.detect_faces(np.full((64, 64, 3), 128.0, np.float32), conf_threshold=0.97)
            loaded[role] = lm
            log.info("model.loaded", role=role, name=name, arch=arch, source=source,
                     precision=lm.precision, ms=round((time.monotonic() - t0) * 1000))
    release_free_memory()
    enhancer = RealEnhancer(settings, device, loaded, profiles)
    log.info("enhancer.ready", device=str(device), profiles=sorted(profiles),
             ms=round((time.monotonic() - started) * 1000))
    return enhancer
