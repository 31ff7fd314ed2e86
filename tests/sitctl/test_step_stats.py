"""A step's statistics own their packing: buckets by t, REPA's sum, the saved form older checkpoints wrote."""

import pytest
import torch

from sitctl.metrics_log import LogWindow, append_row
from sitctl.step_stats import TIME_BUCKETS, StepStats


def test_losses_fall_into_tenth_buckets_of_t_with_the_ends_in_the_outer_ones():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    t = torch.tensor([0.0, 0.05, 0.1, 0.95, 1.0])  # t = 1 belongs to the last bucket, not an eleventh
    stats = StepStats.of(losses, t)
    assert stats.loss_sums.tolist() == [3.0, 3.0, 0, 0, 0, 0, 0, 0, 0, 9.0]
    assert stats.counts.tolist() == [2.0, 1.0, 0, 0, 0, 0, 0, 0, 0, 2.0]
    assert stats.losses() == {"loss": 3.0, "loss_by_t": [1.5, 3.0, *[None] * 7, 4.5]}
    assert stats.align_sum is None


def test_pack_is_sums_then_counts_then_repas_sum_and_unpack_inverts_it():
    # The layout checkpoints written before StepStats existed keep in their log window: resumes read them alike.
    stats = StepStats.of(torch.tensor([1.0, 2.0]), torch.tensor([0.15, 0.85]), torch.tensor([-0.5, -0.25]))
    flat = stats.pack()
    assert flat.tolist() == [0, 1.0, 0, 0, 0, 0, 0, 0, 2.0, 0] + [0, 1.0, 0, 0, 0, 0, 0, 0, 1.0, 0] + [-0.75]
    back = StepStats.unpack(flat)
    assert torch.equal(back.pack(), flat) and back.align_loss() == -0.375
    assert StepStats.unpack(flat[: 2 * TIME_BUCKETS]).align_sum is None
    assert StepStats.from_record(stats.record(), "cpu").record() == stats.record()


def test_statistics_add_field_by_field():
    one = StepStats.of(torch.tensor([1.0]), torch.tensor([0.05]), torch.tensor([0.5]))
    two = StepStats.of(torch.tensor([3.0]), torch.tensor([0.05]), torch.tensor([0.25]))
    both = one + two
    assert both.loss_sums[0] == 4.0 and both.counts[0] == 2.0 and both.align_sum.item() == 0.75


def test_a_window_saved_and_restored_completes_its_row_at_the_logged_speed(tmp_path):
    window = LogWindow()
    assert window.record() is None
    for loss in (1.0, 3.0):
        window.add(StepStats.of(torch.tensor([loss]), torch.tensor([0.5])), seconds=2.0)
    record = window.record()
    assert record == {"stats": [0] * 5 + [4.0] + [0] * 4 + [0] * 5 + [2.0] + [0] * 4, "steps": 2}
    append_row(tmp_path, {"step": 10, "loss": 1.0, "images_per_sec": 16.0})
    restored = LogWindow.from_record(record, tmp_path, global_batch=8, device="cpu")
    assert (restored.steps, restored.seconds, restored.stats.losses()["loss"]) == (2, 1.0, 2.0)  # 2 steps x 8 / 16 img/s
    assert LogWindow.from_record(None, tmp_path, global_batch=8, device="cpu").steps == 0


@pytest.mark.parametrize("aligned", [False, True])
def test_a_step_and_its_stop_votes_travel_as_one_tensor_and_come_apart_exactly(aligned):
    from sitctl.signals import STOP_SIGNALS, AgreedStop, stop_votes

    stats = StepStats.of(torch.rand(6), torch.rand(6), torch.rand(6) if aligned else None)
    summed = torch.cat([stats.pack(), stop_votes(STOP_SIGNALS[1], "cpu")])
    assert torch.equal(StepStats.unpack(summed[: -len(STOP_SIGNALS)]).pack(), stats.pack())
    agreed = AgreedStop()
    assert agreed(summed[-len(STOP_SIGNALS):]) == 0  # read one step late
    assert agreed(stop_votes(None, "cpu")) == STOP_SIGNALS[1]
    assert agreed(stop_votes(None, "cpu")) == 0
