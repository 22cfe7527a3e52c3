"""The step's sigma, read once per model call and shared by every stage and layer.

A start/end window (``start_percent`` / ``end_percent``) is a comparison of the
current sigma with two floats. Done in every layer it costs either a host read
of a GPU tensor per layer (a sync each) or, kept on the device, a comparison
plus a ``torch.where`` over both branches per stage and layer, and a stage
outside its window still runs in full. Instead one model-function wrapper
publishes a :class:`StepSigma` per model call (one call = one CFG step on both
hosts unless the host splits the batch for memory) in the call's
``transformer_options``; ComfyUI copies those keys into every attn2
``extra_options``. Where a stage needs the sigma as a number (a start/end
window, ``needs_step_sigma``: per-stage tokens, STFG's per-step maps) the wrapper
reads it before the UNet runs: one host read for the whole step, outside every
layer, shared by all stages and layers. A stack whose stages all have full
windows never reads it, so a GPU step then has no sync at all (a later
``step_sigma`` call, e.g. an inspect recorder, reads it on first use). Stages
decide their window in Python, so a stage outside its window launches nothing::

    sampler -> model_options["model_function_wrapper"] = StepSigmaWrapper(inner)
                 c["transformer_options"][STEP_SIGMA_KEY] = StepSigma(timestep)   # read now if a stage needs it
                 c["transformer_options"][SAMPLING_CACHE_KEY] = the SamplingScope's cache
                 inner(apply_model, args) or apply_model(...)   # a foreign wrapper keeps running
               -> a layer: step_sigma(extra_options) -> float (read on first use in the step)

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


class StepSigma:
    """The sigma of one model call, read from the device on first use only (then a float)."""

    __slots__ = ("_timestep", "_value")

    def __init__(self, timestep):
        self._timestep = timestep
        self._value: Optional[float] = None

    @property
    def read(self) -> bool:
        return self._value is not None

    def value(self) -> float:
        if self._value is None:
            t = self._timestep
            # the step's one host read (a sync when the sigma lives on a GPU)
            self._value = float(t.detach().reshape(-1)[0].item()) if torch.is_tensor(t) else float(t)
            self._timestep = None
        return self._value

    def known(self) -> Optional[float]:
        """The value if some stage already read it this step, else None (never reads)."""
        return self._value


def step_sigma(options: Optional[dict]) -> Optional[float]:
    """The sigma of this model call as a float (read once per step, on first use), or None (no wrapper)."""
    found = options.get(STEP_SIGMA_KEY) if options else None
    return found.value() if isinstance(found, StepSigma) else None


def has_step_sigma(options: Optional[dict]) -> bool:
    """Whether :class:`StepSigmaWrapper` runs for this call (then windows need no per-layer work)."""
    return bool(options) and isinstance(options.get(STEP_SIGMA_KEY), StepSigma)


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
        sigma = StepSigma(args["timestep"])
        c = dict(args["c"])
        options = dict(c.get("transformer_options") or {})
        if needs_sigma(options):
            sigma.value()  # the step's one read, before any layer
        self.scope.begin_call(options.get("sample_sigmas"))
        options[STEP_SIGMA_KEY] = sigma
        options[SAMPLING_CACHE_KEY] = self.scope.cache
        c["transformer_options"] = options
        args = dict(args, c=c)
        try:
            if self.inner is not None:
                return self.inner(apply_model, args)
            return apply_model(args["input"], args["timestep"], **c)
        finally:
            self.scope.end_call(sigma.known())


def needs_sigma(options: dict) -> bool:
    """Whether a stage or layer patch of ours in ``transformer_options`` needs this step's sigma as a float.

    Ours: the dispatcher's stages (``PACK_KEY``) and the objects in ``patches`` lists that carry a
    ``StageSchedule``; a stage needs it with a start/end window, ``needs_step_sigma = True``, or a
    ``recorder`` (MoA's and CA²'s inspect recorders key what they record by sigma).
    """
    candidates = list(getattr(options.get("identity_attention"), "stages", ()))
    for patches in (options.get("patches") or {}).values():
        if isinstance(patches, (list, tuple)):
            candidates.extend(patches[:256])  # bounded: a patch list is short
    for obj in candidates:
        if getattr(obj, "needs_step_sigma", False) is True or getattr(obj, "recorder", None) is not None:
            return True
        full = getattr(getattr(obj, "schedule", None), "full_window", True)
        if full is False:
            return True
    return False


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
