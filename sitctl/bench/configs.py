"""The settings of each benchmark command, declared once (the docstring under a field is its --help).

The `bench` commands are generated from these as the stage commands are from sitctl/configs.py.
Like that module, this one imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from sitctl.errors import BenchError
from sitctl.options import check_device, check_finite, setting


@dataclass(frozen=True, kw_only=True)
class _Printed:
    """Every benchmark prints a table, or one JSON line."""

    as_json: bool = setting(False, flags=("--json",))
    """Print the result as one JSON object."""

    def __post_init__(self) -> None:
        check_finite(self)
        check_device(getattr(self, "device", None))


@dataclass(frozen=True, kw_only=True)
class ModelBench(_Printed):
    model: str = "SiT-S/2"
    """Model name, e.g. SiT-XL/2."""
    batch: int = 8
    """Images per step."""
    precision: str = "fp32"
    """fp32, tf32 (TF32 matmuls) or bf16 (autocast)."""
    compile: bool = False
    """Run the network through torch.compile."""
    steps: int = 10
    """Timed steps (after the warm-up)."""
    warmup: int = 3
    """Untimed warm-up steps (compilation happens here)."""
    input_size: int = 32
    """Input side in latent cells (32 = 256x256 images)."""
    channels: int = 4
    """Input channels (4 for SD-VAE latents)."""
    device: str | None = None
    """Device; default cuda if present, else cpu."""


@dataclass(frozen=True, kw_only=True)
class EncodeBench(_Printed):
    src: str = "synthetic"
    """Image folder, digits, fashion-mnist[:DIR], or synthetic (500x375 JPEGs)."""
    image_size: int = 256
    """Center-crop side in pixels."""
    vae: str = "none"
    """ema, mse, none, a local AutoencoderKL directory, or sd-random (SD architecture, random weights)."""
    images: int = 64
    """Images to decode for the per-core rate."""
    batch: int = 32
    """Images per VAE forward (each with its flip)."""
    steps: int = 3
    """Timed VAE batches (after one warm-up)."""
    precision: str = "auto"
    """VAE autocast: auto, fp32, fp16, bf16."""
    device: str | None = None
    """Device; default cuda if present, else cpu."""


@dataclass(frozen=True, kw_only=True)
class LoaderBench(_Printed):
    latents: str | None = None
    """A latents artifact; default: synthetic 4x32x32 latents written to a temp dir."""
    images: int = 4096
    """Synthetic latents to write when no --latents is given."""
    batch: int = 256
    """Latents per batch."""
    lanes: int = 8
    """Data lanes (the train default)."""
    buffer: int = 1000
    """Shuffle buffer per lane (the train default)."""
    seconds: float = 5.0
    """How long to draw batches after the first."""
    encoder_targets: str = "none"
    """Synthetic samples also keep a 256-px photo crop for REPA's encoder, as encode --encoder-targets: none, images (raw) or png."""


@dataclass(frozen=True, kw_only=True)
class SamplingBench(_Printed):
    model: str = "SiT-XS/4"
    """Model name (random weights), e.g. SiT-XL/2."""
    batch: int = 8
    """Images per batch."""
    steps: tuple[int, ...] = setting((20,), repeat=True)
    """Step counts (repeat the option for several)."""
    cfg_scale: tuple[float, ...] = setting((1.0, 1.5), repeat=True)
    """Guidance scales; 1 is unguided (repeatable)."""
    sampler: tuple[str, ...] = setting(("ode:heun", "sde:euler"), repeat=True)
    """MODE:METHOD (repeatable)."""
    input_size: int = 32
    """Input side in latent cells."""
    vae: str = "none"
    """Decoder: none, ema, mse or a local AutoencoderKL directory."""
    device: str | None = None
    """Device; default cuda if present, else cpu."""


@dataclass(frozen=True, kw_only=True)
class InceptionBench(_Printed):
    batch: int = 32
    """Images per forward."""
    images: int = 32
    """Timed images (after one warm-up batch)."""
    image_size: int = 256
    """Side of the random uint8 images (resized to 299 inside)."""
    weights: str | None = None
    """Inception weights file; default: the cached or bundled ones."""
    device: str | None = None
    """Device; default cuda if present, else cpu."""


@dataclass(frozen=True, kw_only=True)
class AllBench:
    out: str | None = None
    """Bench artifact to create; default bench-out/<UTC date-time>."""
    benchmarks_md: str = "BENCHMARKS.md"
    """Markdown file whose section for this device is rewritten."""
    latents: str | None = None
    """Latents artifact for the loader; default: synthetic 4x32x32 latents written to a temp dir."""
    device: str | None = None
    """Device; default cuda if present, else cpu."""

    def __post_init__(self) -> None:
        check_device(self.device)


@dataclass(frozen=True, kw_only=True)
class GpuCheck:
    out: str = "gpu-check-out"
    """Working folder (both checks share its random VAE and latents): the runs, the sample sets, the metrics, results*.json."""
    benchmarks_md: str | None = None
    """Markdown file whose `GPU check` section is rewritten (default: BENCHMARKS.md; OUT/BENCHMARKS.md in a dry run)."""
    cpu_dry_run: bool = False
    """Run every step at tiny sizes on the CPU (2 processes on gloo; no CUDA graphs): checks the plumbing; the figures mean nothing."""
    gpus: int = 1
    """1: the one-GPU steps; 2: the NCCL steps (DDP training, the FID gather, the sampling merge) under torchrun."""

    def __post_init__(self) -> None:
        if self.gpus not in (1, 2):
            raise BenchError(f"--gpus must be 1 or 2, got {self.gpus}")
