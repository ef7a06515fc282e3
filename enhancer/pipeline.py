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
from enhancer.api import EnhancerSettings, ModelInfo, Params, Result
from enhancer.errors import (DeviceError, EnhanceError, OutOfMemoryError, UnsupportedError,
                             WeightsMissingError)

log = structlog.get_logger(__name__)

PARSER_MODEL = "parsenet"
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

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, sha256=self.sha256, source=self.source)


class _Passthrough(Exception):
    """Carries an exception raised by the caller's progress callback through our
    translation of library errors, so it reaches the caller unchanged."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


def _ping(progress: Callable[[], None] | None) -> None:
    if progress is None:
        return
    try:
        progress()
    except BaseException as exc:  # noqa: BLE001  (re-raised unchanged by enhance())
        raise _Passthrough(exc) from exc


# ------------------------------------------------------------------------ device, dtype

def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {setting!r} requested but CUDA is not available")
    return torch.device(setting)


def cpu_has_native_bf16() -> bool:
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
    with _autocast(device, precision):
        out = lm.module(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_model(lm: LoadedModel, x: torch.Tensor, device: torch.device, **kwargs) -> torch.Tensor:
    """One forward pass in the model's precision; non-finite output -> again in fp32."""
    out = _forward(lm, x, device, lm.precision, **kwargs).float()
    if lm.precision != "fp32" and not bool(torch.isfinite(out).all()):
        log.warning("precision.fallback", model=lm.name, precision=lm.precision)
        out = _forward(lm, x, device, "fp32", **kwargs).float()
    if not bool(torch.isfinite(out).all()):
        raise EnhanceError(f"model {lm.name} produced non-finite output")
    return out


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
    """numpy HxWx3 float RGB -> numpy (H*s)x(W*s)x3 through an SR model."""
    def fn(img: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].to(device)
        out = run_model(lm, x, device)
        return out[0].clamp_(0, 1).permute(1, 2, 0).cpu().numpy()
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


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise EnhanceError("cannot read MemAvailable from /proc/meminfo")


def auto_tile(device: torch.device, arch: str, free_bytes: int | None = None) -> int:
    free = available_memory(device) if free_bytes is None else free_bytes
    budget = free * (0.6 if device.type == "cuda" else 0.4)
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


def restore_face(gfpgan: LoadedModel, crop: np.ndarray, device: torch.device) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))[None].to(device)
    x = (x - 0.5) / 0.5
    out = run_model(gfpgan, x, device, return_rgb=False, randomize_noise=False)
    return ((out[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


def face_mask(parser: LoadedModel, restored: np.ndarray, device: torch.device) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(restored.transpose(2, 0, 1)))[None].to(device)
    out = run_model(parser, (x - 0.5) / 0.5, device)
    labels = out.argmax(dim=1)[0].cpu().numpy()
    mask = PARSE_KEEP[labels] * 255.0
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    border = 10
    mask[:border, :] = 0
    mask[-border:, :] = 0
    mask[:, :border] = 0
    mask[:, -border:] = 0
    return (mask / 255.0).astype(np.float32)


def paste_face(background: np.ndarray, restored: np.ndarray, mask: np.ndarray,
               affine: np.ndarray, sy: float, sx: float) -> np.ndarray:
    oh, ow = background.shape[:2]
    inverse = cv2.invertAffineTransform(affine)
    inverse[0] *= sx
    inverse[1] *= sy
    inverse[0, 2] += 0.5 * sx - 0.5       # pixel centres: out = s * (in + 0.5) - 0.5
    inverse[1, 2] += 0.5 * sy - 0.5
    face = cv2.warpAffine(restored, inverse, (ow, oh))
    m = cv2.warpAffine(mask, inverse, (ow, oh), flags=cv2.INTER_AREA)[..., None]
    return m * face + (1.0 - m) * background


# ----------------------------------------------------------------------------- enhancer

class RealEnhancer:
    """Built once by build_enhancer; `enhance` keeps nothing about a call on self."""

    def __init__(self, settings: EnhancerSettings, device: torch.device,
                 loaded: Mapping[str, LoadedModel], profiles: frozenset[str]):
        self._settings = settings
        self._device = device
        self._models = dict(loaded)
        self._profiles = profiles

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
            t = auto_tile(self._device, bg.arch)
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
        h, w = image.shape[:2]
        oh, ow = max(1, round(h * params.upscale)), max(1, round(w * params.upscale))
        dev = self._device
        timings: dict[str, float] = {}
        used_tile = 0
        faces_done = 0
        with torch.inference_mode():
            if params.profile in ("full", "upscale"):
                t0 = time.monotonic()
                bg = self._models["background"]
                tile = self._tile_for(params, h, w)
                scale = models.ARCHS[bg.arch].scale
                native, used_tile = upscale_array(sr_callable(bg, dev), image, scale, tile,
                                                  progress=progress and (lambda: _ping(progress)))
                background = resize_to(native, oh, ow)
                timings["upscale"] = (time.monotonic() - t0) * 1000
            else:
                t0 = time.monotonic()
                background = resize_to(image, oh, ow)
                timings["upscale"] = (time.monotonic() - t0) * 1000
            _ping(progress)
            if params.profile in ("faces", "full"):
                t0 = time.monotonic()
                faces = detect_faces(self._models["detector"], image, dev)
                timings["detect"] = (time.monotonic() - t0) * 1000
                _ping(progress)
                t0 = time.monotonic()
                sy, sx = oh / h, ow / w
                for face in faces:
                    aligned = align_face(image, face)
                    if aligned is None:
                        log.warning("faces.unalignable", score=face.score)
                        continue
                    crop, affine = aligned
                    try:
                        restored = restore_face(self._models["face"], crop, dev)
                    except EnhanceError:
                        raise
                    except Exception as exc:
                        raise EnhanceError(f"face restoration failed: {exc}") from exc
                    mask = face_mask(self._models["parser"], restored, dev)
                    background = paste_face(background, restored, mask, affine, sy, sx)
                    faces_done += 1
                    _ping(progress)
                timings["restore"] = (time.monotonic() - t0) * 1000
        out = np.clip(background, 0.0, 1.0).astype(np.float32, copy=False)
        used = [lm for role, lm in self._models.items()
                if role in PROFILE_ROLES[params.profile]]
        prec = {lm.precision for lm in used if lm.arch not in ("parsenet",)
                and not lm.arch.startswith("retinaface")}
        return Result(image=out, faces=faces_done, models=[lm.info() for lm in used],
                      device=str(dev), precision="/".join(sorted(prec)) or "fp32",
                      tile=used_tile, timings_ms={k: round(v, 1) for k, v in timings.items()})


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
    arch = models.guess_arch(models.read_state_dict(path), role)
    return path.name, path, weights.sha256_file(path), "local", arch


def _choose_precision(lm: LoadedModel, candidate: str, device: torch.device, explicit: bool,
                      sample: torch.Tensor, **kwargs) -> LoadedModel:
    """Warm up in fp32; in auto mode keep `candidate` only when it is close to fp32."""
    ref = run_model(lm, sample, device, **kwargs).cpu().numpy()
    if candidate == "fp32":
        return lm
    trial = LoadedModel(**{**lm.__dict__, "precision": candidate})
    if explicit:
        run_model(trial, sample, device, **kwargs)      # warm the reduced path too
        return trial
    got = _forward(trial, sample, device, candidate, **kwargs).float().cpu().numpy()
    lo, hi = float(ref.min()), float(ref.max())
    span = max(hi - lo, 1e-6)
    quality = psnr((ref - lo) / span, (got - lo) / span) if np.isfinite(got).all() else 0.0
    keep = quality >= QUALITY_MIN_PSNR_DB
    log.info("precision.checked", model=lm.name, precision=candidate, psnr_db=round(quality, 1),
             kept=keep)
    return trial if keep else lm


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
    candidate = precision_candidate(settings.precision, device)
    explicit = settings.precision != "auto"

    loaded: dict[str, LoadedModel] = {}
    with torch.inference_mode():
        for role in roles:
            name, path, digest, source, arch = resolved[role]
            t0 = time.monotonic()
            try:
                module = models.load_model(arch, path, device)
            except models.CheckpointError as exc:
                raise WeightsMissingError(f"weights {name}: {exc} — run `photoenhanced "
                                          f"weights fetch {name}`", missing=[name]) from exc
            lm = LoadedModel(name, arch, digest, source, path, module, "fp32")
            if role == "background":
                sample = torch.from_numpy(test_pattern(48, 48).transpose(2, 0, 1).copy())[None]
                lm = _choose_precision(lm, candidate, device, explicit, sample.to(device))
            elif role == "face":
                sample = torch.from_numpy(test_pattern(512, 512).transpose(2, 0, 1).copy())[None]
                lm = _choose_precision(lm, candidate, device, explicit,
                                       ((sample - 0.5) / 0.5).to(device),
                                       return_rgb=False, randomize_noise=False)
            elif role == "parser":
                run_model(lm, torch.zeros(1, 3, 512, 512, device=device), device)
            else:   # detector
                lm.module.detect_faces(np.full((64, 64, 3), 128.0, np.float32), conf_threshold=0.97)
            loaded[role] = lm
            log.info("model.loaded", role=role, name=name, arch=arch, source=source,
                     precision=lm.precision, ms=round((time.monotonic() - t0) * 1000))
    enhancer = RealEnhancer(settings, device, loaded, profiles)
    log.info("enhancer.ready", device=str(device), profiles=sorted(profiles),
             ms=round((time.monotonic() - started) * 1000))
    return enhancer
