"""The trainer's numbers against formulas written out here: the EMA recurrence and label dropout.

Both go through sitctl/train.py itself (prepare, train_step, train_loop), not through a helper
the trainer does not call, so a wrong lerp weight or an inverted dropout comparison fails here.
"""

import math

import torch
from safetensors.torch import load_file

from sitctl import distributed
from sitctl.checkpoint import list_checkpoints
from sitctl.train import prepare, train_loop, train_step
from tests.helpers import tiny


def test_ema_after_k_steps_is_the_explicit_recurrence(digits_latents_dir, tmp_path):
    # decay 0.9, not 0.5: with 0.5 a lerp weight of `decay` and of `1 - decay` would agree.
    decay, steps = 0.9, 3
    config = tiny(digits_latents_dir, tmp_path / "run", steps=steps, ckpt_every=1, keep_last=steps, ema_decay=decay)
    run = prepare(config, distributed.setup("cpu"))
    initial = {name: value.detach().double().clone() for name, value in run.net.state_dict().items()}
    try:
        train_loop(run)
    finally:
        run.batches.close()
    saved = [path for _, path in list_checkpoints(tmp_path / "run")]
    assert len(saved) == steps
    # ema_0 = theta_0; ema_k = decay ema_{k-1} + (1 - decay) theta_k (DiT's update_ema), in float64.
    expected = initial
    for path in saved:
        model = load_file(path / "model.safetensors")
        expected = {name: decay * expected[name] + (1 - decay) * model[name].double() for name in expected}
        ema = load_file(path / "ema.safetensors")
        moved = 0.0
        for name, value in expected.items():
            assert torch.allclose(ema[name].double(), value, rtol=0, atol=1e-6), (path.name, name)
            moved = max(moved, float((model[name].double() - value).abs().max()))
        assert moved > 1e-4  # the weights did move away from the EMA, so the check has teeth


class LabelRecorder(torch.nn.Module):
    """The real network, remembering every label batch the training loss feeds it."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x, t, y):
        self.seen.append(y.detach().clone())
        return self.net(x, t, y)


def test_trainer_drops_the_configured_fraction_of_labels_to_the_null_class(digits_latents_dir, tmp_path):
    dropout, steps = 0.25, 10
    config = tiny(digits_latents_dir, tmp_path / "run", steps=steps, ckpt_every=steps, label_dropout=dropout, global_batch=64)
    run = prepare(config, distributed.setup("cpu"))
    recorder = LabelRecorder(run.net)
    run.forward = recorder  # train_step calls run.forward: the labels it sees are the trainer's
    null = run.latents.num_classes
    given = []
    try:
        for _ in range(steps):
            batch = next(run.batches)
            given.append(batch["labels"])
            train_step(run, batch)
            run.optimizer.zero_grad(set_to_none=True)
    finally:
        run.batches.close()
    given, seen = torch.cat(given), torch.cat(recorder.seen)
    assert given.max() < null and len(seen) == len(given) == steps * 64
    dropped = seen != given
    assert torch.all(seen[dropped] == null)  # a dropped label becomes the null class, nothing else
    # Binomial(n, p): the dropped count lies within 4.5 standard deviations of n p (chance of a miss ~1e-5).
    n = len(given)
    bound = 4.5 * math.sqrt(n * dropout * (1 - dropout))
    assert abs(int(dropped.sum()) - n * dropout) < bound, (int(dropped.sum()), n * dropout, bound)
