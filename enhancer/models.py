"""Model architectures and loading: exact published layouts, local files only.

Every checkpoint is read with ``torch.load(path, map_location="cpu", weights_only=True)`` and
loaded with ``load_state_dict(strict=True)``; nothing here downloads (facexlib's
``init_detection_model``/``init_parsing_model`` and GFPGANer, which would, are bypassed).
"""
from __future__ import annotations

from enhancer import _compat  # noqa: F401  (must precede basicsr/gfpgan/realesrgan/facexlib)

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# architecture key -> (builder, the key the published checkpoint wraps its state dict in)
#   GFPGAN and Real-ESRGAN RRDB releases: {"params_ema": sd}; realesr-general-x4v3:
#   {"params": sd}; facexlib's detector/parser files: the bare state dict (the r50 one with
#   "module." prefixes, stripped as facexlib does).


def _gfpgan_clean() -> torch.nn.Module:
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

    return GFPGANv1Clean(out_size=512, num_style_feat=512, channel_multiplier=2,
                         decoder_load_path=None, fix_decoder=False, num_mlp=8,
                         input_is_latent=True, different_w=True, narrow=1, sft_half=True)


def _rrdbnet(scale: int) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from basicsr.archs.rrdbnet_arch import RRDBNet

        return RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32,
                       scale=scale)
    return build


def _srvgg_x4() -> torch.nn.Module:
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    return SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=32, upscale=4,
                           act_type="prelu")


def _retinaface(network: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from facexlib.detection.retinaface import RetinaFace

        return RetinaFace(network_name=network, half=False, phase="test", device="cpu")
    return build


def _parsenet() -> torch.nn.Module:
    from facexlib.parsing.parsenet import ParseNet

    return ParseNet(in_size=512, out_size=512, parsing_ch=19)


@dataclass(frozen=True)
class Arch:
    key: str
    build: Callable[[], torch.nn.Module]
    wrap: str | None          # checkpoint wrapper key of the published file, None = bare
    role: str                 # face | background | detector | parser
    scale: int = 1


ARCHS: dict[str, Arch] = {a.key: a for a in (
    Arch("gfpgan-clean", _gfpgan_clean, "params_ema", "face"),
    Arch("rrdbnet-x4", _rrdbnet(4), "params_ema", "background", 4),
    Arch("rrdbnet-x2", _rrdbnet(2), "params_ema", "background", 2),
    Arch("srvgg-x4", _srvgg_x4, "params", "background", 4),
    Arch("retinaface-resnet50", _retinaface("resnet50"), None, "detector"),
    Arch("retinaface-mobile0.25", _retinaface("mobile0.25"), None, "detector"),
    Arch("parsenet", _parsenet, None, "parser"),
)}


class CheckpointError(ValueError):
    """A local file is not a checkpoint of the expected architecture."""


def read_state_dict(path: str | Path) -> dict:
    """The state dict inside a checkpoint file (unwrapping params_ema/params, 'module.')."""
    try:
        if str(path).lower().endswith(".safetensors"):     # no pickle at all
            from safetensors.torch import load_file

            ckpt = load_file(str(path), device="cpu")
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # torch raises many types (UnpicklingError, RuntimeError, …)
        raise CheckpointError(f"{path}: not a loadable weights-only checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: checkpoint is a {type(ckpt).__name__}, not a dict")
    for key in ("params_ema", "params"):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    return {(k[7:] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def guess_arch(state_dict: dict, role: str) -> str:
    """Architecture of a user-given .pth from its keys (for settings that name a path)."""
    if role == "face":
        return "gfpgan-clean"
    if role == "parser":
        return "parsenet"
    if role == "detector":
        return "retinaface-resnet50" if any(k.startswith("body.layer1") for k in state_dict) \
            else "retinaface-mobile0.25"
    if "conv_first.weight" in state_dict:
        in_ch = state_dict["conv_first.weight"].shape[1]
        if in_ch == 3:
            return "rrdbnet-x4"
        if in_ch == 12:
            return "rrdbnet-x2"
        raise CheckpointError(f"RRDBNet with {in_ch} input channels is not supported")
    if "body.0.weight" in state_dict:
        return "srvgg-x4"
    raise CheckpointError("cannot tell the background model's architecture from its keys")


def load_model(arch_key: str, path: str | Path, device: torch.device) -> torch.nn.Module:
    """Build `arch_key`, load `path` strictly, move to device, eval mode."""
    arch = ARCHS[arch_key]
    state_dict = read_state_dict(path)
    model = arch.build()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit {arch_key}: {exc}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model = model.to(device)
    if arch_key.startswith("retinaface"):
        model.device = device                                # facexlib reads these in
        model.mean_tensor = model.mean_tensor.to(device)     # detect_faces
    return model


def make_checkpoint(arch_key: str, state_dict: dict) -> dict:
    """Wrap a state dict the way the published file of this architecture is laid out."""
    wrap = ARCHS[arch_key].wrap
    return {wrap: state_dict} if wrap else dict(state_dict)


# ------------------------------------------------------------------ models people bring

# Licence of the architecture's code and of its usual published weights, for the sidecar. The
# weights a user brings may carry their own terms; this says what the architecture is known by.
LICENCES: dict[str, str] = {
    "ESRGAN": "Apache-2.0 (ESRGAN/BasicSR); community weights (4x-UltraSharp …) have their own terms",
    "RealESRGAN": "BSD-3-Clause (Real-ESRGAN)",
    "Compact": "BSD-3-Clause (Real-ESRGAN SRVGGNetCompact)",
    "SwinIR": "Apache-2.0 (SwinIR)",
    "HAT": "Apache-2.0 (HAT)",
    "DAT": "Apache-2.0 (DAT)",
    "OmniSR": "MIT (Omni-SR)",
    "GFPGAN": "Apache-2.0 (GFPGAN code); parts of the published weights follow NVIDIA StyleGAN2 terms",
    "RestoreFormer": "Apache-2.0 (RestoreFormer)",
    "CodeFormer": "S-Lab License 1.0 — NON-COMMERCIAL use only (CodeFormer)",
}
SPANDREL_ROLES = {"SR": "background", "Restoration": "background", "FaceSR": "face"}
FACE_ARCHS = ("GFPGAN", "RestoreFormer", "CodeFormer")   # the face calls pipeline.py knows


@dataclass(frozen=True)
class ArchInfo:
    """What a user-given checkpoint turned out to be (goes into the sidecar)."""

    loader: str               # "photoenhanced" | "spandrel"
    architecture: str         # spandrel's id (ESRGAN, SwinIR, …) or one of ARCHS
    scale: int
    licence: str
    tags: tuple[str, ...] = ()
    multiple_of: int = 1      # input sides must be multiples of this (window sizes); we pad
    minimum: int = 0          # smallest input side the model takes

    def as_dict(self) -> dict:
        return {"loader": self.loader, "architecture": self.architecture, "scale": self.scale,
                "licence": self.licence, "tags": list(self.tags)}


def spandrel_registry():
    """spandrel's permissive registry plus spandrel_extra_arches (CodeFormer …) when that is
    installed, as a private registry (spandrel's global one is left alone)."""
    import spandrel

    reg = spandrel.ArchRegistry()
    reg.add(*spandrel.MAIN_REGISTRY)
    try:
        import spandrel_extra_arches
    except ImportError:
        return reg
    reg.add(*spandrel_extra_arches.EXTRA_REGISTRY, ignore_duplicates=True)
    return reg


def load_spandrel(path: str | Path, role: str, device: torch.device
                  ) -> tuple[torch.nn.Module, ArchInfo]:
    """A checkpoint spandrel recognises, read weights-only and loaded strictly (spandrel's
    descriptors call load_state_dict(strict=True)); raises CheckpointError naming what the
    file is when it does not fit `role` or is not recognised."""
    import spandrel

    state_dict = read_state_dict(path)
    try:
        from spandrel.__helpers.canonicalize import canonicalize_state_dict
        state_dict = canonicalize_state_dict(state_dict)
    except ImportError:       # private helper moved: ours already unwrapped params/params_ema
        pass
    try:
        desc = spandrel_registry().load(state_dict)
    except spandrel.UnsupportedModelError as exc:
        raise CheckpointError(
            f"{path}: not a model architecture we can load (spandrel knows none that fits; "
            f"supported for {role}: ESRGAN, Real-ESRGAN, Compact, SwinIR, HAT, DAT, OmniSR, "
            f"GFPGAN, RestoreFormer, CodeFormer, …)") from exc
    except (RuntimeError, KeyError, ValueError, IndexError, AssertionError) as exc:
        raise CheckpointError(f"{path}: looks like a known architecture but does not load "
                              f"strictly: {type(exc).__name__}: {exc}"[:600]) from exc
    arch_id = str(desc.architecture.id)
    purpose = getattr(desc, "purpose", "")
    got_role = SPANDREL_ROLES.get(purpose)
    if got_role != role:
        raise CheckpointError(f"{path}: is a {arch_id} model ({purpose or 'not an image model'}),"
                              f" not a {role} model")
    if role == "face" and arch_id not in FACE_ARCHS:
        raise CheckpointError(f"{path}: face model {arch_id} is not supported (one of "
                              f"{', '.join(FACE_ARCHS)})")
    if getattr(desc, "input_channels", 3) != 3 or getattr(desc, "output_channels", 3) != 3:
        raise CheckpointError(f"{path}: {arch_id} with {desc.input_channels}→"
                              f"{desc.output_channels} channels; only RGB models are supported")
    module = desc.model
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    module = module.to(device)
    info = ArchInfo("spandrel", arch_id, int(desc.scale),
                    LICENCES.get(arch_id, "see the architecture's upstream licence"),
                    tuple(str(t) for t in getattr(desc, "tags", ())),
                    int(desc.size_requirements.multiple_of), int(desc.size_requirements.minimum))
    return module, info

