"""The step's sigma, read once per model call and shared by every stage and layer.

A start/end window (``start_percent`` / ``end_percent``) is a comparison of the
current sigma with two floats. Done in every layer it costs either a host read
of a GPU tensor per layer (a sync each) or, kept on the device, a comparison
plus a ``torch.where`` over both branches per stage and layer, and a stage
outside its window still runs in full. Instead one model-function wrapper
reads the sigma once per model call (one call = one CFG step on both hosts
unless the host splits the batch for memory) and publishes it as a Python
float in the call's ``transformer_options``; ComfyUI copies those keys into
every attn2 ``extra_options``, so stages decide their window in Python and
a stage outside its window launches nothing::

    sampler -> model_options["model_function_wrapper"] = StepSigmaWrapper(inner)
                 sigma = float(timestep[0])                 # the step's one host read
                 c["transformer_options"][STEP_SIGMA_KEY] = sigma
                 c["transformer_options"][SAMPLING_CACHE_KEY] = the SamplingScope's cache
                 inner(apply_model, args) or apply_model(...)   # a foreign wrapper keeps running
               -> every layer: step_sigma(extra_options) -> float, no device work

Choice: ``model_function_wrapper`` exists, with the same signature, on both
hosts (ComfyUI of early 2024 and 0.3.x), so one mechanism covers both. A
wrapper another pack installed before ours becomes our ``inner`` and still
runs; one installed after ours replaces it (ComfyUI keeps a single wrapper):
then no sigma is published and stages fall back to deciding per layer
(:meth:`StageSchedule.window`), slower but exact. The upstream MODEL is never
changed: :func:`install_step_sigma` works on the clone a node returns.

The same wrapper owns the :class:`~.sampling_scope.SamplingScope` (constants
made once per sampling, released when it ends).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .sampling_scope import SAMPLING_CACHE_KEY, SamplingScope

STEP_SIGMA_KEY = "identity_attention_step_sigma"
"""Key in ``transformer_options`` / attn2 ``extra_options``: the step's sigma as a float."""


def step_sigma(options: Optional[dict]) -> Optional[float]:
    """The sigma :class:`StepSigmaWrapper` published for this model call, or None (not installed)."""
    if not options:
        return None
    value = options.get(STEP_SIGMA_KEY)
    return value if isinstance(value, float) else None


class StepSigmaWrapper:
    """``model_function_wrapper(apply_model, args)``: reads the sigma once, publishes it, chains ``inner``.

    args: ``{"input": x [B, C, H, W], "timestep": sigma [B], "c": model kwargs, "cond_or_uncond": [...]}``.
    """

    identity_attention_step_sigma = True

    def __init__(self, inner: Optional[Callable] = None):
        self.inner = inner
        self.scope = SamplingScope()

    def __deepcopy__(self, memo):
        return self

    def __call__(self, apply_model, args: dict):
        timestep = args["timestep"]
        # the one host read of the step (a sync when the sigma lives on a GPU)
        sigma = float(timestep.detach().reshape(-1)[0].item()) if torch.is_tensor(timestep) else float(timestep)
        c = dict(args["c"])
        options = dict(c.get("transformer_options") or {})
        self.scope.begin_call(sigma, options.get("sample_sigmas"))
        options[STEP_SIGMA_KEY] = sigma
        options[SAMPLING_CACHE_KEY] = self.scope.cache
        c["transformer_options"] = options
        args = dict(args, c=c)
        try:
            if self.inner is not None:
                return self.inner(apply_model, args)
            return apply_model(args["input"], args["timestep"], **c)
        finally:
            self.scope.end_call(sigma)


def install_step_sigma(model_patcher):
    """Put a :class:`StepSigmaWrapper` on ``model_patcher`` (a clone the caller owns); returns it.

    Already ours: kept as is. A foreign wrapper: chained inside ours.
    """
    options = model_patcher.model_options
    current = options.get("model_function_wrapper")
    if getattr(current, "identity_attention_step_sigma", False) is True:
        return model_patcher
    wrapper = StepSigmaWrapper(current)
    setter = getattr(model_patcher, "set_model_unet_function_wrapper", None)
    if setter is not None:
        setter(wrapper)
    else:
        options["model_function_wrapper"] = wrapper
    return model_patcher
