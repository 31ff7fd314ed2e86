# Developer recipes. `pip install rust-just` provides `just`.

venv := ".venv/bin/"

# Run the whole test suite (the README's test command without the install step).
test *ARGS:
    {{venv}}pytest -q {{ARGS}}

# Run the end-to-end demo.
demo:
    {{venv}}sitctl demo

# Benchmark the network: forward and train-step time, images/s, FLOP/s, peak memory.
bench-model MODEL="SiT-S/2" BATCH="8" PRECISION="fp32":
    {{venv}}python -m sitctl.bench model --model {{MODEL}} --batch {{BATCH}} --precision {{PRECISION}}
