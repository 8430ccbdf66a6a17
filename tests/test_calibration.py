import torch

from cqpolicy.models import load_model
from cqpolicy.policies.calibration import record_unit_outputs
from cqpolicy.sampling import SampleSettings


def test_recorder_keeps_every_step_of_every_unit(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    outputs = record_unit_outputs(model, SampleSettings(steps=4, guidance_scale=2.0), num_samples=3)
    assert set(outputs) == {(b, u) for b in range(2) for u in ("attn1", "ff")}
    assert outputs[0, "ff"].shape == (4, 6, 49, 16)  # steps, 2 x 3 CFG rows, tokens, width
    assert not torch.equal(outputs[0, "ff"][0], outputs[0, "ff"][1])  # features change across steps


def test_recorder_subsamples_long_token_sequences(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    full = record_unit_outputs(model, SampleSettings(steps=2, guidance_scale=1.0), units=("ff",), num_samples=1)
    short = record_unit_outputs(model, SampleSettings(steps=2, guidance_scale=1.0), units=("ff",), num_samples=1,
                                max_tokens=5)
    assert short[0, "ff"].shape == (2, 1, 5, 16)
    assert torch.equal(short[0, "ff"][:, :, 0], full[0, "ff"][:, :, 0])  # first and last tokens kept
    assert torch.equal(short[0, "ff"][:, :, -1], full[0, "ff"][:, :, -1])


def test_calibration_run_is_reused_across_policy_objects(tiny_dit_dir, monkeypatch):
    """SmoothCache, DPS and ReCaT calibrate on the same uncached run: a bench replicate samples it once."""
    import cqpolicy.sampling as sampling

    model = load_model(str(tiny_dit_dir))
    calls, real = [], sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = SampleSettings(steps=4, guidance_scale=2.0)
    first = record_unit_outputs(model, s, num_samples=2)
    again = record_unit_outputs(model, s, num_samples=2)
    assert len(calls) == 1 and all(torch.equal(first[k], again[k]) for k in first)
    record_unit_outputs(model, s, num_samples=3)  # another setting: a new run
    record_unit_outputs(load_model(str(tiny_dit_dir)), s, num_samples=3)  # another model object: a new run
    assert len(calls) == 3
