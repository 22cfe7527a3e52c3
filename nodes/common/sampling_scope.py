"""Constants made once per sampling: token-index masks, stage contexts, identity K/V, resized masks.

Stages need tensors that depend only on their inputs and on the layer's shape,
device and dtype (an identity's K/V per layer, a mask at each token grid, the
index of prompt tokens as a device tensor). Making them in every layer of every
step costs launches and, for anything built from Python data, a host-to-device
copy. A :class:`SamplingCache` keeps them for one sampling::

    cache = sampling_cache(call.extra_options)          # None outside a sampling
    k_id = get_or_make(cache, (id(self), "k", layer, device, dtype), lambda: project(...))

Keys are the caller's: include the owner (``id(stage)``) and everything the
value depends on (layer, shape, device, dtype). Values are made on first use and
reused until the sampling ends.

Lifetime (owned by :class:`~.step_sigma.StepSigmaWrapper`, one per patched MODEL),
decided without reading the sigma from the device (that read is left to stages
that need it): the host of 2025 publishes the sampling's sigma schedule
(``sample_sigmas``, one tensor object per sampling), so a new schedule object starts
a new sampling and releases the last one's tensors; where a stage read the step's
sigma, the call at the schedule's last non-zero sigma ends the sampling (released
right after it). The host of early 2024 publishes no schedule: there a read sigma
higher than the previous one starts a new sampling (every schedule descends). A
cache never holds more than :data:`MAX_ENTRIES` tensors (a full one is emptied,
not grown).
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, Optional

from ...adapters.projectors.id_adapter import DeviceCache

SAMPLING_CACHE_KEY = "identity_attention_sampling_cache"
"""Key in ``transformer_options`` / attn2 ``extra_options``: the current sampling's :class:`SamplingCache`."""

MAX_ENTRIES = 4096


class SamplingCache:
    """``get_or_make(key, make)``: ``make()`` on first use of ``key`` in this sampling, the same object after."""

    def __init__(self):
        self._values: Dict[Hashable, object] = {}

    def get_or_make(self, key: Hashable, make: Callable[[], object]):
        value = self._values.get(key)
        if value is None:
            if len(self._values) >= MAX_ENTRIES:
                self._values.clear()
            value = make()
            self._values[key] = value
        return value

    def release(self) -> None:
        self._values.clear()

    def __len__(self) -> int:
        return len(self._values)


def sampling_cache(options: Optional[dict]) -> Optional[SamplingCache]:
    """The cache of the sampling ``options`` (attn2 ``extra_options`` / ``transformer_options``) belong to, or None."""
    found = options.get(SAMPLING_CACHE_KEY) if options else None
    return found if isinstance(found, SamplingCache) else None


def device_constant(options: Optional[dict], owner: Hashable, key: Hashable, device, dtype, make: Callable[[], object], fallback: DeviceCache):
    """``make()`` (CPU tensors, or a tuple of them) on ``device`` in ``dtype``, made once per sampling.

    Kept in a :class:`~..adapters.projectors.id_adapter.DeviceCache` of ``owner`` (e.g. ``id(stage)``) inside
    the sampling's cache, so it is released when the sampling ends and the next sampling makes
    it again; where no sampling scope runs (a stage called directly), in ``fallback``.
    """
    scope = sampling_cache(options)
    store = fallback if scope is None else scope.get_or_make(("device_constants", owner), DeviceCache)
    return store.get(key, device, dtype, make)


def get_or_make(cache: Optional[SamplingCache], key: Hashable, make: Callable[[], object]):
    """``cache.get_or_make(key, make)``, or just ``make()`` where no sampling scope is installed."""
    return make() if cache is None else cache.get_or_make(key, make)


class SamplingScope:
    """Tells where one sampling ends and the next begins, from the sigmas the model is called at."""

    def __init__(self):
        self.cache = SamplingCache()
        self._schedule = None  # the host's sample_sigmas of the running sampling
        self._last_sigma: Optional[float] = None  # its last non-zero sigma
        self._previous: Optional[float] = None

    def begin_call(self, schedule=None) -> None:
        """Before a model call; ``schedule``: the host's ``sample_sigmas`` (None on the early-2024 host)."""
        if schedule is not None and schedule is not self._schedule:
            self.cache.release()
            self._schedule = schedule
            # once per sampling; the schedule is a CPU tensor on both hosts' samplers
            positive = [s for s in schedule.detach().reshape(-1).cpu().tolist() if s > 0.0]
            self._last_sigma = min(positive) if positive else None

    def end_call(self, sigma: Optional[float]) -> None:
        """After a model call; ``sigma``: its sigma if a stage read it, else None."""
        if sigma is None:
            return
        if self._schedule is None and self._previous is not None and sigma > self._previous:
            self.cache.release()  # early-2024 host: a new descent is a new sampling
        self._previous = sigma
        if self._last_sigma is not None and sigma <= self._last_sigma:
            self.cache.release()
            self._schedule, self._last_sigma, self._previous = None, None, None
