"""Import-time shims for the model stack. Import this module before any basicsr, gfpgan,
realesrgan or facexlib import (enhancer.models does so first thing).

basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, a module torchvision
removed; its only use there is ``rgb_to_grayscale``, which lives on in
``torchvision.transforms.functional``. Registering a tiny module under the old name is the
whole fix (the ``basicsr-fixed`` distribution does the same but collides with ``basicsr``).
"""
from __future__ import annotations

import sys
import types


def install() -> None:
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return
    import torchvision.transforms.functional as functional

    shim = types.ModuleType(name)
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[name] = shim


install()
