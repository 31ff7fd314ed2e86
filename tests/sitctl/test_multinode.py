"""Past one machine, on one machine: the guide's SLURM script, and two torchrun agents as two nodes.

The SLURM script runs under bash with stand-ins for `scontrol` and `srun` that print a node list
and record the command srun would start on each node. Those same torchrun lines (nodes become
local agents, 8 GPUs become 1 CPU process, the head node becomes 127.0.0.1) then train for real
with c10d rendezvous over gloo, and must give the weights of one process.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sitctl.train import train
from tests.helpers import tiny, tiny_flags
from tests.torchrun import free_port

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
STAND_INS = {
    "scontrol": '[ "$1 $2" = "show hostnames" ] && printf "node-a\\nnode-b\\n"',
    # One task per node: record the command line each node would run (NUL-separated words).
    "srun": 'for node in $(seq "$SLURM_NNODES"); do printf "%s\\0" "$@" > "$RECORD/node-$node"; done',
}


def slurm_script() -> str:
    """The guide's multi-node sbatch script: the first bash block with #SBATCH lines (the second is the
    preemption-and-requeue variant of the same launch)."""
    scripts = [block for block in re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S) if "#SBATCH" in block]
    return scripts[0]


def expand_slurm_script(tmp_path: Path, nodes: int = 2, job_id: str = "4242") -> list[list[str]]:
    """The argv srun starts on each node when sbatch runs the guide's script on `nodes` nodes."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_NNODES": str(nodes), "SLURM_JOB_ID": job_id,
           "SLURM_JOB_NODELIST": "node-[a-b]", "RECORD": str(record)}
    subprocess.run(["bash", "-c", slurm_script()], env=env, check=True, timeout=30)
    return [(record / f"node-{node}").read_bytes().decode().split("\0")[:-1] for node in range(1, nodes + 1)]


def test_the_guides_slurm_script_starts_one_torchrun_per_node_with_c10d_rendezvous_on_the_head(tmp_path):
    lines = expand_slurm_script(tmp_path)
    expected = shlex.split(
        "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node-a:29500 --rdzv-id 4242 "
        "-m sitctl.cli train latents/in256 --model SiT-XL/2 --out runs/xl2-linear --precision bf16 --resume"
    )
    assert lines == [expected, expected]


def as_local_agent(line: list[str], port: int, train_args: list[str]) -> list[str]:
    """A node's torchrun line run on this machine: one CPU process, rendezvous on 127.0.0.1, tiny training."""
    options = line[1 : line.index("-m")]
    values = dict(zip(options[::2], options[1::2]))
    assert set(values) == {"--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"}
    values |= {"--nproc-per-node": "1", "--rdzv-endpoint": f"127.0.0.1:{port}", "--local-addr": "127.0.0.1"}
    return [sys.executable, "-m", "torch.distributed.run", *(word for pair in values.items() for word in pair),
            "-m", "sitctl.cli", "train", *train_args]


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_train_the_same_weights_as_one_process(digits_latents_dir, tmp_path):
    out = tmp_path / "two-nodes"
    # Micro-batches on each node too: gradient accumulation under DDP (no_sync, bucket views).
    train_args = [str(digits_latents_dir), "--out", str(out), "--steps", "3", "--ckpt-every", "3", "--micro-batch", "2",
                  *tiny_flags(eval_every=0)]  # no FID during training: it would build a reference in the working directory
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    agents = [subprocess.Popen(as_local_agent(line, port, train_args), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
              for line in expand_slurm_script(tmp_path)]
    try:
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(outputs)
    one = train(tiny(digits_latents_dir, tmp_path / "one", steps=3, ckpt_every=3))
    for name in ("model", "ema"):
        two_weights = load_file(out / "step-0000003" / f"{name}.safetensors")
        for key, value in load_file(one.path / f"{name}.safetensors").items():
            torch.testing.assert_close(two_weights[key], value, rtol=0, atol=2e-6, msg=f"{name} {key}")
    assert load_file(one.path / "model.safetensors")["final_layer.linear.weight"].abs().max() > 1e-4
