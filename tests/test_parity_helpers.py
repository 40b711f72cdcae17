"""The shared parity checks must pass for the oracle itself and catch a broken backend."""

import pytest
import torch

import parity
from gptfast.ops import torch_ops


@pytest.mark.parametrize("shape", parity.ATTENTION_SHAPES)
def test_attention_oracle_matches_itself_in_fp32(shape):
    parity.check_attention_parity("torch", shape, torch.float32)


@pytest.mark.parametrize("shape", parity.CROSS_ENTROPY_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_oracle_matches_itself(shape, reduction):
    parity.check_cross_entropy_parity("torch", shape, torch.float32, reduction=reduction)


def test_sampling_oracle_passes_support_distribution_and_seed_checks():
    parity.check_sampling_distribution("torch")
    logits = torch.randn(8, 1000)
    parity.check_sampling_greedy("torch", logits, top_k=5)
    parity.check_sampling_reproducible("torch", logits)


def test_distribution_check_catches_a_wrong_temperature(monkeypatch):
    real = torch_ops.sample_next_token

    def too_hot(logits, *, temperature, top_k, generator):
        return real(logits, temperature=temperature * 1.5, top_k=top_k, generator=generator)

    monkeypatch.setattr(torch_ops, "sample_next_token", too_hot)
    with pytest.raises(AssertionError, match="frequencies off"):
        parity.check_sampling_distribution("torch")


def test_attention_check_catches_a_missing_mask(monkeypatch):
    def unmasked(q, k, v, *, dropout_p, training, scale):
        w = torch.softmax(q @ k.transpose(2, 3) / q.shape[-1] ** 0.5, dim=-1)
        return w @ v

    monkeypatch.setattr(torch_ops, "causal_attention", unmasked)
    with pytest.raises(AssertionError):
        parity.check_attention_parity("torch", (1, 1, 9, 9, 16), torch.float32)
