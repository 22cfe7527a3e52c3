"""The checks every node of the pack gets at its start, applied once at registration.

``nodes/__init__.py`` passes every registered node class through :func:`guard_node_class`,
which wraps the class's ``FUNCTION`` so that, before the node's own code runs, each input
is checked by its declared socket type (read from the class's ``INPUT_TYPES``):

- ``FLOAT``: finite. ComfyUI's range check (``val < min or val > max``) lets NaN through,
  and a NaN weight or learning rate would otherwise give an all-NaN picture with no error.
- ``FLOAT`` and ``INT``: inside the declared ``min`` / ``max``. ComfyUI checks ranges only for
  values typed into a widget; a value arriving through a link (a math or primitive node)
  skips them, and a weight of 1e30 overflows to inf inside attention, a resolution of 10^6
  takes the machine's memory.
- ``IMAGE``: ``[B, H, W, C]`` with at least one image of at least :data:`MIN_IMAGE_SIDE`
  pixels a side, finite (:func:`.input_checks.check_image_batch`).
- ``MASK``: ``[H, W]`` or ``[B, H, W]``, not empty, finite.
- ``LATENT``: non-empty finite ``samples``.
- ``IDENTITY`` / ``ID_TOKENS``: every tensor they carry is finite.
- a class attribute ``MATCHING_BATCHES = {"masks": "images"}`` asks for a MASK batch of 1
  or of the IMAGE's batch size (one mask for all, or one per image).

A node added later by anyone gets these checks by being registered; nothing to call.
Each failure is one :class:`IdentityAttentionError` naming the node, the input and the fix.
The checks run once per node execution on the inputs as given (never inside an attention
patch); a tensor on the GPU costs one ``isfinite().all()`` reduction.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Dict, Tuple

from .dit_layout import check_model_family
from .input_checks import check_float_input, check_identity_finite, check_range, check_image_batch, check_latent_batch, check_mask_batch, check_matching_batches

GUARDED = "_identity_attention_guarded"
_TYPES_LOCK = threading.Lock()


def _spec(cls) -> Dict[str, Tuple[str, dict]]:
    """``{input name: (socket type, options)}`` of a node class, cached on the class (socket types and
    ranges do not change while ComfyUI runs; only the choices of a combo do, which are not checked here)."""
    cached = cls.__dict__.get("_identity_attention_spec")
    if cached is not None:
        return cached
    out: Dict[str, Tuple[str, dict]] = {}
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            kind = entry[0] if isinstance(entry, (tuple, list)) and entry else entry
            options = entry[1] if isinstance(entry, (tuple, list)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
            out[name] = (kind if isinstance(kind, str) else "COMBO", options)
    with _TYPES_LOCK:
        setattr(cls, "_identity_attention_spec", out)
    return out


def declared_types(cls) -> Dict[str, str]:
    """``{input name: socket type}`` of a node class (required and optional; list/combo inputs are "COMBO")."""
    return {name: kind for name, (kind, _) in _spec(cls).items()}


def check_inputs(cls, inputs: dict) -> None:
    """Run the checks of the module docstring on ``inputs`` (keyword arguments of the node's FUNCTION)."""
    node = getattr(cls, "DISPLAY_NAME", cls.__name__)
    spec = _spec(cls)
    for name, value in inputs.items():
        kind, options = spec.get(name, (None, {}))
        if value is None or kind is None:
            continue
        values = value if getattr(cls, "INPUT_IS_LIST", False) and isinstance(value, list) else [value]
        for v in values:
            if kind == "FLOAT":
                if not _is_finite_number(v):
                    check_float_input(v, node, name, options.get("min"), options.get("max"))
                check_range(v, node, name, options.get("min"), options.get("max"))
            elif kind == "INT":
                check_range(v, node, name, options.get("min"), options.get("max"))
            elif kind == "IMAGE":
                check_image_batch(v, node, name)
            elif kind == "MASK":
                check_mask_batch(v, node, name)
            elif kind == "LATENT":
                check_latent_batch(v, node, name)
            elif kind in ("IDENTITY", "ID_TOKENS"):
                check_identity_finite(v, node, name)
            elif kind == "MODEL":
                check_model_family(getattr(cls, "NODE_ID", ""), v, node, name)
    for mask_name, image_name in (getattr(cls, "MATCHING_BATCHES", None) or {}).items():
        check_matching_batches(inputs.get(mask_name), inputs.get(image_name), node, mask_name, image_name)


def _is_finite_number(v) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) != float("inf") and v == v
    except TypeError:
        return False


def guard_node_class(cls):
    """Wrap ``cls.FUNCTION`` with :func:`check_inputs` (idempotent; subclasses check their own inputs)."""
    name = getattr(cls, "FUNCTION", None)
    method = getattr(cls, name, None) if name else None
    if method is None or getattr(method, GUARDED, False):
        return cls

    if not inspect.isfunction(inspect.getattr_static(cls, name)):
        return cls  # a classmethod / staticmethod FUNCTION: none in the pack; left as it is
    signature = inspect.signature(method)

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        inputs = kwargs
        if args:  # ComfyUI passes keywords; direct Python callers may not
            inputs = dict(signature.bind_partial(self, *args, **kwargs).arguments)
            inputs.pop(next(iter(signature.parameters)), None)
        check_inputs(type(self), inputs)
        return method(self, *args, **kwargs)

    setattr(guarded, GUARDED, True)
    setattr(cls, name, guarded)
    return cls
