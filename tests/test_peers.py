"""Peer tools on the same model: diffusers' own cache hooks, driven by our step context."""
import pytest
import torch

import cqpolicy
from cqpolicy.evaluation.cost import count_macs
from cqpolicy.models import load_model
from cqpolicy.sampling import SampleSettings, sample

SETTINGS = SampleSettings(steps=8, guidance_scale=2.0)


def run(model):
    return sample(model, [1, 2], [0, 1], SETTINGS, progress=False)


@pytest.mark.parametrize("spec", ["diffusers-fbc:threshold=10", "diffusers-taylorseer:interval=2,warmup=2"])
def test_diffusers_hooks_run_skip_work_and_detach(tiny_dit_dir, spec):
    model = load_model(str(tiny_dit_dir))
    plain_macs, _ = count_macs(lambda: run(model))
    plain = run(model)
    with cqpolicy.enable(model.transformer, spec) as handle:
        macs, _ = count_macs(lambda: run(model))
        first, second = run(model), run(model)  # state is reset per call: the same again
        assert handle.reuse_ratio is None and handle.cache_bytes is None
    assert macs < 0.9 * plain_macs
    assert torch.equal(first, second)
    assert not torch.allclose(first, plain)
    assert torch.equal(run(model), plain)  # hooks removed


def test_fbc_threshold_zero_never_skips(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    plain_macs, plain = count_macs(lambda: run(model))
    with cqpolicy.enable(model.transformer, "diffusers-fbc:threshold=0"):
        macs, out = count_macs(lambda: run(model))
    assert macs == plain_macs and torch.equal(out, plain)


def test_smoothcache_wheel_agrees_with_our_schedule_policy(tiny_dit_dir, tmp_path):
    """The wheel's DiffuserCacheHelper and our `schedule` run the same attn1 schedule: same images."""
    pytest.importorskip("SmoothCache")
    import json

    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"attn1": [1, 0, 1, 0, 0, 1, 0, 1]}))
    model = load_model(str(tiny_dit_dir))
    with cqpolicy.enable(model.transformer, f"schedule:path={path}", cache_format="fp32") as ours_handle:
        ours = run(model)
        assert ours_handle.reuse_ratio > 0
    with cqpolicy.enable(model.transformer, f"smoothcache-wheel:path={path}"):
        theirs = run(model)
        theirs_again = run(model)  # the wheel alone would run uncached here; our adapter re-enables it
    assert torch.equal(ours, theirs) and torch.equal(theirs, theirs_again)
    assert not torch.allclose(ours, run(model))
