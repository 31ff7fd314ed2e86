"""`just study`: the SiT paper's ablations at small scale on Fashion-MNIST, one choice at a time.

Three ablations, each a list of points; a point is a trained model (a run of the train stage)
sampled with one sampler setting (a samples artifact) and scored (a metrics artifact that keeps
the Inception features, so a bootstrap costs no extra forward pass):

    path       DiT -> SiT as the paper's Table 1 walks it: vp + discrete t + noise, then
               continuous t, velocity, the linear interpolant, and finally SDE sampling.
    objective  interpolant (linear, gvp, vp) x prediction (velocity, score, noise), all sampled
               with the same ODE; score is also trained with the likelihood weighting.
    sampler    on the best objective model: ODE heun / dopri5, SDE euler over w and over the
               diffusion forms, the guidance scale, and the number of steps.
    seeds      linear, gvp and vp with velocity (ODE), and linear with the SDE, trained again
               with other seeds: the spread of a score from one training run to the next;
               linear velocity sampled again with other sample seeds (the spread the bootstrap
               stands for); and linear velocity trained under bf16 autocast.
    convergence (asked for by name) FID against training step: SiT, + REPA, + logit-normal t,
               + both, and DiT-style, scored at kept checkpoints with one SDE; REPA aligns
               to the study's own small ViT (encoder.py); then sampling grids (FID against
               NFE per time shift) on the baseline's last checkpoint (convergence.py).

Every stage is the one the CLI runs (encode, train, eval ref, sample); the scores with their
bootstrap come from sitctl/evaluate/bootstrap.py over features kept in each point's metrics artifact.
A finished artifact is reused when it was made with the same settings from the same inputs
(sitctl/identity.py; one made otherwise is refused) and an unfinished training run resumes, so
the study runs in as many sittings as it takes (`--max-minutes` ends a sitting between points).
The report (tables and plots) is rewritten from whatever has finished after every point.

Every number has a spread: FID and KID are bootstrapped over the generated features (the
reference is fixed), the seeds table adds the spread over training seeds and over sample seeds,
and every table states the real-vs-real floor: the same scores for n real training images
against the same reference. All other points draw the same noise and labels (one sample seed),
so differences between them are not sampling noise of the seed.

The package holds one idea a module:

    points.py   what a point is (a model and a sampler), the ablations' lists, where results live
    run.py      running the points: each stage reused or resumed, sittings, the settings guard
    report.py   REPORT.md's tables and the plots, rebuilt from whatever has finished
    encoder.py  the convergence runs' REPA encoder: trained here, saved in a Hugging Face cache layout
    convergence.py  the convergence ablation's tables, steps-to-FID and plots
"""
