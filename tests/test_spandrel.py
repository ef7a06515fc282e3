"""Models people bring: local checkpoints of every listed architecture, made here from
spandrel's own architecture classes with seeded-random weights (tiny configurations; the
published layouts' keys), load through enhancer.models.load_spandrel / build_enhancer,
strictly and weights-only, and name architecture, scale and licence. Heavy face models at
their real size run only under `slow`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from enhancer import models, pipeline
from enhancer.api import EnhancerSettings, Params
from enhancer.errors import UnsupportedError
from _weightfactory import make_weights_dir

spandrel = pytest.importorskip("spandrel")
from spandrel.architectures.Compact import Compact                 # noqa: E402
from spandrel.architectures.DAT import DAT                         # noqa: E402
from spandrel.architectures.ESRGAN import ESRGAN                   # noqa: E402
from spandrel.architectures.HAT import HAT                         # noqa: E402
from spandrel.architectures.OmniSR import OmniSR                   # noqa: E402
from spandrel.architectures.RestoreFormer import RestoreFormer     # noqa: E402
from spandrel.architectures.SwinIR import SwinIR                   # noqa: E402

CPU = torch.device("cpu")

# name -> (builder, wrapper key of the usual published file, expected spandrel id, scale)
SR = {
    "esrgan-new": (lambda: ESRGAN(num_filters=8, num_blocks=1, scale=4), "params_ema", "ESRGAN", 4),
    "esrgan-x2-unshuffle": (lambda: ESRGAN(in_nc=12, num_filters=8, num_blocks=1, scale=4, shuffle_factor=2),
                            "params_ema", "ESRGAN", 2),
    "compact": (lambda: Compact(num_feat=8, num_conv=2, upscale=4), "params", "Compact", 4),
    "swinir": (lambda: SwinIR(embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2,
                              upsampler="pixelshuffledirect", img_size=16), "params", "SwinIR", 2),
    "hat": (lambda: HAT(embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2,
                        upsampler="pixelshuffle", img_size=16, squeeze_factor=6), "params_ema", "HAT", 2),
    "dat": (lambda: DAT(embed_dim=24, depth=[1], num_heads=[2], split_size=[2, 4], upscale=2,
                        img_size=16, upsampler="pixelshuffle"), "params", "DAT", 2),
    "omnisr": (lambda: OmniSR(num_feat=16, block_num=1, window_size=4, up_scale=2), None, "OmniSR", 2),
}


def _save(path, module, wrap):
    sd = module.state_dict()
    torch.save({wrap: sd} if wrap else sd, path)
    return path


def _old_esrgan_layout(sd: dict) -> dict:
    """The original ESRGAN repository's key names (model.0 …, RRDB_trunk …) for the same net."""
    out = {}
    for k, v in sd.items():
        k2 = (k.replace("conv_first", "model.0").replace("body.", "model.1.sub.")
              .replace("conv_body", "model.1.sub.1").replace("conv_up1", "model.3")
              .replace("conv_up2", "model.6").replace("conv_hr", "model.8")
              .replace("conv_last", "model.10"))
        out[k2] = v
    return out


@pytest.mark.parametrize("name", sorted(SR))
def test_sr_architecture_loads_names_itself_and_upscales(tmp_path, name):
    build, wrap, arch_id, scale = SR[name]
    torch.manual_seed(0)
    net = build().eval()
    path = _save(tmp_path / f"{name}.pth", net, wrap)
    module, info = models.load_spandrel(path, "background", CPU)
    assert (info.loader, info.architecture, info.scale) == ("spandrel", arch_id, scale)
    assert info.licence and info.as_dict()["licence"] == info.licence
    # the loaded module holds exactly the file's weights (strict load), and computes the same
    for (k, a), (k2, b) in zip(net.state_dict().items(), module.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(module(x), net(x), atol=1e-6)


def test_old_esrgan_key_layout_is_recognised(tmp_path):
    torch.manual_seed(0)
    net = ESRGAN(num_filters=8, num_blocks=1, scale=4).eval()
    keys = list(net.state_dict())
    if not any(k.startswith("model.") for k in keys):     # spandrel's class uses the old layout
        pytest.skip("spandrel's ESRGAN class keeps the new layout")
    path = tmp_path / "old.pth"
    torch.save(net.state_dict(), path)                     # old files are bare state dicts
    _, info = models.load_spandrel(path, "background", CPU)
    assert info.architecture == "ESRGAN" and info.scale == 4


def test_published_realesrgan_layout_loads_through_spandrel_and_agrees_with_basicsr(tmp_path):
    """Same file, both loaders: Real-ESRGAN's RRDBNet (basicsr) vs spandrel's ESRGAN."""
    from enhancer import convert
    sd = convert.ncnn_x4plus_state_dict()                  # the real x4plus weights
    path = tmp_path / "x4plus.pth"
    torch.save({"params_ema": sd}, path)
    ours = models.load_model("rrdbnet-x4", path, CPU)
    theirs, info = models.load_spandrel(path, "background", CPU)
    assert info.architecture == "ESRGAN" and info.scale == 4
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff < 1e-5


def test_compact_agrees_with_realesrgan_srvgg(tmp_path):
    torch.manual_seed(3)
    net = models.ARCHS["srvgg-x4"].build()
    path = tmp_path / "general.pth"
    torch.save({"params": net.state_dict()}, path)
    ours = models.load_model("srvgg-x4", path, CPU)
    theirs, info = models.load_spandrel(path, "background", CPU)
    assert info.architecture == "Compact"
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert (ours(x) - theirs(x)).abs().max().item() < 1e-5


def test_face_architecture_restoreformer_is_a_face_model(tmp_path):
    torch.manual_seed(0)
    net = RestoreFormer(n_embed=32, embed_dim=16, ch=32, ch_mult=(1, 1, 1, 1, 1, 1),
                        num_res_blocks=1, attn_resolutions=(16,), resolution=512, z_channels=16)
    path = _save(tmp_path / "rf.pth", net, "params_ema")
    _, info = models.load_spandrel(path, "face", CPU)
    assert info.architecture == "RestoreFormer" and info.scale == 1
    with pytest.raises(models.CheckpointError, match="RestoreFormer.*not a background model"):
        models.load_spandrel(path, "background", CPU)


def test_sr_model_given_as_face_model_is_refused(tmp_path):
    path = _save(tmp_path / "c.pth", Compact(num_feat=8, num_conv=2, upscale=4), "params")
    with pytest.raises(models.CheckpointError, match="Compact.*not a face model"):
        models.load_spandrel(path, "face", CPU)


def test_unknown_and_mismatched_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    torch.save({"params": {"foo.weight": torch.zeros(3, 3)}}, junk)
    with pytest.raises(models.CheckpointError, match="not a model architecture we can load"):
        models.load_spandrel(junk, "background", CPU)
    # an ESRGAN file with one tensor of the wrong shape: detected, but not loadable strictly
    sd = ESRGAN(num_filters=8, num_blocks=1, scale=4).state_dict()
    sd["conv_body.weight"] = torch.zeros(8, 8, 1, 1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(models.CheckpointError):
        models.load_spandrel(bad, "background", CPU)
    pickled = tmp_path / "pickle.pth"
    torch.save({"params": {"x": object()}}, pickled)       # not weights-only: refused unread
    with pytest.raises(models.CheckpointError, match="weights-only"):
        models.load_spandrel(pickled, "background", CPU)


def test_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file
    net = Compact(num_feat=8, num_conv=2, upscale=4)
    path = tmp_path / "c.safetensors"
    save_file(net.state_dict(), str(path))
    _, info = models.load_spandrel(path, "background", CPU)
    assert info.architecture == "Compact"


@pytest.fixture(scope="module")
def face_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    return d, make_weights_dir(d, ["retinaface-mobile0.25"])


def test_build_enhancer_with_a_users_swinir_reports_it_in_the_result(tmp_path, face_weights):
    d, manifest = face_weights
    build, wrap, _, _ = SR["swinir"]
    torch.manual_seed(0)
    path = _save(tmp_path / "my-swinir.pth", build(), wrap)
    enh = pipeline.build_enhancer(EnhancerSettings(weights_dir=d, precision="fp32",
                                                   background_model=str(path),
                                                   needs=(("upscale", 2.0),)), manifest=manifest)
    img = np.random.default_rng(0).random((21, 18, 3)).astype(np.float32)   # odd sizes: padded
    res = enh.enhance(img, Params(profile="upscale", upscale=2, tile=0, bits=8))
    assert res.image.shape == (42, 36, 3) and res.image.dtype == np.uint8
    (mi,) = res.models
    assert mi.source == "local" and mi.details["architecture"] == "SwinIR"
    assert mi.details["scale"] == 2 and "Apache" in mi.details["licence"]


def test_build_enhancer_refuses_an_unknown_local_file_clearly(tmp_path, face_weights):
    d, manifest = face_weights
    junk = tmp_path / "junk.pth"
    torch.save({"params": {"foo.weight": torch.zeros(3, 3)}}, junk)
    with pytest.raises(UnsupportedError, match="junk.pth.*not a model architecture"):
        pipeline.build_enhancer(EnhancerSettings(weights_dir=d, background_model=str(junk),
                                                 needs=(("upscale", 2.0),)), manifest=manifest)


# ---------------------------------------------------------------- heavy face models (slow)

@pytest.mark.slow
def test_codeformer_fidelity_changes_the_face(tmp_path):
    extra = pytest.importorskip("spandrel_extra_arches")
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer
    assert extra
    torch.manual_seed(0)
    path = _save(tmp_path / "codeformer.pth", CodeFormer(dim_embd=32, n_head=2, n_layers=1,
                                                         codebook_size=32), "params_ema")
    module, info = models.load_spandrel(path, "face", CPU)
    assert info.architecture == "CodeFormer" and "NON-COMMERCIAL" in info.licence
    lm = pipeline.LoadedModel("cf", "spandrel:CodeFormer", "", "local", path, module, "fp32",
                              details=info)
    crop = np.random.default_rng(0).random((512, 512, 3)).astype(np.float32)
    a = pipeline.restore_faces(lm, [crop], CPU, fidelity=0.0)[0]
    b = pipeline.restore_faces(lm, [crop], CPU, fidelity=1.0)[0]
    assert np.isfinite(a).all() and np.abs(a - b).mean() > 1e-4


@pytest.mark.slow
def test_gfpgan_through_spandrel_agrees_with_gfpgan_package(tmp_path):
    from _weightfactory import make_checkpoint
    path = tmp_path / "GFPGANv1.4.pth"
    make_checkpoint("gfpgan-clean", path)
    ours = models.load_model("gfpgan-clean", path, CPU)
    theirs, info = models.load_spandrel(path, "face", CPU)
    assert info.architecture == "GFPGAN"
    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.inference_mode():
        a = ours(x, return_rgb=False, randomize_noise=False)[0]
        b = theirs(x, return_rgb=False, randomize_noise=False)[0]
    assert (a - b).abs().max().item() < 1e-4
