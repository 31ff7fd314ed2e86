"""The SiT network: shapes, adaLN-Zero initialisation, positions, published-weight loading."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
from torch import nn

from model.configs import MODEL_NAMES, ModelConfigError, SiTConfig, model_config
from model.network import SiT, load_state_dict_checked, sincos_2d, timestep_frequencies
from sitctl.errors import CheckpointMismatchError
from tests.helpers import inputs, randomised, tiny_sit_config


@pytest.mark.parametrize(
    "name, input_size, channels",
    [("SiT-T/2", 8, 4), ("SiT-T/4", 16, 3), ("SiT-T/2", 12, 1), ("SiT-T/4", 32, 4)],
)
def test_output_has_input_shape(name, input_size, channels):
    config = model_config(name, input_size=input_size, in_channels=channels, num_classes=5)
    net = randomised(SiT(config))
    x, t, y = inputs(config)
    out = net(x, t, y)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_fresh_network_predicts_exactly_zero():
    config = tiny_sit_config()
    x, t, y = inputs(config)
    assert torch.equal(SiT(config)(x, t, y), torch.zeros_like(x))


def test_fresh_blocks_are_identity_maps():
    # adaLN-Zero: zero gates make each residual branch vanish at initialisation.
    net = SiT(tiny_sit_config())
    tokens, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    assert torch.equal(net.blocks[0](tokens, c), tokens)


def test_fresh_weights_follow_dits_initialisation():
    """The patch projection is xavier-uniform as a (D, C p p) linear map; label and time embeddings N(0, 0.02)."""
    torch.manual_seed(0)
    config = model_config("SiT-S/2", input_size=8, in_channels=4, num_classes=100)
    net = SiT(config)
    proj = net.x_embedder.proj.weight  # (384, 4, 2, 2)
    bound = math.sqrt(6 / (4 * 2 * 2 + 384))
    assert 0.99 * bound < proj.abs().max().item() <= bound
    for weight in (net.y_embedder.embedding_table.weight, net.t_embedder.mlp[0].weight, net.t_embedder.mlp[2].weight):
        assert abs(weight.std().item() - 0.02) < 0.001 and abs(weight.mean().item()) < 0.001


def test_sincos_1d_is_exact_in_float64():
    """omega_k = 10000^(-k / (dim / 2)) in float64: the table is exact to float64 rounding before its float32 cast."""
    from model.network import sincos_1d

    positions = torch.tensor([0.0, 3.0, 31.0])
    table = sincos_1d(8, positions)
    expected = [[math.sin(p * 10000 ** (-k / 4)) for k in range(4)] + [math.cos(p * 10000 ** (-k / 4)) for k in range(4)]
                for p in positions.tolist()]
    assert table.dtype == torch.float64
    torch.testing.assert_close(table, torch.tensor(expected, dtype=torch.float64), atol=1e-13, rtol=0)


def test_position_embedding_is_2d_sincos():
    dim, grid = 16, 3
    embed = sincos_2d(dim, grid)  # (9, 16): [columns: 4 sin, 4 cos | rows: 4 sin, 4 cos]
    for row in range(grid):
        for col in range(grid):
            token = embed[row * grid + col]
            for k in range(4):
                omega = 10000 ** (-k / 4)
                expected = [math.sin(col * omega), math.cos(col * omega), math.sin(row * omega), math.cos(row * omega)]
                got = [token[k], token[4 + k], token[8 + k], token[12 + k]]
                assert torch.allclose(torch.stack(got), torch.tensor(expected), atol=1e-6)


def test_timestep_features_take_t_directly():
    features = timestep_frequencies(torch.tensor([0.0, 0.5]), dim=8)  # frequencies 1, 0.1, 0.01, 0.001
    assert torch.equal(features[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert math.isclose(features[1, 4].item(), math.sin(0.5), rel_tol=1e-6)
    assert math.isclose(features[1, 1].item(), math.cos(0.05), rel_tol=1e-6)
    # max_period 10^4 exactly: at t = 1000 a frequency 1e-4 off moves sin(1000 f_1) = sin(100) by 0.01
    far = timestep_frequencies(torch.tensor([1000.0]), dim=8)
    assert math.isclose(far[0, 5].item(), math.sin(100.0), abs_tol=1e-4)


def test_time_and_label_reach_the_output():
    config = tiny_sit_config()
    net = randomised(SiT(config))
    x, t, y = inputs(config)
    out = net(x, t, y)
    assert not torch.allclose(out, net(x, 1 - t, y))
    assert not torch.allclose(out, net(x, t, torch.full_like(y, config.num_classes)))


def written_out_forward(net: SiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list]:
    """DiT's forward (Peebles & Xie 2023, Sec. 3.2) in plain tensor ops, reading only the parameters: patches as
    a linear map on unfolded p x p x C patches, 256 cosine-first time frequencies, adaLN-Zero blocks with the
    six modulation vectors in the published order, the modulated final layer, DiT's einsum unpatchify.
    Returns the output and the tokens after each block."""
    import torch.nn.functional as F

    cfg = net.config
    n, p, g, width, channels = x.shape[0], cfg.patch_size, cfg.grid_size, cfg.hidden_size, cfg.in_channels
    linear = lambda z, layer: z @ layer.weight.T + layer.bias  # noqa: E731
    norm = lambda z: F.layer_norm(z, (width,), eps=1e-6)  # noqa: E731
    patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(n, g * g, channels * p * p)
    proj = net.x_embedder.proj
    tokens = patches @ proj.weight.reshape(width, -1).T + proj.bias + sincos_2d(width, g)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128) / 128)
    features = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    mlp = net.t_embedder.mlp
    c = linear(F.silu(linear(features, mlp[0])), mlp[2]) + net.y_embedder.embedding_table.weight[y]
    after = []
    for block in net.blocks:
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(c), block.adaLN_modulation[1]).chunk(6, dim=1)
        h = norm(tokens) * (1 + scale1[:, None]) + shift1[:, None]
        tokens = tokens + gate1[:, None] * block.attn(h)
        h = norm(tokens) * (1 + scale2[:, None]) + shift2[:, None]
        hidden = F.gelu(linear(h, block.mlp.fc1), approximate="tanh")
        tokens = tokens + gate2[:, None] * linear(hidden, block.mlp.fc2)
        after.append(tokens)
    final = net.final_layer
    shift, scale = linear(F.silu(c), final.adaLN_modulation[1]).chunk(2, dim=1)
    out = linear(norm(tokens) * (1 + scale[:, None]) + shift[:, None], final.linear)  # (N, T, p*p*C)
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(n, g, g, p, p, channels))
    return out.reshape(n, channels, g * p, g * p), after


@pytest.mark.parametrize("patch", (2, 4))
def test_forward_is_dits_forward_written_out(patch):
    config = tiny_sit_config(patch_size=patch) if patch == 2 else model_config("SiT-T/4", input_size=8, in_channels=3, num_classes=10)
    net = randomised(SiT(config)).eval()
    x, t, y = inputs(config, n=3)
    expected, after = written_out_forward(net, x, t, y)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), expected, atol=2e-5, rtol=1e-4)
        for depth in (1, 2):
            output, hidden = net(x, t, y, hidden_depth=depth)
            torch.testing.assert_close(hidden, after[depth - 1], atol=1e-3, rtol=1e-3)  # tokens grow to ~100 here
            torch.testing.assert_close(output, expected, atol=2e-5, rtol=1e-4)
    norms = [module for module in net.modules() if isinstance(module, nn.LayerNorm)]
    assert len(norms) == 2 * config.depth + 1 and all(m.eps == 1e-6 and not m.elementwise_affine for m in norms)


def test_a_network_cast_to_bf16_runs_in_bf16():
    """Weights in bf16 (not autocast): the float32 time features and position embedding follow the weights."""
    config = tiny_sit_config()
    net = randomised(SiT(config)).to(torch.bfloat16)
    x, t, y = inputs(config)
    with torch.no_grad():
        out = net(x.bfloat16(), t.bfloat16(), y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_xl2_has_the_published_parameter_count():
    with torch.device("meta"):
        net = SiT(model_config("SiT-XL/2"))
    count = sum(parameter.numel() for parameter in net.parameters())
    # DiT-XL/2's 675M also counts the pos_embed parameter and the sigma half of the head.
    published_extras = net.pos_embed.numel() + (1152 + 1) * 2 * 2 * 4
    assert count + published_extras == 675_129_632


def published_layout(config: SiTConfig) -> SiT:
    """A network laid out as the published learn_sigma checkpoints: a 2C-channel final linear."""
    net = SiT(config)
    net.final_layer.linear = nn.Linear(config.hidden_size, config.patch_size**2 * 2 * config.in_channels)
    return randomised(net)


@pytest.mark.parametrize("name", ["SiT-T/2", "SiT-T/4"])
def test_published_state_dict_loads_and_keeps_the_mean_half(name):
    config = model_config(name, input_size=16, in_channels=4, num_classes=10)
    published = published_layout(config)
    state_dict = published.state_dict() | {"pos_embed": published.pos_embed.clone()}  # as the .pt files hold it
    assert state_dict["y_embedder.embedding_table.weight"].shape[0] == config.num_classes + 1
    net = SiT(config)
    load_state_dict_checked(net, state_dict, name)
    x, t, y = inputs(config, n=4)
    with torch.no_grad():
        expected = published(x, t, y)  # (N, 2C, H, W): epsilon/velocity half then sigma half
        assert expected.shape[1] == 2 * config.in_channels
        assert torch.allclose(net(x, t, y), expected[:, : config.in_channels], atol=1e-6)


def test_own_state_dict_round_trips_through_compile_and_ddp_prefixes():
    config = tiny_sit_config()
    source = randomised(SiT(config))
    prefixed = {"module._orig_mod." + key: value for key, value in source.state_dict().items()}
    net = SiT(config)
    load_state_dict_checked(net, prefixed, "SiT-T/2")
    x, t, y = inputs(config)
    assert torch.equal(net(x, t, y), source(x, t, y))


def test_a_sit_training_checkpoint_loads_its_ema_weights():
    """SiT's train.py saves {"model", "ema", "opt", "args"}; sampling uses the EMA, not the raw model."""
    config = tiny_sit_config()
    ema, raw = randomised(SiT(config), seed=1), randomised(SiT(config), seed=2)
    checkpoint = {"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}}, "args": None}
    net = SiT(config)
    load_state_dict_checked(net, checkpoint, "SiT-T/2")
    x, t, y = inputs(config)
    assert torch.equal(net(x, t, y), ema(x, t, y))


def test_wrong_shape_names_model_key_and_both_shapes():
    state_dict = SiT(tiny_sit_config(num_classes=7)).state_dict()
    with pytest.raises(CheckpointMismatchError) as error:
        load_state_dict_checked(SiT(tiny_sit_config()), state_dict, "SiT-T/2")
    message = str(error.value)
    assert "SiT-T/2" in message and "y_embedder.embedding_table.weight" in message
    assert "(8, 64)" in message and "(11, 64)" in message and "\n" not in message


def test_pos_embed_of_another_input_size_is_refused():
    state_dict = SiT(tiny_sit_config()).state_dict() | {"pos_embed": sincos_2d(64, 8)[None]}
    with pytest.raises(CheckpointMismatchError, match=r"pos_embed has shape \(1, 64, 64\).*\(1, 16, 64\)"):
        load_state_dict_checked(SiT(tiny_sit_config()), state_dict, "SiT-T/2")


def test_missing_and_unexpected_keys_are_named():
    state_dict = SiT(tiny_sit_config()).state_dict()
    del state_dict["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.1\.mlp\.fc2\.bias with shape \(64,\) is missing"):
        load_state_dict_checked(SiT(tiny_sit_config()), state_dict, "SiT-T/2")
    deeper = SiT(tiny_sit_config(depth=3)).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key blocks\.2\."):
        load_state_dict_checked(SiT(tiny_sit_config()), deeper, "SiT-T/2")


def test_qk_norm_adds_per_head_norm_weights():
    keys = SiT(tiny_sit_config(qk_norm=True)).state_dict().keys()
    assert "blocks.0.attn.q_norm.weight" in keys and "blocks.0.attn.k_norm.weight" in keys
    assert "blocks.0.attn.q_norm.weight" not in SiT(tiny_sit_config()).state_dict()


def test_compiled_network_matches_eager():
    # aot_eager traces the whole graph (fullgraph: no graph breaks) in seconds; inductor's C++
    # codegen takes ~40 s on a CPU and is exercised by `python -m sitctl.bench model --compile`.
    config = tiny_sit_config()
    net = randomised(SiT(config))
    x, t, y = inputs(config)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x, t, y), net(x, t, y), atol=1e-6)


def test_configs_cover_the_papers_sizes_and_reject_nonsense():
    """DiT/SiT Table 1: S 12/384/6, B 12/768/12, L 24/1024/16, XL 28/1152/16 (layers, hidden size, heads); each bad
    setting is one exact line."""
    assert {"SiT-S/2", "SiT-B/4", "SiT-L/8", "SiT-XL/2", "SiT-T/2"} <= set(MODEL_NAMES)
    published = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for size, shape in published.items():
        for patch in (2, 4, 8):
            config = model_config(f"SiT-{size}/{patch}")
            assert (config.depth, config.hidden_size, config.num_heads, config.patch_size) == (*shape, patch)
            assert SiTConfig(**asdict(config)) == config
    with pytest.raises(ModelConfigError) as error:
        model_config("SiT-XXL/2")
    assert str(error.value) == f"unknown model 'SiT-XXL/2'; choose one of {', '.join(MODEL_NAMES)}"
    assert MODEL_NAMES[:2] == ("SiT-T/2", "SiT-T/4") and MODEL_NAMES[-1] == "SiT-XL/8"
    with pytest.raises(ModelConfigError) as error:
        model_config("SiT-S/2", width=3, depth_size=2)
    assert str(error.value) == "unknown model setting(s) depth_size, width"
    for settings, message in (({"depth": 0}, "depth must be a positive integer, got 0"),
                              ({"input_size": 12, "patch_size": 8}, "input_size 12 is not divisible by patch_size 8"),
                              ({"hidden_size": 388}, "hidden_size 388 is not divisible by num_heads 6"),
                              ({"hidden_size": 6, "num_heads": 2}, "hidden_size 6 must be divisible by 4 (2-D sin-cos embedding)"),
                              ({"mlp_ratio": 0.0}, "mlp_ratio must be positive, got 0.0"),
                              ({"class_dropout_prob": 1.0}, "class_dropout_prob must be in [0, 1), got 1.0"),
                              ({"class_dropout_prob": 1.5}, "class_dropout_prob must be in [0, 1), got 1.5")):
        with pytest.raises(ModelConfigError) as error:
            model_config("SiT-S/2", **settings)
        assert str(error.value) == message
    assert model_config("SiT-S/2", mlp_ratio=0.5, class_dropout_prob=0.0).mlp_ratio == 0.5  # the bounds' other sides


def test_ddpm_schedule_of_dit_is_the_vp_interpolant_at_the_mapped_time():
    from model.interpolants import interpolant
    from model.network import ddpm_alphas_cumprod

    alphas_cumprod = ddpm_alphas_cumprod()  # (1000,)
    steps = torch.arange(1000, dtype=torch.float64)
    t = 1 - (steps + 1) / 1000  # the time DiscreteTimeInput maps back to step k
    vp = interpolant("vp")
    # Equal up to the discretisation: within 1e-3 absolute, and sigma^2 within 10% at every step.
    assert (vp.alpha(t) ** 2 - alphas_cumprod).abs().max() < 1e-3
    assert ((vp.sigma(t) ** 2 / (1 - alphas_cumprod)) - 1).abs().max() < 0.1


def test_ddpm_schedule_is_dits_linear_betas_in_float64():
    """alpha_bar_k = prod_{i <= k} (1 - beta_i), beta linear from 1e-4 to 0.02 over 1000 steps, in exact float64."""
    from model.network import ddpm_alphas_cumprod

    expected, product = [], 1.0
    for i in range(1000):
        product *= 1 - (1e-4 + i * (0.02 - 1e-4) / 999)
        expected.append(product)
    alphas_cumprod = ddpm_alphas_cumprod()
    assert alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(alphas_cumprod, torch.tensor(expected, dtype=torch.float64), atol=1e-14, rtol=0)


def test_qk_head_norm_is_rms_norm_with_eps_1e_6_and_keeps_bf16_fused():
    """x / sqrt(mean(x^2) + 1e-6) * gain: on a small constant input the eps term dominates (0.0995, not ~1); in
    bf16 the gain is cast so torch's fused kernel runs (a dtype mismatch falls back with a warning)."""
    import warnings

    from model.network import attention_layer

    norm = attention_layer(hidden_size=8, num_heads=2, qk_norm=True).q_norm
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    out = norm(torch.full((1, 4), 1e-4))
    expected = 1e-4 / math.sqrt(1e-8 + 1e-6) * torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        half = norm(torch.randn(3, 4).bfloat16())
    assert half.dtype == torch.bfloat16


def test_discrete_time_input_feeds_step_indices():
    from model.network import DiscreteTimeInput

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, y):
            seen.append((x, t, y))
            return x

    wrapped = DiscreteTimeInput(Recorder())
    x, y = torch.randn(3, 1), torch.tensor([4, 0, 7])
    out = wrapped(x, torch.tensor([1.0, 0.5, 0.001]), y)
    assert torch.allclose(seen[0][1], torch.tensor([0.0, 499.0, 998.0]))
    assert seen[0][0] is x and seen[0][2] is y and out is x  # the input and labels pass through untouched
