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
