"""Runtime invariants: exactness, no leaks between calls, per-sample decisions, step bookkeeping."""
import pytest
import torch

import cqpolicy
from conftest import dit_pipeline_call
from cqpolicy.evaluation.cost import count_macs
from cqpolicy.models import load_model
from cqpolicy.policies import Policy, make_policy
from cqpolicy.runtime import StepMismatchError, enable
from cqpolicy.sampling import SampleSettings, initial_noise, sample

SETTINGS = SampleSettings(steps=6, guidance_scale=2.0)


def run(model, labels=(1, 2, 3), seeds=(0, 1, 2), settings=SETTINGS):
    return sample(model, list(labels), list(seeds), settings, progress=False)


def test_none_is_bit_identical_to_the_plain_model(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    plain = run(model)
    with cqpolicy.enable(model.transformer, "none") as handle:
        hooked = run(model)
        assert handle.reuse_ratio == 0.0 and handle.counts["attn1", "computed"] > 0  # the hooks did run
    assert torch.equal(plain, hooked)
    assert torch.equal(plain, run(model))  # disable() restored the plain forward


def test_inside_an_unmodified_dit_pipeline(tiny_xl_pipeline_dir):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(tiny_xl_pipeline_dir)
    noise = initial_noise([3, 4], (4, 8, 8))
    plain = dit_pipeline_call(pipe, noise)
    with cqpolicy.enable(pipe.transformer, "none"):
        assert torch.equal(plain, dit_pipeline_call(pipe, noise))
    # fora with the step inferred from the timestep equals fora driven by our sampler, twice in a row
    model = load_model(str(tiny_xl_pipeline_dir))
    with cqpolicy.enable(model.transformer, "fora:interval=2"):
        ours = sample(model, [1, 2], [3, 4], SampleSettings(steps=5, guidance_scale=4.0), progress=False)
    with cqpolicy.enable(pipe.transformer, "fora:interval=2") as handle:
        first = dit_pipeline_call(pipe, noise)
        second = dit_pipeline_call(pipe, noise)
        assert handle.calls == 2 and handle.reuse_ratio == pytest.approx(2 / 5)
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), first, atol=1e-5, rtol=1e-4)
    assert torch.equal(first, second)
    assert not torch.allclose(first, plain, atol=1e-4)


def test_nothing_leaks_between_calls(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    fresh = []
    for labels, seeds in (((1, 2, 3), (0, 1, 2)), ((7, 8), (10, 11))):
        with cqpolicy.enable(model.transformer, "fora:interval=3"):
            fresh.append(run(model, labels, seeds))
    with cqpolicy.enable(model.transformer, "fora:interval=3"):
        a = run(model, (1, 2, 3), (0, 1, 2))
        b = run(model, (7, 8), (10, 11))
    assert torch.equal(a, fresh[0]) and torch.equal(b, fresh[1])


def test_fora_interval_changes_what_runs(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    results, macs = {}, {}
    for interval in (1, 2, 3):
        with cqpolicy.enable(model.transformer, f"fora:interval={interval}") as handle:
            macs[interval], results[interval] = count_macs(lambda: run(model))
            results[interval] = (results[interval], handle.reuse_ratio)
    assert results[1][1] == 0.0 and results[2][1] == pytest.approx(0.5) and results[3][1] == pytest.approx(4 / 6)
    assert macs[1] > macs[2] > macs[3]
    assert not torch.equal(results[1][0], results[2][0]) and not torch.equal(results[2][0], results[3][0])
    with cqpolicy.enable(model.transformer, "fora:interval=2,warmup=2") as handle:
        run(model)
        assert handle.reuse_ratio == pytest.approx(2 / 6)  # steps 0,1,2,4 compute
    with cqpolicy.enable(model.transformer, "fora:interval=2,unit=block") as handle:
        block_out = run(model)
        assert handle.counts["block", "reused"] > 0 and handle.counts["attn1", "reused"] == 0
    assert not torch.equal(block_out, results[2][0])


class RowPolicy(Policy):
    """Compute row 1 always, row 0 only at step 0 (a per-sample decision)."""

    name = "rows"

    def decide(self, query):
        return torch.tensor([query.step == 0, True] * (query.inputs.shape[0] // 2))


def test_per_sample_decisions_compute_only_marked_rows(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    settings = SampleSettings(steps=5, guidance_scale=1.0)  # no CFG: rows = samples
    with enable(model.transformer, RowPolicy()) as handle:
        both = sample(model, [1, 2], [0, 1], settings, progress=False)
        # 2 blocks: step 0 computes both rows, steps 1-4 only row 1
        assert handle.counts["ff", "computed"] == 2 * 2 + 4 * 2 * 1 and handle.counts["ff", "reused"] == 4 * 2
    alone_computed = sample(model, [2], [1], settings, progress=False)
    with cqpolicy.enable(model.transformer, "fora:interval=100"):
        alone_reused = sample(model, [1], [0], settings, progress=False)
    torch.testing.assert_close(both[1:], alone_computed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:1], alone_reused, atol=1e-5, rtol=1e-5)


def test_int8_and_int4_caches_change_the_reused_tensor(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    outs, sizes = {}, {}
    for fmt in ("fp32", "fp16", "int8", "int4"):
        with cqpolicy.enable(model.transformer, "fora:interval=2", cache_format=fmt) as handle:
            outs[fmt] = run(model)
            sizes[fmt] = handle.cache_bytes
    # per-tensor scales here: the tiny model is 16 wide, so per-token scales would weigh 1/8 (see test_cache_store)
    assert sizes["int8"] / sizes["fp16"] == pytest.approx(0.5, abs=0.02)
    assert sizes["int4"] / sizes["fp16"] == pytest.approx(0.25, abs=0.02)
    assert sizes["fp32"] == 2 * sizes["fp16"]
    errors = {f: (outs[f] - outs["fp32"]).abs().max().item() for f in ("fp16", "int8", "int4")}
    assert 0 < errors["fp16"] < errors["int8"] < errors["int4"]


def test_enable_twice_and_bad_specs_are_errors(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    with cqpolicy.enable(model.transformer, "none"):
        with pytest.raises(RuntimeError, match="already enabled"):
            cqpolicy.enable(model.transformer, "none")
    for spec, message in (("magic", "unknown policy"), ("fora:speed=2", "has no option 'speed'"),
                          ("fora:interval=x", "not a valid int"), ("fora:interval=0", "at least 1"),
                          ("fora:interval", "expected key=value")):
        with pytest.raises(ValueError, match=message):
            make_policy(spec)
    with pytest.raises(ValueError, match="no cqpolicy adapter for Linear"):
        cqpolicy.enable(torch.nn.Linear(2, 2), "none")


def test_a_call_that_stops_early_is_a_step_mismatch(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    with cqpolicy.enable(model.transformer, "fora:interval=2") as handle:
        handle.begin_call(10)
        for i in range(3):
            handle.set_step(i, 999 - i)
        with pytest.raises(StepMismatchError, match="after 3 of its 10 steps"):
            handle.end_call()
