"""Face analysis with insightface + onnxruntime: find, align and embed the faces of reference photos.

FACE_ANALYSIS (:class:`FaceAnalysisModel`) is one insightface *pack*: a folder
``<root>/models/<name>/`` (``antelopev2``, ``buffalo_l``...) holding ``.onnx`` files,
of which this module uses the face detector (SCRFD: boxes, scores, 5 landmarks) and
the recognizer (ArcFace: ``[N, 3, 112, 112] -> [N, E]``, E = 512). The other files of a
pack (106/68-point landmarks, gender/age) are never loaded: they cost memory and time
and nothing here uses them.

:func:`encode_identity` turns reference photos into an :class:`~.identity.Identity`:

1. detect faces at ``det_size``; with ``retry`` on, again at smaller sizes (steps of 64
   down to 128) until one is found. A detector sees faces in a band of sizes relative to
   its input; close-ups and small photos upscaled to 640 are too big for it, which is the
   usual reason for "no face" on a good photo. Faces that are tiny in a large photo need
   the opposite (a larger det_size, or a crop), which the error message says.
2. choose one face per photo: ``largest`` (box area), ``most central`` (box centre
   nearest the photo centre) or ``index`` (faces numbered 0, 1, ... from left to right).
3. align it like insightface's ``norm_crop`` (similarity transform of the 5 landmarks
   onto the ArcFace template, :mod:`.face_alignment`) at the recognizer's input size, and embed it.
4. with ``flip``, also embed the mirrored crop (a second :class:`FaceRecord` with
   ``flipped=True``, its box and landmarks mirrored into the flipped photo's pixels,
   left/right landmarks swapped so index 0 stays the subject's right eye).

Choices left open by the papers and packs, made here:

- the aligned crop kept in the IDENTITY is always 112x112 (the template's native size),
  whatever the recognizer's input size; CLIP-vision crops are taken at 224 by the caller
  with :meth:`FaceAnalysisModel.align` (same framing, twice the pixels, no upscaling blur).
- "index" counts faces left to right (by box centre x), which is what an artist sees; the
  detector's own order is by score and changes between photos.
- RGBA input: alpha is dropped (RGB used as stored); grayscale is repeated to 3 channels.
- a face mirrored for augmentation is embedded from the mirrored aligned crop (one
  recognizer pass, no second detection); the ArcFace template is symmetric to 0.3 px.

insightface, onnxruntime and cv2 are imported inside functions, so this module (and the
node pack) import without them; a missing one raises :class:`FaceDependencyError` with the
pip command for this Python. Nothing here imports ComfyUI.

Benchmarks call :func:`load_face_analysis` once and :func:`encode_identity` (or
:func:`encode_images`) on N images.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .face_alignment import align_face
from .face_pack_files import check_pack_manifest, damaged_file_problem, pack_file_entry, redownload_command
from .identity import FaceRecord, Identity
from .recognizer_identity import RecognizerId, identify_recognizer
from ..weights.safe_load import onnx_file_problem

# ---------------------------------------------------------------------------------------------
# errors (the nodes turn them into IdentityAttentionError / MissingDependencyError)


class FaceAnalysisError(Exception):
    """A problem an artist can fix; ``problem``, ``fix`` and ``input_name`` are worded for them."""

    def __init__(self, problem: str, fix: Optional[str] = None, input_name: Optional[str] = None):
        self.problem, self.fix, self.input_name = problem, fix, input_name
        super().__init__(problem + (f" Fix: {fix}" if fix else ""))


class FaceDependencyError(FaceAnalysisError):
    """insightface / onnxruntime / cv2 is not installed (``package``, ``pip_command``)."""

    def __init__(self, package: str, pip_command: str):
        self.package, self.pip_command = package, pip_command
        super().__init__(f"the Python package '{package}' is not installed", fix=f"run `{pip_command}`")


class NoFaceError(FaceAnalysisError):
    """No face in one image; ``image_number`` is 1-based as artists count."""

    def __init__(self, image_number: int, problem: str, fix: str):
        self.image_number = image_number
        super().__init__(problem, fix=fix, input_name="images")


# ---------------------------------------------------------------------------------------------
# dependencies

PACK_ROOT = Path(__file__).resolve().parents[2]
DEPENDENCY_MODULES = {"insightface": "insightface", "onnxruntime": "onnxruntime", "cv2": "opencv-python-headless"}


def _install_plan_module():
    """The pack's ``install.py`` (the one place that decides what to pip-install), loaded by path."""
    import importlib.util as iu

    name = "_identity_attention_install_plan"
    if name not in sys.modules:
        spec = iu.spec_from_file_location(name, PACK_ROOT / "install.py")
        module = iu.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def missing_dependency_command() -> str:
    """The pip command line(s) that complete the face-analysis runtime in this Python (see install.py)."""
    try:
        plan = _install_plan_module()
        env = plan.current_environment()
        # a module that cannot be imported counts as missing even if metadata says otherwise
        providers = {m: (d if _importable(m) else []) for m, d in env.providers.items()}
        lines = plan.command_lines(plan.plan(plan.Environment(env.system, env.machine, env.torch_cuda, providers)))
    except Exception:  # noqa: BLE001 - never let the help text hide the real error
        lines = []
    return " && ".join(lines) or f'"{sys.executable}" -m pip install --no-deps "insightface>=2.1"'


# import name -> pip name, for insightface's own imports
PIP_NAMES = {"skimage": "scikit-image", "cv2": "opencv-python-headless", "sklearn": "scikit-learn", "PIL": "pillow",
             "google": "protobuf", "yaml": "pyyaml"}


def _importable(module: str) -> bool:
    if module in sys.modules and sys.modules[module] is None:  # blocked (tests, broken installs)
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_insightface():
    """Import and return ``(insightface, onnxruntime)`` or raise a :class:`FaceAnalysisError` that says what to do."""
    for module in ("onnxruntime", "cv2", "insightface"):
        if not _importable(module):
            raise FaceDependencyError(DEPENDENCY_MODULES[module], missing_dependency_command())
    try:
        import onnxruntime as ort
    except ImportError as err:  # installed but broken: a DLL / CUDA library that does not load
        raise FaceAnalysisError(
            f"onnxruntime is installed but does not load: {str(err).splitlines()[0][:200]}",
            fix="reinstall one build of it with ComfyUI's Python: `python -m pip uninstall -y onnxruntime onnxruntime-gpu` "
            "then `python -m pip install onnxruntime-gpu` (NVIDIA) or `python -m pip install onnxruntime`; on Windows also "
            "install the Microsoft Visual C++ Redistributable (see the README's troubleshooting)",
        ) from None
    try:
        import insightface
        from insightface.model_zoo import model_zoo  # noqa: F401
        from insightface.utils import face_align  # noqa: F401
    except ImportError as err:  # one of insightface's own dependencies, e.g. scikit-image
        top = (getattr(err, "name", None) or "").split(".")[0]
        if not top or top == "insightface":
            raise FaceAnalysisError(f"insightface does not load: {str(err).splitlines()[0][:200]}",
                                    fix=f"reinstall it: `{missing_dependency_command()}`") from None
        package = PIP_NAMES.get(top, top)
        raise FaceDependencyError(f"{package} (needed by insightface)", f'"{sys.executable}" -m pip install {package}') from None
    return insightface, ort


def available_providers() -> List[str]:
    _, ort = require_insightface()
    return list(ort.get_available_providers())


# ---------------------------------------------------------------------------------------------
# packs on disk

DETECTOR_NAMES = ("det_10g.onnx", "scrfd_10g_bnkps.onnx", "det_2.5g.onnx", "det_500m.onnx")
RECOGNIZER_NAMES = ("w600k_r50.onnx", "glintr100.onnx", "w600k_mbf.onnx")
# files of the usual packs this module never needs (landmarks 3D-68 / 2D-106, gender-age, face swap)
AUXILIARY_NAMES = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "inswapper_128.onnx", "inswapper_128_fp16.onnx")
EXPECTED_LAYOUT = (
    "models/insightface/models/<pack>/ with a face detector (det_10g.onnx or scrfd_10g_bnkps.onnx) "
    "and a face recognizer (w600k_r50.onnx or glintr100.onnx) in it, e.g. "
    "models/insightface/models/antelopev2/glintr100.onnx"
)


def _onnx_files(folder: Path) -> List[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".onnx" and p.is_file())
    except OSError:
        return []


def _pack_dir(candidate: Path) -> Optional[Path]:
    """``candidate`` if it holds .onnx files; its only subfolder if that does (a zip unpacked twice)."""
    if not candidate.is_dir():
        return None
    if _onnx_files(candidate):
        return candidate
    subdirs = [p for p in candidate.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and _onnx_files(subdirs[0]):
        return subdirs[0]
    return None


def pack_search_dirs(roots: Iterable[os.PathLike]) -> List[Path]:
    """Where packs are looked for: ``<root>/models/`` first (insightface's layout), then ``<root>/``."""
    dirs = []
    for root in roots:
        for d in (Path(root) / "models", Path(root)):
            if d not in dirs:
                dirs.append(d)
    return dirs


def list_face_packs(roots: Iterable[os.PathLike]) -> List[str]:
    """Names of the packs found under ``roots`` (the 'insightface' model folders), sorted, unique."""
    names = []
    for d in pack_search_dirs(roots):
        if not d.is_dir():
            continue
        for sub in sorted(d.iterdir()):
            if sub.name != "models" and sub.name not in names and _pack_dir(sub) is not None:
                names.append(sub.name)
    return sorted(names)


def find_face_pack(name: str, roots: Sequence[os.PathLike]) -> Path:
    """The folder of pack ``name``, or :class:`FaceAnalysisError` listing what was searched.

    ``name`` must be one folder name (no separators, no ``..``). Links: the insightface
    folder and a pack folder may be symbolic links to anywhere (a pack is the unit people
    share, e.g. insightface's own ``~/.insightface/models/antelopev2`` linked in), but the
    pack's ``.onnx`` files must really be inside the (real) pack folder: a file link out of
    it is refused, as are ONNX files whose external data leaves it (:func:`external_data_problem`).
    """
    if not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\x00")) or ":" in name:
        raise FaceAnalysisError(f"'{name}' is not a pack name (a pack is one folder name)", fix="pick a pack from the list", input_name="pack")
    searched = pack_search_dirs(roots)
    for d in searched:
        found = _pack_dir(d / name)
        if found is not None:
            pack_real = os.path.realpath(found)
            for path in _onnx_files(found):
                real = os.path.realpath(path)
                if not real.startswith(pack_real.rstrip(os.sep) + os.sep):
                    raise FaceAnalysisError(
                        f"{path.name} in the face analysis pack '{name}' is a symbolic link to {real}, outside the pack's folder",
                        fix="put the pack's .onnx files themselves in its folder (linking the whole pack folder is fine)",
                        input_name="pack",
                    )
            return found
    where = "; ".join(str(d / name) for d in searched) or "(no insightface model folder is registered)"
    present = list_face_packs(roots)
    raise FaceAnalysisError(
        f"face analysis pack '{name}' not found (searched: {where})"
        + (f"; packs present: {', '.join(present)}" if present else "; no packs are present"),
        fix=f"put the pack's .onnx files in {EXPECTED_LAYOUT}, then refresh the node list",
        input_name="pack",
    )


# ---------------------------------------------------------------------------------------------
# the loaded model


@dataclass(frozen=True)
class DetectedFace:
    """One detection in source pixels: ``bbox`` [4] (x0, y0, x1, y1), ``kps`` [5, 2], ``score``."""

    bbox: np.ndarray
    kps: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return float(max(self.bbox[2] - self.bbox[0], 0) * max(self.bbox[3] - self.bbox[1], 0))

    @property
    def center(self) -> Tuple[float, float]:
        return float(self.bbox[0] + self.bbox[2]) / 2, float(self.bbox[1] + self.bbox[3]) / 2


def _fixed_hw(shape) -> Optional[Tuple[int, int]]:
    try:
        h, w = shape[2], shape[3]
    except (IndexError, TypeError):
        return None
    return (int(h), int(w)) if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 else None


class FaceAnalysisModel:
    """The FACE_ANALYSIS socket value: a detector and a recognizer of one pack, ready to run."""

    def __init__(self, name: str, pack_dir: Path, detector, recognizer, detector_file: str, recognizer_file: str,
                 provider: str, det_size: int, det_thresh: float = 0.5, provider_reason: str = "",
                 recognizer_id: Optional[RecognizerId] = None):
        self.name, self.pack_dir = name, Path(pack_dir)
        self.provider_reason = provider_reason or provider
        self.recognizer_id = recognizer_id  # which embedding space (buffalo_l / antelopev2 / unknown), see recognizer_identity
        self.detector, self.recognizer = detector, recognizer
        self.detector_file, self.recognizer_file = detector_file, recognizer_file
        self.provider, self.det_size, self.det_thresh = provider, int(det_size), float(det_thresh)
        session = getattr(detector, "session", None)
        shape = session.get_inputs()[0].shape if session is not None else None
        fixed = _fixed_hw(shape) if shape is not None else None
        self.static_det_size = (fixed[1], fixed[0]) if fixed else None  # (w, h) of a fixed-shape detector

    def __repr__(self):
        return f"FaceAnalysisModel({self.name!r}, detector={self.detector_file}, recognizer={self.recognizer_file}, {self.provider}, det_size={self.det_size})"

    def report(self) -> str:
        """The node's info text: files, where they run (and why), which recognizer this is."""
        lines = [f"pack: {self.name} ({self.pack_dir})", f"detector: {self.detector_file}; recognizer: {self.recognizer_file}",
                 f"provider: {self.provider_reason}"]
        rid = self.recognizer_id
        if rid is None or rid.space is None:
            lines.append(f"WARNING: {rid.describe() if rid else 'recognizer not identified'}. IP-Adapter-FaceID / FaceID-Plus "
                         "need buffalo_l's w600k_r50.onnx, InstantID and PuLID antelopev2's glintr100.onnx; with this one "
                         "the adapters cannot check they get the embedding they were trained on.")
        else:
            users = "IP-Adapter-FaceID, FaceID-Plus, FaceID-PlusV2" if rid.space == "buffalo_l" else "InstantID, PuLID"
            lines.append(f"{rid.describe()}: the embedding {users} were trained on")
        return "\n".join(lines)

    @property
    def recognizer_label(self) -> str:
        return f"{self.name}/{self.recognizer_file}"

    @property
    def embedding_size(self) -> int:
        return int(self.recognizer.session.get_outputs()[0].shape[-1])

    @property
    def recognizer_input_size(self) -> int:
        return int(self.recognizer.input_size[0])

    # --- detection ------------------------------------------------------------------------
    def retry_sizes(self, retry: bool = True) -> List[int]:
        """Detection sizes tried in order: ``det_size``, then (retry) down by 64 to 128."""
        if self.static_det_size is not None:
            return [self.static_det_size[0]]
        sizes = [self.det_size]
        if retry:
            sizes += [s for s in range(self.det_size - 64, 127, -64)]
        return sizes

    def detect(self, image_bgr: np.ndarray, size: Optional[int] = None) -> List[DetectedFace]:
        """All faces in a BGR uint8 image ``[H, W, 3]`` at one detection size."""
        size = int(size or self.det_size)
        input_size = self.static_det_size or (size, size)
        bboxes, kpss = self.detector.detect(image_bgr, input_size=input_size, max_num=0)
        faces = []
        for i in range(bboxes.shape[0]):
            faces.append(DetectedFace(bboxes[i, :4].astype(np.float32), np.asarray(kpss[i], np.float32), float(bboxes[i, 4])))
        return faces

    def detect_with_retry(self, image_bgr: np.ndarray, retry: bool = True) -> Tuple[List[DetectedFace], Optional[int], List[int]]:
        """``(faces, size that found them or None, sizes tried)``."""
        tried = []
        for size in self.retry_sizes(retry):
            tried.append(size)
            faces = self.detect(image_bgr, size)
            if faces:
                return faces, size, tried
        return [], None, tried

    # --- alignment and embedding -------------------------------------------------------------
    def align(self, image_bgr: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
        """The face warped onto the ArcFace template, ``[size, size, 3]`` BGR uint8 (insightface's ``norm_crop``,
        computed by :mod:`.face_alignment` without scikit-image's deprecated estimator)."""
        return align_face(image_bgr, np.asarray(kps, np.float32), size)

    def embed(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        """Recognizer outputs ``[N, E]`` float32 for aligned BGR crops at the recognizer's input size."""
        if not crops_bgr:
            return np.zeros((0, self.embedding_size), np.float32)
        batch_dim = self.recognizer.session.get_inputs()[0].shape[0]
        if isinstance(batch_dim, int) and batch_dim == 1:  # a model exported with batch 1
            return np.concatenate([self.recognizer.get_feat([c]) for c in crops_bgr]).astype(np.float32)
        return np.asarray(self.recognizer.get_feat(list(crops_bgr)), np.float32)


# ---------------------------------------------------------------------------------------------
# loading


@dataclass(frozen=True)
class ProviderChoice:
    """Where the face models run: onnxruntime ``providers`` (+ ``options``), insightface's ``ctx_id``, and why."""

    providers: List[str]
    options: Optional[List[dict]]
    ctx_id: int
    label: str  # "CPU" or "CUDA"
    reason: str  # one line for the node's report, e.g. "auto -> CPU: ComfyUI runs with --cpu"


def torch_cuda_usable() -> bool:
    """True when torch sees a CUDA device (False on CPU builds and on CUDA builds without a GPU)."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as none
        return False


def choose_provider(provider: str, device_id: int = 0, cpu_only: bool = False) -> ProviderChoice:
    """The provider for 'auto' / 'CUDA' / 'CPU'.

    ``cpu_only``: the host runs on the CPU (ComfyUI's ``--cpu``). 'auto' takes CUDA only when
    onnxruntime has the CUDA provider, the host is not CPU-only and torch sees a CUDA device;
    otherwise the CPU provider alone, so onnxruntime never tries to load its CUDA libraries
    (which logs library-load errors on machines without a GPU before falling back).
    'CUDA' chosen by hand is honoured when onnxruntime and torch can give it, else an error.
    """
    want = provider.strip().lower()
    if want not in ("auto", "cuda", "cpu"):
        raise FaceAnalysisError(f"unknown provider '{provider}'", fix="choose auto, CUDA or CPU", input_name="provider")
    cpu = ProviderChoice(["CPUExecutionProvider"], None, -1, "CPU", "")
    if want == "cpu":
        return dataclasses.replace(cpu, reason="CPU (chosen)")
    available = available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    gpu = torch_cuda_usable()
    if want == "cuda":
        if not has_cuda:
            import onnxruntime as ort

            raise FaceAnalysisError(
                f"onnxruntime {getattr(ort, '__version__', '?')} in this Python has no CUDA provider (it offers: {', '.join(available)})",
                fix="choose provider auto or CPU, or replace the CPU build with the CUDA one: "
                "`python -m pip uninstall -y onnxruntime onnxruntime-gpu` then `python -m pip install onnxruntime-gpu` "
                "(its CUDA/cuDNN major version must match your driver's; see the pack's README)",
                input_name="provider",
            )
        if not gpu:
            raise FaceAnalysisError(
                "provider CUDA was chosen but this machine has no usable CUDA device (torch.cuda.is_available() is False)",
                fix="choose provider auto or CPU", input_name="provider")
        reason = "CUDA (chosen" + ("; ComfyUI itself runs with --cpu)" if cpu_only else ")") + f", device {int(device_id)}"
        return ProviderChoice(["CUDAExecutionProvider", "CPUExecutionProvider"], [{"device_id": int(device_id)}, {}],
                              int(device_id), "CUDA", reason)
    if cpu_only:
        return dataclasses.replace(cpu, reason="auto -> CPU: ComfyUI runs on the CPU (--cpu)")
    if not has_cuda:
        return dataclasses.replace(cpu, reason="auto -> CPU: this onnxruntime has no CUDA provider")
    if not gpu:
        return dataclasses.replace(cpu, reason="auto -> CPU: no usable CUDA device (torch.cuda.is_available() is False)")
    return ProviderChoice(["CUDAExecutionProvider", "CPUExecutionProvider"], [{"device_id": int(device_id)}, {}],
                          int(device_id), "CUDA", f"auto -> CUDA, device {int(device_id)}")


def resolve_providers(provider: str, device_id: int = 0, cpu_only: bool = False) -> Tuple[List[str], Optional[List[dict]], int, str]:
    """``(providers, provider_options, ctx_id, label)``: :func:`choose_provider` as a tuple."""
    c = choose_provider(provider, device_id, cpu_only)
    return c.providers, c.options, c.ctx_id, c.label


def _describe_onnx(path: Path) -> str:
    """Input/output shapes of an ONNX file, for error messages."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)

        def dims(v):
            return "x".join(d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim) or "?"

        ins = ", ".join(dims(v) for v in model.graph.input[:2])
        return f"input {ins}; {len(model.graph.output)} output(s) {', '.join(dims(v) for v in model.graph.output[:3])}"
    except Exception as err:  # noqa: BLE001 - only a description
        return f"not readable as ONNX ({type(err).__name__})"


def _onnx_tensors(graph):
    """Every TensorProto of an ONNX graph: initializers, sparse initializers, node attributes, subgraphs."""
    graphs = [graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def external_data_problem(path: Path) -> Optional[str]:
    """Why an ONNX file's external tensor data would be read from outside its folder, or None.

    An ONNX file may keep large tensors in other files ("external data", named by a
    path in the model). onnxruntime >= 1.2x and onnx >= 1.16 refuse paths that leave the
    model's folder; older ones (and insightface's own ``onnx.load`` of the recognizer)
    follow ``../../`` or absolute paths. Checked here for every file before loading.
    """
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable: onnxruntime reports it when loading
        return None
    folder = os.path.realpath(path.parent)
    for tensor in _onnx_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = os.path.realpath(os.path.join(folder, location))
        if not location or os.path.isabs(location) or ".." in Path(location).parts or not target.startswith(folder + os.sep):
            return f"its tensor '{tensor.name}' would be read from '{location}', outside the pack folder"
    return None


def _route(path: Path, providers, provider_options):
    """insightface's shape-based routing of one file: ``(model or None, reason)``."""
    from insightface.model_zoo import model_zoo

    unreadable = onnx_file_problem(str(path))  # size and content limits (safe_load), before onnx parses it
    if unreadable:
        return None, f"could not be loaded ({unreadable})"
    problem = external_data_problem(path)
    if problem:
        raise FaceAnalysisError(
            f"{path.name} in the face analysis pack was refused: {problem}",
            fix="delete this file and download the pack again from its publisher",
            input_name="pack",
        )

    try:
        model = model_zoo.get_model(str(path), providers=providers, provider_options=provider_options)
    except (IndexError, KeyError, AssertionError, TypeError):  # a valid ONNX file insightface's routing cannot place
        return None, f"not a face model ({_describe_onnx(path)})"
    except Exception as err:  # noqa: BLE001 - onnxruntime raises many kinds for a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None, f"could not be loaded ({first.split('failed:')[-1].strip()[:160]})"
    if model is None:
        return None, f"not a face model ({_describe_onnx(path)})"
    task = getattr(model, "taskname", None)
    if task == "recognition":
        width = model.session.get_outputs()[0].shape[-1]
        if not (isinstance(width, int) and width % 64 == 0 and 64 <= width <= 4096):
            return None, f"not a face recognizer: it outputs {width} values per image, not a face embedding ({_describe_onnx(path)})"
    return model, task


def _manifest_models(pack_dir: Path, providers, provider_options):
    """insightface 2.1 model packages with a ``manifest.json`` (V2): tasks are declared, not guessed."""
    try:
        from insightface.model_zoo.package_manifest import has_model_package_manifest
    except ImportError:
        return None
    problem, model_files = check_pack_manifest(pack_dir, Path(pack_dir).name)  # sizes and paths before insightface reads any
    for path in model_files:
        problem = problem or external_data_problem(path)
    if problem:
        raise FaceAnalysisError(f"the face analysis pack in {pack_dir} was refused: {problem}",
                                fix="delete the pack folder and download the pack again from its publisher", input_name="pack")
    if not has_model_package_manifest(pack_dir):
        return None
    from insightface.model_zoo import model_zoo

    found = {}
    for task in ("detection", "recognition"):
        try:
            found[task] = model_zoo.get_model(str(pack_dir), model_task=task, providers=providers, provider_options=provider_options)
        except Exception as err:  # noqa: BLE001
            found[task] = None
            found[task + "_error"] = str(err).splitlines()[0][:160]
    return found


def damaged_pack_error(name: str, pack_dir: Path, damaged, missing, notes) -> FaceAnalysisError:
    """The error for a pack whose detector or recognizer is a broken download: which file, and how to fetch it again."""
    commands = []
    for path, _ in damaged:
        command = redownload_command(pack_file_entry(name, path.name), name)
        if command and command not in commands:
            commands.append(command)
    whys = "; ".join(why for _, why in damaged)
    others = [n for n in notes if not n.endswith("incomplete or corrupt (see above)")]
    problem = (f"the face analysis pack '{name}' in {pack_dir} has a damaged file: {whys} "
               f"(so it has no {' and no '.join(missing)})" + (f"; other files: {'; '.join(others)}" if others else ""))
    if commands:
        fix = ("download it again (in ComfyUI/custom_nodes): `" + "` and `".join(commands)
               + f"`, or delete {', '.join(p.name for p, _ in damaged)} and save it again from its publisher")
    else:
        fix = f"delete {', '.join(p.name for p, _ in damaged)} and download the pack again from its publisher"
    return FaceAnalysisError(problem, fix=fix, input_name="pack")


def _identify(path: Path, pack: str) -> RecognizerId:
    """The recognizer's identity; never fails the load (an unreadable file is simply not identified)."""
    try:
        return identify_recognizer(path, pack)
    except Exception as err:  # noqa: BLE001 - identification is advisory
        return RecognizerId(pack, path.name, None, "?", None, f"could not be read ({type(err).__name__})")


def _session_provider(model) -> Optional[str]:
    try:
        return model.session.get_providers()[0]
    except Exception:  # noqa: BLE001 - a session-less test double
        return None


def load_face_analysis(pack_dir: os.PathLike, provider: str = "auto", det_size: int = 640, device_id: int = 0,
                       det_thresh: float = 0.5, name: Optional[str] = None, cpu_only: bool = False) -> FaceAnalysisModel:
    """Load the detector and recognizer of the pack in ``pack_dir`` (see :func:`find_face_pack`).

    ``cpu_only``: the host runs on the CPU (ComfyUI's ``--cpu``): 'auto' then never tries CUDA.
    """
    require_insightface()
    pack_dir = Path(pack_dir)
    name = name or pack_dir.name
    det_size = int(det_size)
    if det_size < 128 or det_size % 32:
        raise FaceAnalysisError(f"det_size {det_size} is not a multiple of 32 of at least 128",
                                fix="use 640 (the packs' default), or another multiple of 32", input_name="det_size")
    choice = choose_provider(provider, device_id, cpu_only)
    providers, options, ctx_id, label = choice.providers, choice.options, choice.ctx_id, choice.label

    detector = recognizer = None
    det_file = rec_file = ""
    notes = []
    damaged = []  # (path, why) of files that look like broken downloads
    manifest = _manifest_models(pack_dir, providers, options)
    if manifest is not None:
        detector, recognizer = manifest.get("detection"), manifest.get("recognition")
        det_file = Path(getattr(detector, "model_file", "") or "").name
        rec_file = Path(getattr(recognizer, "model_file", "") or "").name
        for task in ("detection", "recognition"):
            if manifest.get(task) is None:
                notes.append(f"manifest.json {task}: {manifest.get(task + '_error', 'missing')}")
    else:
        files = _onnx_files(pack_dir)
        for path in files:
            if path.name.lower() in AUXILIARY_NAMES:
                notes.append(f"{path.name}: not needed (skipped)")
                continue
            if detector is not None and recognizer is not None:
                break
            model, what = _route(path, providers, options)
            if model is None:
                damage = damaged_file_problem(path, name, what) if what.startswith("could not be loaded") else None
                if damage:
                    damaged.append((path, damage))
                    what = "incomplete or corrupt (see above)"
                notes.append(f"{path.name}: {what}")
            elif what == "detection" and detector is None:
                if not getattr(model, "use_kps", False):
                    notes.append(f"{path.name}: a face detector without landmarks (cannot align faces)")
                    continue
                detector, det_file = model, path.name
            elif what == "recognition" and recognizer is None:
                recognizer, rec_file = model, path.name
            else:
                notes.append(f"{path.name}: {what} model, not needed")
        if not files:
            notes.append("no .onnx files")

    missing = [role for role, m in (("face detector", detector), ("face recognizer", recognizer)) if m is None]
    if missing and damaged:
        raise damaged_pack_error(name, pack_dir, damaged, missing, notes)
    if missing:
        raise FaceAnalysisError(
            f"the face analysis pack '{name}' in {pack_dir} has no {' and no '.join(missing)}; files: "
            + ("; ".join(notes) or "none"),
            fix=f"use a complete pack such as antelopev2 or buffalo_l: {EXPECTED_LAYOUT}",
            input_name="pack",
        )
    detector.prepare(ctx_id, input_size=(det_size, det_size), det_thresh=det_thresh)
    recognizer.prepare(ctx_id)
    reason = choice.reason
    if label == "CUDA" and _session_provider(recognizer) not in (None, "CUDAExecutionProvider"):
        label, reason = "CPU", reason + f"; onnxruntime could not start CUDA and runs on {_session_provider(recognizer)}"
    rid = _identify(pack_dir / rec_file, name) if rec_file else None
    return FaceAnalysisModel(name, pack_dir, detector, recognizer, det_file, rec_file, label, det_size, det_thresh,
                             provider_reason=reason, recognizer_id=rid)


# ---------------------------------------------------------------------------------------------
# images in


def to_uint8_rgb(images) -> List[np.ndarray]:
    """Reference photos as a list of ``[H, W, 3]`` uint8 RGB arrays.

    Accepts a ComfyUI IMAGE (``[B, H, W, C]`` float in [0, 1], C = 1, 2, 3 or 4), one image
    ``[H, W, C]``, a grayscale batch ``[B, H, W]``, uint8 arrays, or a list of any of these
    (photos of different sizes). Alpha is dropped; gray is repeated.
    """
    if isinstance(images, (list, tuple)):
        out = []
        for item in images:
            out.extend(to_uint8_rgb(item))
        return out
    arr = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None] if arr.shape[-1] in (1, 2, 3, 4) else arr[..., None]
    if arr.ndim != 4:
        raise FaceAnalysisError(f"an image must be [batch, height, width, channels]; got shape {list(arr.shape)}",
                                fix="connect an IMAGE output (Load Image, VAE Decode...)", input_name="images")
    channels = arr.shape[-1]
    if channels in (1, 2):
        arr = np.repeat(arr[..., :1], 3, axis=-1)
    elif channels >= 3:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(np.nan_to_num(arr.astype(np.float32), nan=0.0) * 255.0), 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(a) for a in arr]


def rgb_to_bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1])


# ---------------------------------------------------------------------------------------------
# choosing a face

FACE_CHOICES = ("largest", "most central", "index")


def faces_left_to_right(faces: Sequence[DetectedFace]) -> List[DetectedFace]:
    return sorted(faces, key=lambda f: (f.center[0], f.center[1]))


def choose_face(faces: Sequence[DetectedFace], image_hw: Tuple[int, int], how: str = "largest", index: int = 0,
                image_number: int = 1) -> DetectedFace:
    """The face to use from one photo (see module docstring for the three rules)."""
    if not faces:
        raise ValueError("no faces to choose from")
    if how == "largest":
        return max(faces, key=lambda f: f.area)
    if how == "most central":
        cy, cx = image_hw[0] / 2.0, image_hw[1] / 2.0
        return min(faces, key=lambda f: (f.center[0] - cx) ** 2 + (f.center[1] - cy) ** 2)
    if how == "index":
        ordered = faces_left_to_right(faces)
        if not 0 <= index < len(ordered):
            raise FaceAnalysisError(
                f"reference image {image_number} has {len(ordered)} face{'s' if len(ordered) != 1 else ''} "
                f"(numbered 0 to {len(ordered) - 1} from left to right); face_index {index} does not exist",
                fix="lower face_index, or choose 'largest' / 'most central'",
                input_name="face_index",
            )
        return ordered[index]
    raise FaceAnalysisError(f"unknown face choice '{how}'", fix=f"choose one of {', '.join(FACE_CHOICES)}", input_name="face")


# ---------------------------------------------------------------------------------------------
# encoding

# landmark order: right eye, left eye (subject's), nose, right mouth corner, left mouth corner
FLIP_LANDMARK_ORDER = (1, 0, 2, 4, 3)


def mirror_face(face: DetectedFace, width: int) -> DetectedFace:
    """The same face in the horizontally flipped photo."""
    x0, y0, x1, y1 = face.bbox
    bbox = np.array([width - x1, y0, width - x0, y1], np.float32)
    kps = face.kps[list(FLIP_LANDMARK_ORDER)].copy()
    kps[:, 0] = width - kps[:, 0]
    return DetectedFace(bbox, kps.astype(np.float32), face.score)


@dataclass
class ImageReport:
    """What happened in one reference photo (for previews and notes)."""

    image_number: int  # 1-based
    size: Tuple[int, int]  # (H, W)
    faces: List[DetectedFace]
    chosen: DetectedFace
    det_size: int  # the detection size that found the faces
    sizes_tried: List[int]


@dataclass
class EncodeResult:
    identity: Identity
    reports: List[ImageReport]
    crops_224: Optional[List[np.ndarray]] = None  # RGB uint8, one per FaceRecord, when asked for
    notes: List[str] = field(default_factory=list)


def _crop_tensor(crop_bgr_112: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(crop_bgr_112[..., ::-1])).float().div(255.0)


def no_face_error(image_number: int, sizes_tried: Sequence[int], retry: bool, det_size: int, fixed: bool = False) -> NoFaceError:
    tried = ", ".join(str(s) for s in sizes_tried)
    if fixed:
        fix = (f"use a clearer frontal photo; this pack's detector works only at {tried}, so crop the photo around the face "
               "if it is small, or leave more room around it if it fills the photo")
    elif retry:
        fix = ("use a clearer frontal photo or lower det_size on the Load face analysis model node; "
               "if the face is small in a large photo, crop the photo around the face (or raise det_size)")
    else:
        fix = ("use a clearer frontal photo or lower det_size, or turn on retry_smaller_sizes "
               f"(det_size {det_size} alone was tried)")
    return NoFaceError(image_number, f"no face found in reference image {image_number} (detection sizes tried: {tried})", fix)


def encode_identity(
    model: FaceAnalysisModel,
    images,
    face: str = "largest",
    face_index: int = 0,
    retry: bool = True,
    flip: bool = False,
    crops_224: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> EncodeResult:
    """Reference photos -> IDENTITY (one :class:`FaceRecord` per photo, plus mirrored ones with ``flip``).

    ``images``: anything :func:`to_uint8_rgb` takes. ``progress(n)`` is called after each photo.
    ``crops_224``: also return 224x224 aligned RGB crops (one per record) for CLIP vision.
    Raises :class:`NoFaceError` naming the first photo without a face.
    """
    if face not in FACE_CHOICES:
        raise FaceAnalysisError(f"unknown face choice '{face}'", fix=f"choose one of {', '.join(FACE_CHOICES)}", input_name="face")
    photos = to_uint8_rgb(images)
    if not photos:
        raise FaceAnalysisError("no reference images were given", fix="connect at least one photo", input_name="images")
    records, reports, big, notes = [], [], [], []
    rec_size = model.recognizer_input_size
    for i, rgb in enumerate(photos):
        number = i + 1
        bgr = rgb_to_bgr(rgb)
        faces, used, tried = model.detect_with_retry(bgr, retry)
        if not faces:
            raise no_face_error(number, tried, retry, model.det_size, model.static_det_size is not None)
        chosen = choose_face(faces, rgb.shape[:2], face, face_index, number)
        if used != model.det_size:
            notes.append(f"image {number}: face found at detection size {used} (not at {model.det_size})")
        reports.append(ImageReport(number, rgb.shape[:2], faces, chosen, used, tried))

        dets = [chosen] + ([mirror_face(chosen, rgb.shape[1])] if flip else [])
        crop112 = model.align(bgr, chosen.kps, 112)
        rec_crop = crop112 if rec_size == 112 else model.align(bgr, chosen.kps, rec_size)
        crops = [rec_crop] + ([np.ascontiguousarray(rec_crop[:, ::-1])] if flip else [])
        for det, emb, flipped in zip(dets, model.embed(crops), (False, True)):
            records.append(FaceRecord(
                image_index=i,
                image_size=(int(rgb.shape[0]), int(rgb.shape[1])),
                bbox=torch.from_numpy(det.bbox.astype(np.float32)),
                landmarks=torch.from_numpy(det.kps.astype(np.float32)),
                det_score=float(det.score),
                embedding=torch.from_numpy(np.asarray(emb, np.float32).reshape(-1).copy()),
                crop=_crop_tensor(crop112[:, ::-1] if flipped else crop112),
                flipped=flipped,
            ))
        if crops_224:
            c224 = model.align(bgr, chosen.kps, 224)[..., ::-1]
            big.append(np.ascontiguousarray(c224))
            if flip:
                big.append(np.ascontiguousarray(c224[:, ::-1]))
        if progress is not None:
            progress(1)
    identity = Identity(faces=tuple(records), recognizer=model.recognizer_label, notes=tuple(notes),
                        recognizer_id=getattr(model, "recognizer_id", None))
    return EncodeResult(identity, reports, big if crops_224 else None, notes)


def encode_images(model: FaceAnalysisModel, images, **options) -> Identity:
    """Benchmark entry point: N photos -> IDENTITY (same options as :func:`encode_identity`)."""
    return encode_identity(model, images, **options).identity


# ---------------------------------------------------------------------------------------------
# similarity of generated images to an identity

SIMILARITY_CHOICES = ("largest", "most central", "best match")


@dataclass
class SimilarityResult:
    """Per image: cosine similarity of the chosen face to the identity (None: no face) and the faces."""

    scores: List[Optional[float]]
    faces: List[List[DetectedFace]]
    chosen: List[Optional[DetectedFace]]


def identity_similarity(model: FaceAnalysisModel, identity: Identity, images, face: str = "largest",
                        retry: bool = True) -> SimilarityResult:
    """Cosine similarity between each image's face and the identity's fused embedding.

    The reference is the mean of the identity's normalised embeddings, renormalised; the
    candidate is the normalised embedding of the chosen face (``largest``, ``most central``,
    or ``best match``: the face most similar to the identity). Benchmarks score identity
    with this function.
    """
    if face not in SIMILARITY_CHOICES:
        raise FaceAnalysisError(f"unknown face choice '{face}'", fix=f"choose one of {', '.join(SIMILARITY_CHOICES)}", input_name="face")
    if identity.embeddings.shape[-1] != model.embedding_size:
        raise FaceAnalysisError(
            f"the IDENTITY was made with a {identity.embeddings.shape[-1]}-value recognizer ({identity.recognizer}) "
            f"but this face analysis model gives {model.embedding_size} values ({model.recognizer_label})",
            fix="use the same face analysis model for Encode identity and Identity similarity",
            input_name="face_analysis",
        )
    reference = torch.nn.functional.normalize(identity.fused_embedding.double(), dim=0).numpy()
    scores, all_faces, chosen_faces = [], [], []
    rec_size = model.recognizer_input_size
    for rgb in to_uint8_rgb(images):
        bgr = rgb_to_bgr(rgb)
        faces, _, _ = model.detect_with_retry(bgr, retry)
        all_faces.append(faces)
        if not faces:
            scores.append(None)
            chosen_faces.append(None)
            continue
        candidates = faces if face == "best match" else [choose_face(faces, rgb.shape[:2], face)]
        embs = model.embed([model.align(bgr, f.kps, rec_size) for f in candidates]).astype(np.float64)
        embs /= np.maximum(np.linalg.norm(embs, axis=1, keepdims=True), 1e-12)
        sims = embs @ reference
        best = int(np.argmax(sims))
        scores.append(float(sims[best]))
        chosen_faces.append(candidates[best])
    return SimilarityResult(scores, all_faces, chosen_faces)
