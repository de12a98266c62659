"""Flow-matching math (fluxtune.training.flow) checked against hand-computed numbers."""

import math

import pytest
import torch

from fluxtune.training.flow import (
    add_noise,
    flow_loss,
    resolution_mu,
    sample_sigmas,
    shift_sigmas,
    velocity_target,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ noising, target, loss


def test_add_noise_single_sample():
    x0 = torch.tensor([[1.0, 2.0]])
    noise = torch.tensor([[3.0, -1.0]])
    # sigma 0.25: (0.75*1 + 0.25*3, 0.75*2 + 0.25*-1) = (1.5, 1.25)
    out = add_noise(x0, noise, torch.tensor([0.25]))
    torch.testing.assert_close(out, torch.tensor([[1.5, 1.25]]))


def test_add_noise_endpoints():
    x0 = torch.tensor([[1.0, 2.0]])
    noise = torch.tensor([[3.0, -1.0]])
    torch.testing.assert_close(add_noise(x0, noise, torch.tensor([0.0])), x0)  # sigma 0: clean
    torch.testing.assert_close(add_noise(x0, noise, torch.tensor([1.0])), noise)  # sigma 1: pure noise


def test_add_noise_per_sample_sigma_broadcasts_over_tokens_and_channels():
    # (B, L, C) = (2, 2, 2); both samples hold the same x0, noise is 10 everywhere.
    x0 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]] * 2)
    noise = torch.full((2, 2, 2), 10.0)
    out = add_noise(x0, noise, torch.tensor([0.5, 0.1]))
    expected = torch.tensor(
        [
            # sample 0, sigma 0.5: 0.5*x + 0.5*10 = 0.5*x + 5
            [[5.5, 6.0], [6.5, 7.0]],
            # sample 1, sigma 0.1: 0.9*x + 0.1*10 = 0.9*x + 1
            [[1.9, 2.8], [3.7, 4.6]],
        ]
    )
    torch.testing.assert_close(out, expected)


def test_add_noise_keeps_bf16_dtype():
    x0 = torch.ones(2, 3, 4, dtype=torch.bfloat16)
    noise = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    out = add_noise(x0, noise, torch.tensor([0.5, 0.25]))  # fp32 sigmas
    assert out.dtype == torch.bfloat16
    # 1 - sigma: 0.5 and 0.75, both exact in bf16
    assert out[0].unique().tolist() == [0.5]
    assert out[1].unique().tolist() == [0.75]


def test_velocity_target_is_noise_minus_x0():
    x0 = torch.tensor([1.0, 2.0])
    noise = torch.tensor([3.0, -1.0])
    # (3 - 1, -1 - 2) = (2, -3)
    torch.testing.assert_close(velocity_target(x0, noise), torch.tensor([2.0, -3.0]))


def test_flow_loss_is_mean_squared_error():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = torch.tensor([1.0, 0.0, 3.0, 0.0])
    # errors 0, 2, 0, 4 -> squares 0, 4, 0, 16 -> mean 20 / 4 = 5
    assert flow_loss(pred, target).item() == 5.0


def test_flow_loss_is_fp32_for_bf16_inputs():
    pred = torch.tensor([17.0], dtype=torch.bfloat16)
    target = torch.tensor([0.0], dtype=torch.bfloat16)
    # 17^2 = 289 = 0b100100001 needs 9 significant bits; bf16 has 8 and would round it to 288.
    loss = flow_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == 289.0


# ------------------------------------------------------------------ shift and resolution mu


def test_shift_sigmas_hand_values():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    # 3s / (1 + 2s): 0 -> 0;  0.25 -> 0.75 / 1.5 = 0.5;  0.5 -> 1.5 / 2 = 0.75;  1 -> 3 / 3 = 1
    torch.testing.assert_close(shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))


def test_shift_one_is_identity():
    s = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)


@pytest.mark.parametrize(
    "tokens, mu",
    [
        (256, 0.5),  # base
        (4096, 1.15),  # max
        (2176, 0.825),  # halfway: 256 + 3840/2 -> 0.5 + 0.65/2
        (1024, 0.63),  # 512px FLUX.1 image: 0.5 + 0.65 * 768/3840 = 0.5 + 0.13
    ],
)
def test_resolution_mu(tokens, mu):
    assert resolution_mu(tokens) == pytest.approx(mu)


def test_auto_shift_matches_flux_time_shift():
    g = gen(123)
    g_copy = torch.Generator()
    g_copy.set_state(g.get_state())
    u = torch.rand(64, generator=g_copy)  # the same uniform draw sample_sigmas will make
    mu = 1.15  # 4096 tokens
    expected = math.exp(mu) / (math.exp(mu) + 1 / u - 1)  # FLUX's time_shift(mu, 1, u)
    got = sample_sigmas(64, mode="shift", shift="auto", num_tokens=4096, generator=g)
    torch.testing.assert_close(got, expected)
    assert (got > u).all()  # shifting towards more noise


def test_fixed_shift_matches_shift_sigmas_on_the_same_draw():
    g = gen(5)
    g_copy = torch.Generator()
    g_copy.set_state(g.get_state())
    u = torch.rand(16, generator=g_copy)
    got = sample_sigmas(16, mode="shift", shift=3.0, generator=g)
    torch.testing.assert_close(got, 3 * u / (1 + 2 * u))


# ------------------------------------------------------------------ sample_sigmas


@pytest.mark.parametrize("mode", ["uniform", "logit_normal"])
def test_sigmas_in_open_unit_interval(mode):
    s = sample_sigmas(10_000, mode=mode, generator=gen(0))
    assert s.shape == (10_000,)
    assert s.dtype == torch.float32
    assert (s > 0).all() and (s < 1).all()


@pytest.mark.parametrize("mode, extra", [("uniform", {}), ("logit_normal", {}), ("shift", {"shift": 3.0})])
def test_sigmas_reproducible_with_seeded_generator(mode, extra):
    a = sample_sigmas(32, mode=mode, generator=gen(7), **extra)
    b = sample_sigmas(32, mode=mode, generator=gen(7), **extra)
    c = sample_sigmas(32, mode=mode, generator=gen(8), **extra)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_logit_normal_mean_zero_is_centred():
    s = sample_sigmas(20_000, mode="logit_normal", logit_mean=0.0, generator=gen(0))
    # sigmoid(N(0, 1)) is symmetric around 0.5
    assert s.median().item() == pytest.approx(0.5, abs=0.01)


def test_logit_normal_mean_one_leans_noisy():
    s = sample_sigmas(20_000, mode="logit_normal", logit_mean=1.0, generator=gen(0))
    # P(sigma > 0.5) = P(N(1, 1) > 0) = Phi(1) ~ 0.84
    assert (s > 0.5).float().mean().item() == pytest.approx(0.841, abs=0.02)


def test_logit_std_widens_the_spread():
    narrow = sample_sigmas(5_000, mode="logit_normal", logit_std=0.5, generator=gen(0))
    wide = sample_sigmas(5_000, mode="logit_normal", logit_std=2.0, generator=gen(0))
    assert wide.std() > narrow.std()


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown sigma sampling mode"):
        sample_sigmas(4, mode="cosine")


def test_auto_shift_needs_num_tokens():
    with pytest.raises(ValueError, match="num_tokens"):
        sample_sigmas(4, mode="shift", shift="auto")
