# Developer recipes. `pip install rust-just` provides `just`.

venv := ".venv/bin/"

# Run the whole test suite (the README's test command without the install step).
test *ARGS:
    {{venv}}pytest -q {{ARGS}}

# Mutation testing (mutmut 3, never in CI; docs/TESTING.md) of MODULES, e.g. `just mutants sitctl/data.py model/`:
# each mutant runs only the tests (of [tool.mutmut]'s selection) that cover its function, one child per core
# (MUTANT_CHILDREN). Tests the mutants of MODULES not yet killed and not listed in tests/mutants-equivalent.txt (new,
# changed, survived, timed out, untested), or all of them with MUTANTS_AGAIN=1; then prints the table of docs/TESTING.md
# and every survivor with its hash. mutmut is installed into the venv on first use; mutants/ keeps every verdict.
mutants +MODULES:
    #!/usr/bin/env bash
    set -euo pipefail
    {{venv}}python -c "import mutmut" 2>/dev/null || {{venv}}pip install -q "mutmut>=3.8.1,<4"
    prefixes=()  # mutmut names a mutant `module.function__mutmut_N`: sitctl/data.py -> sitctl.data.
    for module in {{MODULES}}; do module="${module%/}"; module="${module%.py}"; prefixes+=("${module//\//.}."); done
    names=("${prefixes[@]/%/*}")
    if [ -z "${MUTANTS_AGAIN:-}" ] && [ -d mutants ]; then
        mapfile -t names < <({{venv}}python tests/mutation.py pending "${prefixes[@]}")
    fi
    # One thread per child: torch's OpenMP pool in each of several children on few cores spins in the kernel
    # (a measured 100% system time and ~10 mutants a minute on 2 cores).
    if [ "${#names[@]}" -gt 0 ]; then
        time OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 {{venv}}mutmut run --max-children "${MUTANT_CHILDREN:-$(nproc)}" "${names[@]}"
    fi
    {{venv}}python tests/mutation.py table "${prefixes[@]}"

# Run the end-to-end demo.
demo:
    {{venv}}sitctl demo

# All benchmarks at sizes that fit this machine: a bench-out/ artifact and its BENCHMARKS.md section.
bench *ARGS:
    {{venv}}python -m sitctl.bench all {{ARGS}}

# On a GPU node, first: verdicts against stated thresholds (BENCHMARKS.md, "GPU check: what each step proves"): doctor,
# SiT-XL/2 trained under --precision auto vs tf32, 255 images with bf16 + compile + CUDA graphs vs fp32, the FID's
# Inception on CUDA vs the CPU, SiT-B/2 under --compile --micro-batch then --resume (< 8 min on an H100). Then `just bench`
# for the device's figures. `--cpu-dry-run` runs every step at tiny sizes on a CPU (about 2-4 minutes on 2 cores).
gpu-check *ARGS:
    {{venv}}python -m sitctl.bench gpu-check {{ARGS}}

# On a node with 2 GPUs, the NCCL steps under torchrun: DDP training vs one process, the FID gathered during training vs
# `sitctl eval fid`, `sitctl sample` over 2 processes vs one (about 2 min). `--cpu-dry-run`: the same on gloo.
gpu-check-2 *ARGS:
    {{venv}}python -m sitctl.bench gpu-check --gpus 2 {{ARGS}}

# Benchmark the network: forward and train-step time, images/s, FLOP/s, peak memory.
bench-model MODEL="SiT-S/2" BATCH="8" PRECISION="fp32":
    {{venv}}python -m sitctl.bench model --model {{MODEL}} --batch {{BATCH}} --precision {{PRECISION}}

# Benchmark the training loader on one core: start-up and steady-state latents/s (LATENTS: a latents artifact;
# empty writes synthetic 4x32x32 latents, ImageNet-256's shape, to a temp dir).
bench-loader LATENTS="" SECONDS="5":
    {{venv}}python -m sitctl.bench loader {{ if LATENTS == "" { "" } else { "--latents " + LATENTS } }} --seconds {{SECONDS}}

# Benchmark the samplers (ODE and SDE, with and without guidance) on a randomly initialised SiT.
bench-sampling MODEL="SiT-XS/4" BATCH="8" STEPS="20":
    {{venv}}python -m sitctl.bench sampling --model {{MODEL}} --batch {{BATCH}} --steps {{STEPS}}

# Benchmark FID Inception feature extraction.
bench-inception BATCH="32" IMAGES="32":
    {{venv}}python -m sitctl.bench inception --batch {{BATCH}} --images {{IMAGES}}

# Benchmark encode: decode-and-crop per core, and the VAE (VAE: none, sd-random, ema, mse).
bench-encode VAE="none" SIZE="256":
    {{venv}}python -m sitctl.bench encode --vae {{VAE}} --image-size {{SIZE}}

# The SiT paper's ablations at small scale on Fashion-MNIST (docs/REPRODUCTION.md); reruns resume. OUT: its folder.
study OUT="study-out" *ARGS:
    nice -n 15 {{venv}}sitctl study --out {{OUT}} {{ARGS}}
