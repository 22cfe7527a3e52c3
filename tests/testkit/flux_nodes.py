"""Test-kit loader nodes of the tiny Flux (tiny_flux.py): MODEL, CLIP and VAE each on its own.

Flux workflows load the three parts with three loaders (UNETLoader, DualCLIPLoader,
VAELoader); ComfyUI's detector cannot read a 64-wide Flux file (tiny_flux.py says why),
so the harness swaps each loader for one of these (harness/provisioning_flux.py).
Built once per seed and cached; every call hands out a clone (never the cached MODEL).
"""

from __future__ import annotations

import threading

_CACHE = {}
_LOCK = threading.Lock()
CATEGORY = "identity_attention/testkit"
SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Weights are a function of this seed."})


def _cached(key, build):
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


class TinyFlux:
    NODE_ID = "IdentityAttentionTestKit_TinyFlux"
    DISPLAY_NAME = "Tiny Flux model (test kit)"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    DESCRIPTION = "A random-weight Flux.1 with the real block structure, small enough for a CPU. Test and demo hosts only."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "variant": (["dev", "schnell"], {"tooltip": "dev has the guidance embedding; schnell has none."}),
                "seed": SEED,
            }
        }

    def load(self, variant, seed):
        from .tiny_flux import build_flux

        return (_cached(("flux", variant, seed), lambda: build_flux(seed, guidance=variant == "dev")).clone(),)


class TinyFluxClip:
    NODE_ID = "IdentityAttentionTestKit_TinyFluxClip"
    DISPLAY_NAME = "Tiny Flux text encoder (test kit)"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    DESCRIPTION = "A stand-in for Flux's CLIP-L + T5 giving the tiny Flux's context widths. Test and demo hosts only."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": SEED}}

    def load(self, seed):
        from .tiny_flux import build_flux_clip

        return (_cached(("clip", seed), lambda: build_flux_clip(seed)).clone(),)


class TinyFluxVae:
    NODE_ID = "IdentityAttentionTestKit_TinyFluxVae"
    DISPLAY_NAME = "Tiny Flux VAE (test kit)"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    DESCRIPTION = "A random 16-channel TAESD (taef1's shape). Test and demo hosts only."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": SEED}}

    def load(self, seed):
        from .tiny_flux import build_flux_vae

        return (_cached(("vae", seed), lambda: build_flux_vae(seed)),)


FLUX_NODES = [TinyFlux, TinyFluxClip, TinyFluxVae]
