"""The command-line trainer for the pack's own weights (``python -m <pack>.train CONFIG``).

Config (JSON, or TOML with the same sections; paths relative to the config file)::

    {
      "models":  {"checkpoint": "sd15.safetensors"},          # or unet/clip/vae, or factory (trainer_models.py)
      "data":    {"folder": "faces/", "resolution": 512, "caption": "photo of a <new1> person",
                  "max_references": 4},                         # layout: adapters/training/training_data.py
      "targets": {"pva": {"adapter": null, "train_projector": true},
                  "router": {"adapter": "my_pva.safetensors", "hidden": 128, "loss_weight": 1.0}},
      "train":   {"steps": 10000, "batch_size": 2, "grad_accum": 4, "learning_rate": 1e-6,
                  "condition_dropout": {"identity": 0.05, "text": 0.05, "both": 0.05},
                  "scale_lr_by_batch": true, "weight_decay": 0.01, "time_resample": 2, "seed": 0,
                  "background_weight": 0.1, "gradient_checkpointing": "auto",
                  "checkpoint_every": 500, "log_every": 10},
      "output":  {"dir": "runs/pva", "name": "pva_stage1"}
    }

Targets (``nodes/training/training_targets.py``; one file per mechanism): ``pva`` (visual projections,
identity transformer, the caption's ``<new1>`` token), ``router`` (MoA routers + router loss),
``ca2_score``, ``stage_tokens``, ``face_adapter``, ``kv_mixed``, ``nested``, ``omni_id``,
``restoration_guide`` (Dual-Pivot's ControlNet guide, ``nodes/training/restoration_training.py``) where their
modules exist. On a Flux.1 MODEL only ``pva`` trains: the identity transformer through joint identity
attention, with the rectified-flow loss (``nodes/training/flux_training.py``). Each target may name
an ``adapter`` (where to start / the frozen branch it needs) and ``init`` (weights to continue).

Learning rate per target: its own ``learning_rate`` setting, else ``train.learning_rate``, else the
target's default by kind of parameter (``nodes/training/training_targets.py``): learned words / token tables
1e-3 (``stage_tokens``; PVA's ``token_lr``), attention projections 1e-5 (``pva`` and the K/V
projections of ``kv_mixed`` / ``nested``), small networks trained from scratch 1e-4 (``router``,
``ca2_score``, ``face_adapter``, the encoders of ``kv_mixed`` / ``nested`` / ``omni_id``). With
``scale_lr_by_batch`` (PVA's convention) the rate used is ``rate x batch_size x grad_accum x world size``.

Condition dropout (``train.condition_dropout``, every target): per sample, the identity (its
features become zeros), the caption (becomes "") or both are dropped with 0.05 each, as IP-Adapter
and CA-Edit train (``adapters/training/condition_dropout.py``; ``0`` turns it off, a table
``{identity, text, both}`` sets each). ``face_adapter`` adds FACT's paired / shuffled faces.

Identity features are read from ``<photo>.id.safetensors`` next to each photo; ``python -m
<pack>.train prepare FOLDER --face-pack antelopev2`` writes them once (``nodes/identity/prepare_features.py``),
so training never runs face analysis.

Not provided: PVA's stage 2 (training the ArcFace recognizer itself, ``face_net.tune_params =
"All"``): the pack runs the recognizer through onnxruntime, which cannot train, so the recognizer
stays frozen and ``pva`` trains stage 1's parts only.

Each optimizer step: ``grad_accum`` micro-batches of ``batch_size`` photos, each photo at
``time_resample`` stratified timesteps, the denoising loss (+ the targets' regularisers);
DDP averages gradients across ranks (``torchrun``; NCCL on GPUs, gloo on CPUs). Every
micro-batch draws from a generator seeded by ``(seed, step, micro, rank)`` and the data stream is
a function of ``(seed, position)``, so ``--resume`` continues *exactly* where a run stopped.

Written to ``output.dir``: ``checkpoints/step_<n>.pt`` (targets, optimizer, gradient scaler,
step, data position, loss history, RNG states; loaded with ``weights_only=True``),
``<name>[_<target>].safetensors`` (native format, loads in "Load identity adapter"),
``<name>_token.safetensors`` (a learned prompt word, ComfyUI's embedding format), ``loss.png``
and ``summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ...adapters.training.condition_dropout import ConditionDropout, face_pairing, shuffle_probability, zero_features
from ...adapters.faces.identity import IdentityFeatures
from ...adapters.training.loss_plot import draw_loss_curves, save_png
from ...adapters.formats.native_format import write_native
from ...adapters.training.training_data import ImageFolderIndex, StreamingImages, collate
from ...adapters.training.training_losses import denoising_loss, flow_matching_loss, flow_noisy, loss_weight_map
from ...adapters.training.training_masks import inpaint_mask, masked_pixels, random_face_mask, to_latent
from ...adapters.training.training_schedule import sigmas_for, step_generator, stratified_timesteps
from ...adapters.weights.write_paths import write_atomically, write_safetensors
from .flux_training import checkpointed_flux, is_flux, is_rectified_flow, refuse_prompt_word
from ..dispatch.differentiable_unet import TrainingModels, as_normal, differentiable_clone, differentiable_text_encoder, predict_x0, training_transformer_options
from ..common.dit_layout import context_width
from ..common.host import base_model_of, cross_attention_layers, model_sampling
from .personalization import adm_vector, autocast_dtype, encode_latents, is_inpainting
from ..dispatch.prompt_token import PLACEHOLDER, embedding_file_tensors, encode_tokens, find_prompt_token, initial_vectors, token_clip, with_marker
from .trainer_models import load_adapter, load_models
from .training_targets import TARGETS, TrainingFeed, TrainingTarget

CHECKPOINT_FORMAT = "identity_attention_trainer_checkpoint"
DEFAULTS = {
    "data": {"resolution": 512, "caption": "photo of a <new1> person", "max_references": 4},
    "targets": {},
    "train": {
        "steps": 1000, "batch_size": 1, "grad_accum": 1, "learning_rate": None, "scale_lr_by_batch": True, "condition_dropout": None, "weight_decay": 0.01,
        "time_resample": 2, "seed": 0, "background_weight": 0.1, "gradient_checkpointing": "auto", "checkpoint_every": 500, "log_every": 10,
    },
    "output": {"dir": "training_output", "name": "identity_attention_weights", "save_every_rank": False},
}


def _import_targets() -> None:
    """Register every target module present in this pack (each registers itself on import)."""
    import importlib

    for name in ("pva_training", "router_training", "ca2_training", "stage_token_training", "face_adapter_training", "kv_mixed_training", "nested_training", "omni_id_training", "restoration_training"):
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as err:
            if name not in str(err):
                raise


def load_config(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".toml"):
        import tomllib

        return tomllib.loads(data.decode("utf-8"))
    return json.loads(data.decode("utf-8"))


def with_defaults(config: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    for section, values in config.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


# --- progress on the terminal ------------------------------------------------------------------------


class ProgressLine:
    """``step 120/1000 | loss 0.1234 | 1.20 s/step | ETA 17m 36s`` on stderr (redrawn on a terminal)."""

    def __init__(self, total: int, start: int = 0, stream=None):
        self.total, self.start = total, start
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    @staticmethod
    def duration(seconds: float) -> str:
        seconds = int(round(seconds))
        h, rem = divmod(seconds, 3600)
        m, s = divmod(rem, 60)
        return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")

    def text(self, step: int, terms: Dict[str, float]) -> str:
        done = max(step - self.start, 1)
        per = (time.monotonic() - self.t0) / done
        parts = [f"step {step}/{self.total}"] + [f"{k} {v:.4f}" for k, v in terms.items()]
        parts += [f"{per:.2f} s/step", f"ETA {self.duration(per * (self.total - step))}"]
        return " | ".join(parts)

    def update(self, step: int, terms: Dict[str, float], force: bool = False) -> None:
        line = self.text(step, terms)
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        elif force:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --- one micro-batch --------------------------------------------------------------------------------


@dataclass
class MicroBatch:
    x0: torch.Tensor  # [R, C, h, w] (rows = samples x time_resample)
    sigma: torch.Tensor  # [R]
    timesteps: torch.Tensor  # [R] the discrete timesteps of ``sigma``
    eps: torch.Tensor  # [R, C, h, w]
    weight: Optional[torch.Tensor]  # [R, 1, h, w]
    foreground: Optional[torch.Tensor]  # [R, H, W] pixel masks
    captions: List[str]
    c_concat: Optional[torch.Tensor] = None
    text_kept: Optional[torch.Tensor] = None  # [R] bool: False where condition dropout removed the caption
    features: Optional[List[IdentityFeatures]] = None
    frozen_tokens: Optional[torch.Tensor] = None
    repeat: int = 1
    extras: Optional[Dict[str, torch.Tensor]] = None  # targets' per-row inputs (TrainingTarget.batch_inputs)


class _StepModule(torch.nn.Module):
    """The trainable parameters of every target, with the loss as ``forward`` (what DDP wraps)."""

    def __init__(self, targets: List[TrainingTarget], loss_fn):
        super().__init__()
        self.parts = torch.nn.ModuleDict({t.name: t.module for t in targets})
        self.__dict__["loss_fn"] = loss_fn

    def forward(self, batch: MicroBatch):
        return self.loss_fn(batch)


def identity_features(features: Dict[str, torch.Tensor], fuse: bool) -> IdentityFeatures:
    """A sample's reference features (``{name: [R, ...]}``) -> ``IdentityFeatures`` (fused: means over R)."""
    arcface = features.get("arcface")
    if arcface is None:
        raise ValueError("identity features need at least 'arcface' [512] per photo")
    normed = features.get("arcface_normed", F.normalize(arcface, dim=-1))

    def f(t):
        return None if t is None else (t.mean(dim=0, keepdim=True) if fuse else t)

    return IdentityFeatures(
        arcface=f(arcface), arcface_normed=f(normed), clip_embeds=f(features.get("clip_embeds")), clip_hidden=f(features.get("clip_hidden")),
        face_tokens=f(features.get("face_tokens")),
    )


def _features_to(feats: IdentityFeatures, device, dtype) -> IdentityFeatures:
    def move(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return IdentityFeatures(**{k: move(getattr(feats, k)) for k in feats.__dataclass_fields__})


# --- the trainer ------------------------------------------------------------------------------------


class Trainer:
    """One training run (see the module docstring). ``models``: ``(MODEL, CLIP, VAE)`` already loaded."""

    def __init__(self, config: dict, models: Tuple, config_dir: str = "", rank: int = 0, world: int = 1, log=None):
        _import_targets()
        self.cfg = with_defaults(config)
        self.config_dir = config_dir
        self.rank, self.world = rank, world
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.model, self.clip, self.vae = models
        tcfg, dcfg = self.cfg["train"], self.cfg["data"]
        self.seed = int(tcfg["seed"])
        self.steps = int(tcfg["steps"])
        self.batch_size = int(tcfg["batch_size"])
        self.grad_accum = int(tcfg["grad_accum"])
        self.repeat = int(tcfg["time_resample"])
        self.resolution = int(dcfg["resolution"])
        self.device = self.model.load_device
        self.base = base_model_of(self.model)
        self.flux = is_flux(self.model)  # Flux.1: only the pva target (nodes/training/flux_training.py)
        if self.flux:
            self.base = "flux"
        self.flow = is_rectified_flow(self.model)  # the loss and the noising follow the model's sampling
        self.layers = cross_attention_layers(self.model)
        self.inpaint = is_inpainting(self.model)
        if not self.cfg.get("targets"):
            raise ValueError("the config names no training target (targets: pva, router, ...)")
        if not dcfg.get("folder"):
            raise ValueError("the config needs data.folder")

        # the prompt token (a target's learned word) is found on the default caption
        caption = str(dcfg["caption"])
        if self.flux and PLACEHOLDER in caption:
            refuse_prompt_word()  # before the token search, which knows CLIP tokenizers only
        self.token = find_prompt_token(self.clip, caption, PLACEHOLDER) if PLACEHOLDER in caption else None
        self.feed = TrainingFeed()
        self.targets = self._build_targets()
        vectors = None
        for t in self.targets:
            vectors = vectors or t.prompt_vectors()
        self.train_token = vectors is not None and self.token is not None
        unet = self.model
        for t in self.targets:
            unet = t.install(unet, self.feed)
        checkpointing = tcfg["gradient_checkpointing"]
        # "auto": on every device (issue #21: without it a 512 px CPU run peaked near 8 GB on the tiny model);
        # the backward pass recomputes each block's activations, so results are the same and memory is bounded
        checkpointing = True if checkpointing == "auto" else bool(checkpointing)
        self._check_memory(checkpointing)
        self.unet = differentiable_clone(unet, checkpoint=checkpointing)
        if self.flux and checkpointing:
            self.unet = checkpointed_flux(self.unet)  # Flux blocks are not BasicTransformerBlocks: their own wrapper
        # one token CLIP per run (two clones of one text encoder cannot be loaded at once): its word is
        # the PVA token, or the vectors a target asks for through feed.extras["encode_with"]
        self._override: Optional[Dict[str, torch.Tensor]] = None
        self.text_grad = self.train_token or any(getattr(t, "needs_text_grad", False) for t in self.targets)
        if self.token is not None:
            default = vectors or (lambda e, v=initial_vectors(self.token): v.get(e))
            self.tclip = token_clip(self.clip, self.token, lambda e: self._override.get(e) if self._override is not None else default(e))
            if self.text_grad:
                self.tclip = differentiable_text_encoder(self.tclip)
        else:
            self.tclip = self.clip.clone()
        self.feed.extras["encode_with"] = self.encode_with
        self._contexts: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

        self.dropout = ConditionDropout.from_config(tcfg.get("condition_dropout"))
        self.pairing = next((t.pairing for t in self.targets if getattr(t, "pairing", None) is not None), None)
        index = ImageFolderIndex(self._path(dcfg["folder"]))
        self.dataset = StreamingImages(
            index, self.resolution, seed=self.seed, rank=rank, world=world, caption=caption,
            max_references=int(dcfg["max_references"]), need_features=any(getattr(t, "needs_features", False) for t in self.targets) or self._frozen_adapter() is not None,
            need_own_features=self.pairing is not None,
        )

        self.step_module = _StepModule(self.targets, self._loss).to(self.device)
        self.ddp = self.step_module
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.learning_rates = {t.name: self._learning_rate(t) for t in self.targets}
        groups = [g for t in self.targets for g in t.param_groups(self.learning_rates[t.name], float(tcfg["weight_decay"]))]
        groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
        groups = [g for g in groups if g["params"]]
        self.optimizer = torch.optim.AdamW(groups)
        self.amp = autocast_dtype(self.model, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        extra = [pair for t in self.targets for pair in t.models()]
        self.models = TrainingModels(
            [self.unet, self.tclip.patcher] + [p for p, _ in extra], weight_roots=[self.unet.model, self.tclip.cond_stage_model] + [r for _, r in extra], keep_loaded=True,
        )
        self.options = training_transformer_options(self.unet)
        self.step = 0
        self.samples = 0
        self.history: Dict[str, List[float]] = {}

    # --- setup -------------------------------------------------------------------------------------
    def _check_memory(self, checkpointing: bool) -> None:
        """Personalize identity's activation estimate for this run's micro-batch; refused before any work with the resolution that fits."""
        from ...adapters.training.training_config_checks import TrainingConfigError
        from ..common.errors import IdentityAttentionError
        from .personalization import check_training_memory

        try:
            check_training_memory(self.model, self.batch_size * self.repeat, self.resolution, checkpointing, self.device, node="train.py")
        except IdentityAttentionError as err:
            import re

            fits = re.search(r"use resolution (\d+)", err.fix or "")
            fix = (f'set "data": {{"resolution": {fits.group(1)}}} (or lower)' if fits else "train on a device with more memory") + ", or a smaller train.batch_size / train.time_resample"
            raise TrainingConfigError("data.resolution", f"{self.resolution} px: {err.problem}", fix) from None

    def _path(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.config_dir, path)

    def _build_targets(self) -> List[TrainingTarget]:
        targets = []
        for name, settings in self.cfg["targets"].items():
            settings = dict(settings or {})
            if name not in TARGETS:
                raise ValueError(f"unknown training target '{name}'; this pack has: {', '.join(sorted(TARGETS))}")
            if self.flux and name != "pva":
                raise ValueError(f"the target '{name}' trains UNet cross-attention layers; on a Flux model only 'pva' trains (its identity transformer)")
            adapter = load_adapter(settings.get("adapter"), self.model, self.config_dir)
            init = load_adapter(settings.get("init"), self.model, self.config_dir)
            vectors = None
            if name == "pva" and self.token is not None and float(settings.get("token_lr", 1e-3)) > 0:
                from .pva_training import stored_vectors

                vectors = initial_vectors(self.token, stored_vectors(adapter) if adapter is not None else None)
            target = TARGETS[name](
                self.model, adapter, settings, init=init, token_vectors=vectors, seed=self.seed, config_dir=self.config_dir,
                clip=self.clip, token=self.token, caption=str(self.cfg["data"]["caption"]), base=self.base if self.base != "unknown" else "sd15",
            )
            target.needs_features = getattr(target, "needs_features", False) or getattr(target, "projector", None) is not None
            target.learning_rate_setting = settings.get("learning_rate")
            targets.append(target)
        frozen = [t for t in targets if getattr(t, "adapter", None) is not None and t.name != "pva"]
        if frozen and any(t.name == "pva" for t in targets):
            raise ValueError("a target with its own frozen identity adapter cannot train together with 'pva' (both would set the identity tokens); leave its 'adapter' out to route PVA's attention")
        return targets

    def _learning_rate(self, target: TrainingTarget) -> float:
        """The target's ``learning_rate``, else the config's ``train.learning_rate``, else the target's
        default (``TrainingTarget.default_learning_rate``), times the batch with ``scale_lr_by_batch``."""
        tcfg = self.cfg["train"]
        lr = getattr(target, "learning_rate_setting", None)
        lr = tcfg.get("learning_rate") if lr is None else lr
        lr = float(target.default_learning_rate if lr is None else lr)
        if tcfg.get("scale_lr_by_batch", True):
            lr *= self.batch_size * self.grad_accum * self.world
        return lr

    def _frozen_adapter(self):
        for t in self.targets:
            if t.name != "pva" and getattr(t, "adapter", None) is not None:
                return t.adapter
        return None

    # --- data --------------------------------------------------------------------------------------
    def _micro_batch(self, step: int, micro: int) -> MicroBatch:
        samples = [self.dataset.sample(self.dataset.position(self.samples + i)) for i in range(self.batch_size)]
        self.samples += self.batch_size
        batch = collate(samples)
        n = self.repeat
        extras = {k: v for t in self.targets for k, v in t.batch_inputs(batch, n).items()}
        g = step_generator(self.seed, step, micro, self.rank)
        latents = encode_latents(self.vae, self.model, batch["images"])
        hw = tuple(latents.shape[-2:])
        sigma_table = model_sampling(self.model).sigmas
        t = torch.cat([stratified_timesteps(n, g, total=len(sigma_table)) for _ in samples])
        sigma = sigmas_for(t, sigma_table)
        x0 = latents.repeat_interleave(n, dim=0)
        eps = torch.randn(x0.shape, generator=g)
        masks = batch["masks"]
        captions, text_kept = self._drop_conditions(batch, step, micro)
        c_concat, weight = None, None
        if self.inpaint:
            holes = torch.stack([random_face_mask(m if has else None, (self.resolution, self.resolution), g) for m, has in zip(masks, batch["has_mask"].tolist())])
            masked = encode_latents(self.vae, self.model, masked_pixels(batch["images"], holes))
            c_concat = torch.cat([inpaint_mask(holes, hw), masked], dim=1).repeat_interleave(n, dim=0)
        else:
            bg = float(self.cfg["train"]["background_weight"])
            weight = loss_weight_map(to_latent(masks, hw), bg).repeat_interleave(n, dim=0)
        features, frozen = None, None
        if any(getattr(t, "needs_features", False) for t in self.targets):
            features = [identity_features(f, fuse=False) for f in batch["features"]]
        adapter = self._frozen_adapter()
        if adapter is not None:
            frozen = self._frozen_tokens(adapter, batch["features"]).repeat_interleave(n, dim=0)
        return MicroBatch(
            x0=x0, sigma=sigma, timesteps=t, eps=eps, weight=weight, foreground=masks.repeat_interleave(n, dim=0), captions=[c for c in captions for _ in range(n)],
            c_concat=c_concat, text_kept=text_kept.repeat_interleave(n, dim=0), features=features, frozen_tokens=frozen, repeat=n, extras=extras,
        )

    def _drop_conditions(self, batch: dict, step: int, micro: int) -> Tuple[List[str], torch.Tensor]:
        """Condition dropout (``adapters/training/condition_dropout.py``), in place on ``batch["features"]``:
        FACT's paired/shuffled choice first (targets with a ``pairing``), then dropped identities
        get zero features. Returns the captions (dropped ones empty) and which were kept ``[B]``."""
        count = len(batch["captions"])
        if self.pairing is not None:
            shuffle = shuffle_probability(step, self.steps, *self.pairing)
            shuffled = face_pairing(count, shuffle, step_generator(self.seed, step, micro, self.rank, stream=12))
            batch["features"] = [ref if s else own for ref, own, s in zip(batch["features"], batch["own_features"], shuffled.tolist())]
        drop_identity, drop_text = self.dropout.draw(count, step_generator(self.seed, step, micro, self.rank, stream=11))
        batch["features"] = [zero_features(f) if f is not None and d else f for f, d in zip(batch["features"], drop_identity.tolist())]
        captions = ["" if d else c for c, d in zip(batch["captions"], drop_text.tolist())]
        return captions, ~drop_text

    @torch.no_grad()
    def _frozen_tokens(self, adapter, features: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        from ...adapters.projectors.projector_pva import PVATransformNetwork

        projector = adapter.projector
        p = next(projector.parameters())
        out = []
        for f in features:
            feats = _features_to(identity_features(f, fuse=not isinstance(projector, PVATransformNetwork)), p.device, p.dtype)
            out.append(projector.project(feats).float().cpu())
        return torch.cat(out)

    def encode_with(self, caption: str, vectors: Optional[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``caption`` encoded with ``<new1>`` = ``vectors`` (None: a prompt without the word), keeping gradients."""
        text = with_marker(caption, PLACEHOLDER, self.token.marker) if self.token is not None and PLACEHOLDER in caption else caption
        self._override = vectors
        try:
            return encode_tokens(self.tclip, self.tclip.tokenize(text))
        finally:
            self._override = None

    def _context(self, captions: List[str]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        conds, pooled = [], []
        for caption in captions:
            if not self.train_token and caption in self._contexts:
                c, p = self._contexts[caption]
            else:
                text = with_marker(caption, PLACEHOLDER, self.token.marker) if self.token is not None else caption
                with contextlib.nullcontext() if self.train_token else torch.no_grad():
                    c, p = encode_tokens(self.tclip, self.tclip.tokenize(text))
                if not self.train_token:
                    self._contexts[caption] = (c, p)
            conds.append(c)
            pooled.append(p)
        lengths = {c.shape[1] for c in conds}
        if len(lengths) > 1:
            raise ValueError("captions of one batch encode to different lengths: keep every caption under 75 tokens")
        return torch.cat(conds).to(self.device), (torch.cat(pooled) if pooled[0] is not None else None)

    # --- the loss ----------------------------------------------------------------------------------
    def _loss(self, mb: MicroBatch):
        feed = self.feed
        feed.start()
        feed.foreground = mb.foreground.to(self.device) if mb.foreground is not None else None
        feed.extras.update(repeat=mb.repeat, timesteps=mb.timesteps, captions=mb.captions, device=self.device, text_kept=mb.text_kept)
        feed.extras.update({k: v.to(self.device) for k, v in (mb.extras or {}).items()})
        feed.tokens = mb.frozen_tokens.to(self.device) if mb.frozen_tokens is not None else None
        if mb.features is not None:
            p = next(iter(self.step_module.parameters()))
            feed.features = [_features_to(f, p.device, torch.float32) for f in mb.features]
        for t in self.targets:
            t.prepare(feed)
        context, pooled = self._context(mb.captions)
        y = None
        if pooled is not None:
            y = adm_vector(self.model, pooled, self.resolution, 1, self.device)
            y = None if y is None else (y if y.shape[0] == context.shape[0] else y.expand(context.shape[0], -1))
        x_noisy = (flow_noisy(mb.x0, mb.sigma, mb.eps) if self.flow else mb.x0 + mb.sigma.reshape(-1, 1, 1, 1) * mb.eps).to(self.device)
        sigma = mb.sigma.to(self.device)
        inputs = {k: v for t in self.targets for k, v in getattr(t, "model_inputs", lambda *a: {})(self.model, pooled, context.shape[0], self.device).items()}
        c_concat = mb.c_concat.to(self.device) if mb.c_concat is not None else None
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            for t in self.targets:
                t.before_forward(feed, x_noisy, sigma, as_normal(context), y)
            x0_hat = predict_x0(self.unet, x_noisy, sigma, as_normal(context), c_concat=c_concat, y=y, transformer_options=self.options, extra_conds=inputs)
        weight = mb.weight.to(self.device) if mb.weight is not None else None
        if self.flow:
            terms = {"denoise": flow_matching_loss(x0_hat, x_noisy, sigma, mb.x0.to(self.device), mb.eps.to(self.device), weight)}
        else:
            terms = {"denoise": denoising_loss(x0_hat, x_noisy, sigma, mb.eps.to(self.device), weight)}
        for t in self.targets:
            terms.update({k: v.float() for k, v in t.regularizers(feed).items()})
        feed.stop()
        total = torch.stack(list(terms.values())).sum()
        return total, {k: v.detach() for k, v in terms.items()}

    # --- the loop ----------------------------------------------------------------------------------
    def train(self, until: Optional[int] = None, progress: bool = True) -> None:
        """Run optimizer steps until ``until`` (default: the config's ``steps``), checkpointing on the way."""
        until = self.steps if until is None else min(int(until), self.steps)
        tcfg = self.cfg["train"]
        every, log_every = int(tcfg["checkpoint_every"]), max(1, int(tcfg["log_every"]))
        line = ProgressLine(self.steps, start=self.step) if progress and self.rank == 0 else None
        try:
            while self.step < until:
                batches = [self._micro_batch(self.step, m) for m in range(self.grad_accum)]  # VAE work outside the training session
                sums: Dict[str, float] = {}
                with torch.inference_mode(False), torch.enable_grad(), self.models:
                    for m, mb in enumerate(batches):
                        sync = self.world == 1 or m == self.grad_accum - 1
                        with contextlib.nullcontext() if sync else self.ddp.no_sync():
                            loss, terms = self.ddp(mb)
                            scaled = loss / self.grad_accum
                            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                        for k, v in terms.items():
                            sums[k] = sums.get(k, 0.0) + float(v) / self.grad_accum
                    if self.scaler is not None:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                record = {"loss": sum(sums.values())}
                if len(sums) > 1:  # the terms too, when there is more than the denoising loss
                    record.update(sums)
                for k, v in record.items():
                    self.history.setdefault(k, []).append(v)
                sums = record
                if not math.isfinite(sums["loss"]):
                    raise FloatingPointError(f"the loss became {sums['loss']} at step {self.step}: lower the learning rate")
                if line is not None:
                    line.update(self.step, {"loss": sums["loss"]}, force=self.step % log_every == 0 or self.step == until)
                if self.rank == 0 and self.step % log_every == 0:
                    self.plot()
                if every > 0 and self.step % every == 0 and self.step < self.steps:
                    self.save_checkpoint()
        finally:
            if line is not None:
                line.end()

    def close(self) -> None:
        """Unload the training clones (the shared models are as before)."""
        self.models.release()

    # --- files -------------------------------------------------------------------------------------
    @property
    def out_dir(self) -> str:
        return self._path(self.cfg["output"]["dir"])

    def checkpoint_state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "step": self.step,
            "samples": self.samples,
            "targets": {t.name: {k: v.detach().cpu().clone() for k, v in t.module.state_dict().items()} for t in self.targets},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()},
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "config": json.dumps(self.cfg, sort_keys=True, default=str),
        }

    def save_checkpoint(self) -> Optional[str]:
        if self.rank != 0:
            return None
        folder = os.path.join(self.out_dir, "checkpoints")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{self.step:07d}.pt")
        state = self.checkpoint_state()
        write_atomically(path, lambda f: torch.save(state, f))  # a fresh temporary file, never a planted link
        write_atomically(os.path.join(folder, "latest.txt"), lambda f: f.write(os.path.basename(path).encode()))
        return path

    def resume(self, path: str) -> None:
        """Continue from a checkpoint (a file, or a run folder / its checkpoints folder: the latest)."""
        path = latest_checkpoint(path)
        from ...adapters.weights.safe_load import load_pytorch_object

        state = load_pytorch_object(path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a trainer checkpoint")
        for t in self.targets:
            if t.name not in state["targets"]:
                raise ValueError(f"the checkpoint has no '{t.name}' target (it has {', '.join(state['targets'])})")
            t.module.load_state_dict(state["targets"][t.name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.samples = int(state["samples"])
        self.history = {k: [float(x) for x in v.tolist()] for k, v in state["history"].items()}
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.log(f"resumed from {path} at step {self.step}")

    def plot(self) -> Optional[str]:
        if self.rank != 0 or not self.history:
            return None
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, "loss.png")
        save_png(draw_loss_curves(self.history, title=f"{self.cfg['output']['name']}: step {self.step}/{self.steps}", width=800, height=400), path)
        return path

    def export(self) -> List[str]:
        """Write the trained weights (rank 0): one native file per target (+ a prompt-word file)."""
        paths = []
        if self.cfg["output"].get("save_every_rank"):
            state = {f"{t.name}.{k}": v.detach().float().cpu().contiguous() for t in self.targets for k, v in t.module.state_dict().items()}
            write_safetensors(os.path.join(self.out_dir, f"final_rank{self.rank}.safetensors"), state)
        if self.rank != 0:
            return paths
        os.makedirs(self.out_dir, exist_ok=True)
        name = self.cfg["output"]["name"]
        context_dim = self.layers[0].context_dim if self.layers else context_width(self.model)
        base = self.base if self.base != "unknown" else "sd15"
        for t in self.targets:
            meta = {"trained_steps": str(self.step), "learning_rate": f"{self.learning_rates[t.name]:g}", "seed": str(self.seed)}
            suffix = "" if len(self.targets) == 1 else f"_{t.name}"
            files = t.export_files(base, context_dim, meta)
            if files is None:
                path = os.path.join(self.out_dir, f"{name}{suffix}.safetensors")
                write_native(t.export(base, context_dim, meta), path)
                paths.append(path)
                files = {}
            for extra_suffix, (tensors, header) in files.items():
                path = os.path.join(self.out_dir, f"{name}{suffix}{extra_suffix}.safetensors")
                write_safetensors(path, tensors, metadata=header)
                paths.append(path)
            vectors = getattr(getattr(t, "tokens", None), "export", lambda: {})()
            if vectors:
                token_path = os.path.join(self.out_dir, f"{name}_token.safetensors")
                write_safetensors(token_path, embedding_file_tensors(vectors))
                paths.append(token_path)
        self.plot()
        with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
            json.dump({"steps": self.step, "files": [os.path.basename(p) for p in paths], "final": {k: v[-1] for k, v in self.history.items()}}, f, indent=2)
        return paths


def latest_checkpoint(path: str) -> str:
    if os.path.isfile(path):
        return path
    for folder in (os.path.join(path, "checkpoints"), path):
        marker = os.path.join(folder, "latest.txt")
        if os.path.isfile(marker):
            with open(marker) as f:
                return os.path.join(folder, f.read().strip())
    raise FileNotFoundError(f"no trainer checkpoint at {path}")


# --- command line -----------------------------------------------------------------------------------


def distributed() -> Tuple[int, int, int]:
    """``(rank, world, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def run(config_path: str, resume: Optional[str] = None, stop_at: Optional[int] = None, models: Optional[Tuple] = None, log=None) -> Trainer:
    """Train from a config file (the CLI's work; ``models`` skips loading, for tests)."""
    from ...adapters.training.training_config_checks import check_training_config

    from ...adapters.training.training_config_checks import TrainingConfigError

    try:
        config = load_config(config_path)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise TrainingConfigError("config", f"{config_path} cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                                  "write valid JSON (or TOML for a .toml file); see the example in nodes/training/trainer.py") from None
    config_dir = os.path.dirname(os.path.abspath(config_path))
    check_training_config(config, config_dir)  # one clear error per bad value, before any model loads
    rank, world, _ = distributed()
    if models is None:
        models = load_models(config["models"], config_dir)
    trainer = Trainer(config, models, config_dir=config_dir, rank=rank, world=world, log=log)
    try:
        if resume:
            trainer.resume(resume if os.path.isabs(resume) else os.path.join(os.getcwd(), resume))
        trainer.train(until=stop_at)
        if stop_at is not None and trainer.step < trainer.steps:
            trainer.save_checkpoint()
        else:
            for path in trainer.export():
                trainer.log(f"wrote {path}")
    finally:
        trainer.close()
    return trainer


def main(argv: Optional[List[str]] = None) -> int:
    _import_targets()
    parser = argparse.ArgumentParser(
        prog="python -m <pack>.train",
        description="Train Identity Attention weights (PVA modules, MoA routers, ...) on a folder of images.",
        epilog=(
            "First cache the identity features of the folder: 'python -m <pack>.train prepare FOLDER --face-pack antelopev2'. "
            "Targets: " + ", ".join(sorted(TARGETS)) + ". "
            "Not provided: PVA's stage 2 (training the ArcFace recognizer itself): the recognizer runs through onnxruntime and stays frozen."
        ),
    )
    parser.add_argument("config", help="the training config (JSON or TOML)")
    parser.add_argument("--comfyui", help="the ComfyUI folder (default: COMFYUI_PATH, or ../.. from the pack)")
    parser.add_argument("--resume", help="continue from a checkpoint file or a run folder (its latest checkpoint)")
    parser.add_argument("--stop-at", type=int, help="stop after this step and write a checkpoint (to continue later with --resume)")
    args = parser.parse_args(argv)
    rank, world, local_rank = distributed()
    if world > 1:
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    from ...adapters.training.training_config_checks import TrainingConfigError

    try:
        run(args.config, resume=args.resume, stop_at=args.stop_at)
    except TrainingConfigError as err:
        print(f"error in {args.config}: {err}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    return 0
