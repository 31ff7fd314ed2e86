"""Memory planning: the traced activations against independent counts, the planner's choice and its
refusal, SiT-XL/2 at the bench's and train's sizes on an 80 GiB GPU, and an out-of-memory step as one line."""

import pytest
import torch
from torch import nn

import sitctl.train
from model.configs import model_config
from model.interpolants import interpolant
from model.network import SiT
from model.objectives import training_loss
from sitctl import memory
from sitctl.bench.report import CUDA_SIZES
from sitctl.configs import TrainConfig
from sitctl.errors import SitctlError
from sitctl.memory import GiB, bytes_saved_for_backward, footprint, plan_micro_batch_to_fit, saved_activation_bytes
from sitctl.train import plan_micro_batch
from tests.helpers import assert_one_error_line, cli, tiny_flags


def test_the_tracer_counts_what_a_linear_layer_saves_in_closed_form():
    layer = nn.Linear(3, 5)

    def saved(batch: int, precision: str) -> int:
        x = torch.randn(batch, 3, requires_grad=True)  # as inside a network: the input needs a gradient too

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                y = layer(x)  # (n, 5)
            return y.float().pow(2).sum()

        return bytes_saved_for_backward(forward, kept=layer.parameters())

    # fp32: the matmul saves its input (3 floats a sample) and its weight (a parameter, left out), and
    # pow its input (5 floats a sample): 4 x (3 + 5) = 32 bytes a sample.
    assert [saved(n, "fp32") for n in (1, 2, 7)] == [32, 64, 224]
    # bf16: the matmul saves bf16 copies of its input (2 x 3 bytes a sample) and of the weight (2 x 15
    # bytes, whatever the batch); pow the fp32 output (4 x 5): 26 bytes a sample + 30.
    assert [saved(n, "bf16") for n in (1, 2, 7)] == [26 + 30, 52 + 30, 182 + 30]


def _graph_saved_bytes(loss: torch.Tensor, kept) -> int:
    """Bytes of the distinct storages every node of `loss`'s autograd graph holds as `_saved_*` tensors:
    the graph walked after the fact, apart from the tracer's hooks."""
    skipped = {tensor.untyped_storage()._cdata for tensor in kept}
    storages, seen, nodes = {}, set(), [loss.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                for tensor in value if isinstance(value, tuple) else (value,):
                    if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in skipped:
                        storages[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        nodes.extend(parent for parent, _ in node.next_functions)
    return sum(storages.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_traced_activations_of_a_tiny_sit_match_its_real_autograd_graph(precision):
    config = model_config("SiT-T/2", input_size=8, num_classes=10)
    net = SiT(config)

    def real_graph_bytes(batch: int) -> int:
        x1, x0 = torch.randn(batch, 4, 8, 8), torch.randn(batch, 4, 8, 8)
        t, y = torch.rand(batch), torch.randint(0, 10, (batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = training_loss(net, x1, y, interp=interpolant("linear"), t=t, x0=x0)
        return _graph_saved_bytes(loss.float().sum() / batch, [*net.parameters(), *net.buffers()])

    real_per_sample = real_graph_bytes(3) - real_graph_bytes(2)
    assert real_per_sample > 0
    assert saved_activation_bytes(config, 3, precision) - saved_activation_bytes(config, 2, precision) == real_per_sample
    assert footprint(config, precision).per_sample == real_per_sample


def test_the_planner_takes_the_largest_divisor_of_the_share_that_fits():
    # 20 bytes static + 10 a sample against 100 usable: at most 8 samples, and 8 does not divide 12.
    assert plan_micro_batch_to_fit(12, 10, 20, 100, headroom=0.0) == 6
    assert plan_micro_batch_to_fit(12, 10, 20, 80, headroom=0.0) == 6  # exactly full fits
    assert plan_micro_batch_to_fit(12, 10, 20, 79, headroom=0.0) == 4
    assert plan_micro_batch_to_fit(12, 10, 20, 200, headroom=0.0) == 12  # the whole share when it fits
    assert plan_micro_batch_to_fit(12, 10, 20, 200, headroom=0.5) == 6  # headroom: 100 of 200 usable
    assert plan_micro_batch_to_fit(7, 10, 20, 60, headroom=0.0) == 1  # a prime share: 1 or all


def test_the_planner_refuses_in_one_line_when_one_sample_does_not_fit():
    with pytest.raises(SitctlError) as refused:
        plan_micro_batch_to_fit(256, GiB // 2, 12 * GiB, 12 * GiB, where="cuda:0")
    assert str(refused.value) == (
        "one sample a micro-batch needs 12.5 GiB (12.0 GiB of weights, gradients, optimizer state and workspace + "
        "0.50 GiB of activations), more than the 10.8 GiB usable of 12.0 GiB free on cuda:0; "
        "use a smaller model or a larger GPU")


def test_sit_xl2_at_the_bench_and_train_sizes_fits_80_gib_with_the_chosen_micro_batch():
    bench_batch = next(batch for name, batch, precision in CUDA_SIZES["models"] if (name, precision) == ("SiT-XL/2", "bf16")
                       and batch == 256)
    train_share = TrainConfig.__dataclass_fields__["global_batch"].default  # one process: its whole share
    xl = model_config("SiT-XL/2")  # 4x32x32 latents of 256-px images: 256 tokens, 1000 classes
    needs = footprint(xl, "bf16")
    # Measured on torch 2.14: 400,505,864 bytes (0.373 GiB) a sample, as the trace found; 1.25 GiB
    # of bf16 weight copies; 674.8 M parameters at 20 bytes + 1 GiB workspace: 14.8 GiB static.
    assert 0.36 < needs.per_sample / GiB < 0.38
    assert 14 < needs.static / GiB < 16
    assert bench_batch * needs.per_sample > 80 * GiB  # the whole batch in one forward cannot fit
    for share in (bench_batch, train_share):
        micro = plan_micro_batch_to_fit(share, needs.per_sample, needs.static, 80 * GiB)
        assert share % micro == 0 and micro < 256
        assert needs.static + micro * needs.per_sample <= 80 * GiB
        assert micro == 128  # 14.8 + 128 x 0.373 = 62.6 GiB; 256 would need 110.3


def test_train_on_a_gpu_without_micro_batch_takes_the_planned_one_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: 80 * GiB)  # an 80 GiB GPU, without one
    config = TrainConfig(latents=str(tmp_path), out=str(tmp_path / "run"), model="SiT-XL/2", precision="bf16")
    xl = model_config("SiT-XL/2")
    assert plan_micro_batch(config, 1, xl, torch.device("cuda", 0)) == 128
    assert capsys.readouterr().out.splitlines() == [
        "micro-batch 128 of the 256 samples per rank, the most that fit cuda:0 (about 62.6 GiB); --micro-batch sets it"]
    assert plan_micro_batch(config, 2, xl, torch.device("cuda", 0), is_main=False) == 128  # a share of 128 fits whole
    assert capsys.readouterr().out == ""  # only rank 0 speaks
    given = TrainConfig(latents=str(tmp_path), out=str(tmp_path / "run"), micro_batch=32)
    assert plan_micro_batch(given, 1, xl, torch.device("cuda", 0)) == 32  # as the user gave it
    assert plan_micro_batch(config, 1, xl, torch.device("cpu")) == 256  # a CPU: the whole share, as before


def test_a_step_out_of_memory_is_one_error_line_naming_the_micro_batch_to_try(digits_latents_dir, tmp_path, monkeypatch, capsys):
    def out_of_memory(run, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sitctl.train, "train_step", out_of_memory)
    status, stderr = cli("train", digits_latents_dir, "--out", tmp_path / "run", *tiny_flags(steps=1), capsys=capsys)
    assert_one_error_line(status, stderr)
    assert stderr.strip() == "error: out of memory at micro-batch 8 on cpu; pass --micro-batch 4"
    status, stderr = cli("train", digits_latents_dir, "--out", tmp_path / "one", *tiny_flags(steps=1, micro_batch=1),
                         capsys=capsys)
    assert_one_error_line(status, stderr, "out of memory at micro-batch 1 on cpu: one sample does not fit")
