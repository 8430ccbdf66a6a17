"""The trace recorder: invisible to the sampling run, and its local impact labels are real."""
import math

import numpy as np
import pytest
import torch

import cqpolicy
from cqpolicy.models import load_model
from cqpolicy.policies import Policy, make_policy
from cqpolicy.runtime import enable
from cqpolicy.sampling import SampleSettings, sample
from cqpolicy.tracing.recorder import TraceRecorder, records_to_columns

SETTINGS = SampleSettings(steps=5, guidance_scale=2.0)


def record(model, inner="none", labels=(1, 2), seeds=(0, 1), local=True, chain=1):
    recorder = TraceRecorder(make_policy(inner), model.adapter.default_units, local_probes=local, chain=chain)
    channels = model.latent_shape[0]
    with enable(model.transformer, recorder):
        images = sample(model, list(labels), list(seeds), SETTINGS, progress=False,
                        output_callback=lambda i, t, x, out: recorder.after_step(i, x, out, channels))
    return images, records_to_columns(recorder.take_records(), list(seeds), list(labels), cfg=True)


def test_recording_does_not_change_the_run(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    plain = sample(model, [1, 2], [0, 1], SETTINGS, progress=False)
    images, cols = record(model)
    assert torch.equal(images, plain)
    assert len(cols["seed"]) == 5 * 2 * 2 * 4  # steps x blocks x units x (2 samples x 2 CFG rows)
    step0 = cols["step"] == 0
    assert np.isnan(cols["impact_local"][step0]).all() and (cols["impact_local"][~step0] > 0).all()
    assert (cols["in_rel_l1_prev"][step0] == 0).all() and (cols["in_rel_l1_prev"][~step0] > 0).all()
    assert ((cols["entropy"] > 0) & (cols["entropy"] <= 1)).all()
    assert np.isfinite(cols["log_snr_x0"]).all() and (cols["computed"] == 1).all()
    with cqpolicy.enable(model.transformer, "fora:interval=2"):
        fora = sample(model, [1, 2], [0, 1], SETTINGS, progress=False)
    fora_images, fora_cols = record(model, "fora:interval=2")
    assert torch.equal(fora_images, fora)  # traced under a policy: the run that policy makes
    assert set(fora_cols["computed"][fora_cols["step"] == 1]) == {0.0}
    assert set(fora_cols["steps_since_compute"][fora_cols["step"] == 2]) == {1.0}


class ForceOnce(Policy):
    """Reuse exactly one unit at one step (everything else computes)."""

    def __init__(self, step, block, unit):
        self.target = (step, block, unit)

    def decide(self, query):
        return (query.step, query.block, query.unit) != self.target


@pytest.mark.parametrize("target", [(2, 0, "attn1"), (3, 1, "ff")])
def test_local_impact_equals_a_forced_reuse_run(tiny_dit_dir, target):
    model = load_model(str(tiny_dit_dir))
    _, cols = record(model)
    step, block, unit = target
    outputs = {}
    capture = lambda i, t, x, out: outputs.__setitem__(i, out.clone())  # noqa: E731
    sample(model, [1, 2], [0, 1], SETTINGS, progress=False, output_callback=capture)
    reference = outputs[step][:, :1]
    with enable(model.transformer, ForceOnce(step, block, unit), cache_format="fp32"):
        sample(model, [1, 2], [0, 1], SETTINGS, progress=False, output_callback=capture)
    forced = outputs[step][:, :1]
    expected = ((forced - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).numpy()
    rows = (cols["step"] == step) & (cols["block"] == block) & (cols["unit"] == unit)
    got = cols["impact_local"][rows]  # rows are ordered as the batch: cond rows then uncond rows
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)
    assert math.isfinite(got.sum()) and got.min() > 0


class ForceStale(Policy):
    """Everything computes, except one unit at one step, which returns its own output of ``stale`` steps earlier."""

    def __init__(self, step, block, unit, stale):
        self.target, self.source, self.saved = (step, block, unit), (step - stale, block, unit), None

    def decide(self, query):
        return (query.step, query.block, query.unit) != self.target

    def observe(self, query, output):
        if (query.step, query.block, query.unit) == self.source:
            self.saved = output.clone()

    def reuse(self, query, cached):
        return self.saved


@pytest.mark.parametrize("target", [(4, 0, "attn1", 3), (4, 1, "ff", 4), (3, 1, "attn1", 2)])
def test_chain_labels_equal_a_run_that_reuses_a_cache_s_steps_stale(tiny_dit_dir, target):
    model = load_model(str(tiny_dit_dir))
    images, cols = record(model, chain=8)
    assert torch.equal(images, sample(model, [1, 2], [0, 1], SETTINGS, progress=False))  # probes change nothing
    _, plain_cols = record(model)
    np.testing.assert_allclose(cols["impact_local"], plain_cols["impact_local"], rtol=1e-3)  # batch size only
    step, block, unit, stale = target
    outputs = {}
    capture = lambda i, t, x, out: outputs.__setitem__(i, out.clone())  # noqa: E731
    sample(model, [1, 2], [0, 1], SETTINGS, progress=False, output_callback=capture)
    reference = outputs[step][:, :1]
    with enable(model.transformer, ForceStale(step, block, unit, stale), cache_format="fp32"):
        sample(model, [1, 2], [0, 1], SETTINGS, progress=False, output_callback=capture)
    forced = outputs[step][:, :1]
    expected = ((forced - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).numpy()
    rows = (cols["step"] == step) & (cols["block"] == block) & (cols["unit"] == unit)
    np.testing.assert_allclose(cols[f"impact_stale_{stale}"][rows], expected, rtol=1e-3, atol=1e-6)
    for s in range(2, 9):  # a label wherever the run has step - s, NaN before
        have = cols["step"] >= s
        assert np.isfinite(cols[f"impact_stale_{s}"][have]).all() and np.isnan(cols[f"impact_stale_{s}"][~have]).all()
    assert np.isnan(plain_cols["impact_stale_2"]).all()  # chain probes off: no chain labels
    with pytest.raises(ValueError, match="chain must lie in 1..8"):
        TraceRecorder(make_policy("none"), model.adapter.default_units, chain=9)


def test_subsampled_entropy_on_a_long_sequence_is_close_to_exact():
    """DiT-XL/2 has 256 tokens: 64 evenly spaced query rows estimate the mean row entropy."""
    from diffusers.models.attention_processor import Attention

    from cqpolicy.policies.signals import self_attention_entropy

    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=4, dim_head=16)
    with torch.no_grad():
        attn.to_q.weight.mul_(4)  # sharper than random init, so entropies spread below the maximum
    x = torch.randn(3, 256, 64) + torch.linspace(-2, 2, 256)[None, :, None]
    exact = self_attention_entropy(attn, x)
    approx = self_attention_entropy(attn, x, max_queries=64)
    assert (exact < 0.99).all()
    assert (approx - exact).abs().max() < 0.01
