"""Static schedules (``schedule``, SmoothCache's published JSON) and step x block x unit tables (``table``)."""
import json
from pathlib import Path

import pytest
import torch

import cqpolicy
import cqpolicy.policies.families.schedule  # noqa: F401  (registers the family)
import cqpolicy.policies.families.table  # noqa: F401
from cqpolicy.models import load_model
from cqpolicy.policies import Policy, UnitQuery, make_policy
from cqpolicy.policies.families.schedule import export_dict, load_schedule, resolve, save_schedule
from cqpolicy.policies.families.table import load_table, save_table
from cqpolicy.runtime import StepMismatchError
from cqpolicy.sampling import SampleSettings, sample

PEER = Path("/work/shared/peer-data/smoothcache-schedules")
SETTINGS = SampleSettings(steps=6, guidance_scale=2.0)


def run(model, settings=SETTINGS, labels=(1, 2), seeds=(0, 1)):
    return sample(model, list(labels), list(seeds), settings, progress=False)


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


class Explicit(Policy):
    """Reference: decisions from a plain function of (step, block, unit)."""

    name = "explicit"

    def __init__(self, fn, units=("attn1", "ff")):
        self.fn, self.units = fn, units

    def decide(self, query):
        return self.fn(query.step, query.block, query.unit)


def query(step, block, unit, num_steps=6, num_blocks=2):
    return UnitQuery(step=step, num_steps=num_steps, timestep=0.0, block=block, unit=unit, num_blocks=num_blocks,
                     inputs=torch.zeros(1), has_cache=True)


# -- schedule: the published files ----------------------------------------------------------------------
@pytest.mark.parametrize("name, steps, units, keys", [
    ("30-N-2-fora.json", 30, ("attn1", "ff"), {("attn1", None), ("ff", None)}),
    ("50-N-3-threshold-0.18.json", 50, ("attn1", "ff"), {("attn1", None), ("ff", None)}),
    ("diffuser_schedule.json", 50, ("attn1",), {("attn1", None)}),
    ("50-N-2-l2c.json", 50, ("attn1", "ff"), {(u, b) for u in ("attn1", "ff") for b in range(28)}),
])
def test_published_schedules_load(name, steps, units, keys):
    schedule = load_schedule(PEER / name)
    assert set(schedule) == keys and {len(v) for v in schedule.values()} == {steps}
    policy = make_policy(f"schedule:path={PEER / name}")
    assert policy.units == units and policy.static.length == steps
    if name == "30-N-2-fora.json":
        assert schedule["attn1", None] == tuple([1, 0] * 14 + [1, 1])  # 'attn' read as attn1


def test_published_per_block_schedule_needs_its_28_blocks(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    policy = make_policy(f"schedule:path={PEER / '50-N-2-l2c.json'}")
    with pytest.raises(ValueError, match="names block 27 but the model has 2 blocks"):
        policy.prepare(model, SampleSettings(steps=50))
    with pytest.raises(ValueError, match="names block 27"):
        policy.reset(50, 2)
    policy.reset(50, 28)  # the model it was made for
    l2c = json.loads((PEER / "50-N-2-l2c.json").read_text())
    assert policy.decide(query(1, 3, "ff", 50, 28)) == bool(l2c["mlp-3"][1])
    assert policy.decide(query(1, 27, "attn1", 50, 28)) == bool(l2c["attn-27"][1])


def test_per_block_keys_override_type_wide_keys(tmp_path, tiny_dit_dir):
    path = write(tmp_path / "s.json", {"attn1": [1, 0, 1, 0, 0, 1], "attn-1": [1, 1, 0, 1, 0, 1],
                                       "mlp-0": [1, 0, 0, 1, 0, 1]})
    policy = make_policy(f"schedule:path={path}")
    policy.reset(6, 2)
    expected = {(0, "attn1"): [1, 0, 1, 0, 0, 1], (1, "attn1"): [1, 1, 0, 1, 0, 1],
                (0, "ff"): [1, 0, 0, 1, 0, 1], (1, "ff"): [1] * 6}  # no key for block 1's ff: always compute
    for (block, unit), entries in expected.items():
        assert [policy.decide(query(s, block, unit)) for s in range(6)] == [bool(e) for e in entries]

    model = load_model(str(tiny_dit_dir))
    with cqpolicy.enable(model.transformer, policy) as handle:
        images = run(model)
        counts = dict(handle.counts)
    reference = Explicit(lambda s, b, u: bool(expected[b, u][s]))
    with cqpolicy.enable(model.transformer, reference) as handle:
        assert torch.equal(images, run(model)) and dict(handle.counts) == counts
    assert counts["ff", "reused"] == 3 * 4  # 3 reused steps x 4 rows (2 samples x CFG), block 0 only


def test_fora_file_at_30_steps_matches_an_explicit_schedule(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    settings = SampleSettings(steps=30, guidance_scale=2.0)
    with cqpolicy.enable(model.transformer, f"schedule:path={PEER / '30-N-2-fora.json'}") as handle:
        images, counts = run(model, settings, (3,), (5,)), dict(handle.counts)
    # the file is FORA every second step except that the last step (29) computes
    with cqpolicy.enable(model.transformer, Explicit(lambda s, b, u: s % 2 == 0 or s == 29)) as handle:
        assert torch.equal(images, run(model, settings, (3,), (5,))) and dict(handle.counts) == counts
    with cqpolicy.enable(model.transformer, "fora:interval=2") as handle:
        run(model, settings, (3,), (5,))
        fora = dict(handle.counts)
    rows_blocks = 2 * 2  # one sample with CFG, 2 blocks
    assert counts["attn1", "computed"] == 16 * rows_blocks and fora["attn1", "computed"] == 15 * rows_blocks


def test_step_count_mismatch_is_an_error(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    policy = make_policy(f"schedule:path={PEER / '50-N-3-threshold-0.18.json'}")
    with pytest.raises(StepMismatchError, match="has 50 steps but sampling uses 30"):
        policy.prepare(model, SampleSettings(steps=30))
    with cqpolicy.enable(model.transformer, policy):
        with pytest.raises(StepMismatchError, match="50 steps"):
            run(model, SampleSettings(steps=30, guidance_scale=2.0))
    policy.prepare(model, SampleSettings(steps=50))  # the count it was made for


def _pipe_call(pipe, steps):
    return pipe(class_labels=[1], guidance_scale=4.0, num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_inferred_steps_in_an_unmodified_pipeline(tmp_path, tiny_xl_pipeline_dir):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(tiny_xl_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    path = write(tmp_path / "s.json", {"attn1": [1, 0, 1, 0], "ff": [1, 0, 0, 1]})
    with cqpolicy.enable(pipe.transformer, f"schedule:path={path}") as handle:
        _pipe_call(pipe, 4)
        assert handle.counts["ff", "reused"] == 2 * 2 * 2 and handle.counts["attn1", "reused"] == 2 * 2 * 2
        with pytest.raises(StepMismatchError, match="has 4 steps but sampling reached step 5"):
            _pipe_call(pipe, 6)


def test_export_import_round_trip(tmp_path):
    for name in ("30-N-2-fora.json", "50-N-3-threshold-0.18.json", "diffuser_schedule.json", "50-N-2-l2c.json"):
        schedule = load_schedule(PEER / name)
        out = save_schedule(schedule, tmp_path / name)
        assert load_schedule(out) == schedule
        assert not list(tmp_path.glob(".*.tmp"))  # written via a temporary file, renamed into place
    text = (tmp_path / "30-N-2-fora.json").read_text()
    assert set(json.loads(text)) == {"attn1", "ff"}  # diffusers keys, not attn/mlp
    # with the block count: one shared list plus per-block keys only where blocks differ, same decisions
    l2c = load_schedule(PEER / "50-N-2-l2c.json")
    compact = load_schedule(save_schedule(l2c, tmp_path / "compact.json", num_blocks=28))
    assert resolve(compact, 28) == resolve(l2c, 28) and len(compact) < len(l2c)
    assert ("attn1", None) in compact
    # per-block keys equal to the shared one are dropped; blocks without entries export as all-ones
    mixed = {("ff", None): (1, 0, 1), ("ff", 1): (1, 0, 1), ("attn1", 0): (1, 0, 0)}
    assert export_dict(mixed) == {"attn1-0": [1, 0, 0], "ff": [1, 0, 1]}
    assert export_dict(mixed, num_blocks=3) == {"attn1": [1, 1, 1], "attn1-0": [1, 0, 0], "ff": [1, 0, 1]}


def test_block_unit_schedules(tmp_path, tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    path = write(tmp_path / "s.json", {"block": [1, 0, 1, 0, 1, 1], "block-1": [1] * 6})
    policy = make_policy(f"schedule:path={path}")
    assert policy.units == ("block",)
    with cqpolicy.enable(model.transformer, policy) as handle:
        run(model)
        assert handle.counts["block", "reused"] == 2 * 4 and ("attn1", "reused") not in handle.counts


def test_path_changes_what_runs_and_calls_do_not_leak(tmp_path, tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    a = write(tmp_path / "a.json", {"attn1": [1, 0, 1, 0, 1, 0], "ff": [1, 0, 0, 1, 0, 1]})
    b = write(tmp_path / "b.json", {"attn1": [1, 1, 1, 0, 0, 1], "ff": [1, 1, 1, 1, 1, 0]})
    ratios, fresh = {}, []
    for path in (a, b):
        with cqpolicy.enable(model.transformer, f"schedule:path={path}") as handle:
            fresh.append(run(model))
            ratios[path] = handle.reuse_ratio
    assert ratios[a] == pytest.approx(6 / 12) and ratios[b] == pytest.approx(3 / 12)
    assert not torch.equal(fresh[0], fresh[1])
    second = run(model, labels=(7,), seeds=(9,))
    with cqpolicy.enable(model.transformer, f"schedule:path={a}"):
        fresh_second = run(model, labels=(7,), seeds=(9,))
    with cqpolicy.enable(model.transformer, f"schedule:path={a}"):
        first, again = run(model), run(model, labels=(7,), seeds=(9,))
    assert torch.equal(first, fresh[0]) and torch.equal(again, fresh_second)
    assert not torch.equal(again, second)  # the schedule did act on the second call


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 0]", "non-empty JSON object"),
    ("{}", "non-empty JSON object"),
    ('{"attn3": [1, 0]}', "unknown schedule key 'attn3'"),
    ('{"attn1-x": [1, 0]}', "unknown schedule key"),
    ('{"attn1": [1, 2]}', "holds 2; entries must be 0"),
    ('{"attn1": [1, true]}', "holds True"),
    ('{"attn1": []}', "non-empty list"),
    ('{"attn1": [1, 0], "ff": [1, 0, 1]}', "different lengths"),
    ('{"attn": [1, 0], "attn1": [1, 1]}', "both set attn1"),
    ('{"ff": [1, 0], "ff": [1, 1]}', "appears twice"),
])
def test_malformed_schedules_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        make_policy(f"schedule:path={path}")
    assert str(info.value).startswith("policy 'schedule': ") and "\n" not in str(info.value)


def test_missing_path_or_file(tmp_path):
    with pytest.raises(ValueError, match="path is required"):
        make_policy("schedule")
    with pytest.raises(ValueError, match="cannot read schedule"):
        make_policy(f"schedule:path={tmp_path / 'missing.json'}")


def test_a_zero_at_step_zero_still_computes(tmp_path, tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    path = write(tmp_path / "s.json", {"attn1": [0, 0, 1, 0, 1, 1]})
    with cqpolicy.enable(model.transformer, f"schedule:path={path}") as handle:
        run(model)
        assert handle.counts["attn1", "computed"] == 4 * 4 * 2 and handle.counts["attn1", "reused"] == 2 * 4 * 2


# -- table ----------------------------------------------------------------------------------------------
def _table():
    table = torch.ones(6, 2, 2, dtype=torch.uint8)
    table[1, 0, 0] = table[3, 0, 0] = table[2, 1, 0] = 0  # attn1
    table[1, :, 1] = table[4, 1, 1] = 0  # ff
    return table


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_table_matches_the_equivalent_schedule(tmp_path, tiny_dit_dir, suffix):
    model = load_model(str(tiny_dit_dir))
    table = _table()
    path = save_table(table.bool(), ["attn1", "ff"], tmp_path / f"t{suffix}")
    loaded, units = load_table(path)
    assert torch.equal(loaded, table) and units == ("attn1", "ff") and loaded.dtype == torch.uint8
    schedule = {(u, b): tuple(table[:, b, k].tolist()) for k, u in enumerate(units) for b in range(2)}
    spath = save_schedule(schedule, tmp_path / "s.json", num_blocks=2)
    with cqpolicy.enable(model.transformer, f"schedule:path={spath}") as handle:
        expected, counts = run(model), dict(handle.counts)
    with cqpolicy.enable(model.transformer, f"table:path={path}") as handle:
        assert torch.equal(run(model), expected) and dict(handle.counts) == counts
    assert counts["attn1", "reused"] == 3 * 4 and counts["ff", "reused"] == 3 * 4


def test_table_units_column_order_and_aliases(tmp_path):
    table = _table()
    path = save_table(table.flip(2), ["mlp", "attn"], tmp_path / "t.safetensors")  # ff first, original names
    policy = make_policy(f"table:path={path}")
    assert policy.units == ("attn1", "ff")
    policy.reset(6, 2)
    assert policy.decide(query(1, 0, "attn1")) is False and policy.decide(query(2, 0, "attn1")) is True
    assert policy.decide(query(4, 1, "ff")) is False and policy.decide(query(4, 0, "ff")) is True


def test_table_path_changes_what_runs_and_calls_do_not_leak(tmp_path, tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    a = save_table(_table(), ["attn1", "ff"], tmp_path / "a.safetensors")
    b = save_table(torch.ones(6, 2, 1, dtype=torch.uint8), ["block"], tmp_path / "b.json")
    with cqpolicy.enable(model.transformer, f"table:path={a}") as handle:
        first, second = run(model), run(model, labels=(7,), seeds=(9,))
        assert handle.reuse_ratio > 0
    fresh = []
    for labels, seeds in (((1, 2), (0, 1)), ((7,), (9,))):
        with cqpolicy.enable(model.transformer, f"table:path={a}"):
            fresh.append(run(model, labels=labels, seeds=seeds))
    assert torch.equal(first, fresh[0]) and torch.equal(second, fresh[1])
    with cqpolicy.enable(model.transformer, f"table:path={b}") as handle:
        assert torch.equal(run(model), run(model))
        assert handle.reuse_ratio == 0.0 and ("block", "computed") in handle.counts
    assert not torch.equal(first, run(model))


def test_table_step_and_block_checks(tmp_path, tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    path = save_table(_table(), ["attn1", "ff"], tmp_path / "t.safetensors")
    policy = make_policy(f"table:path={path}")
    with pytest.raises(StepMismatchError, match="has 6 steps but sampling uses 4"):
        policy.prepare(model, SampleSettings(steps=4))
    with pytest.raises(StepMismatchError):
        policy.reset(4, 2)
    with pytest.raises(ValueError, match="has 2 blocks but the model has 3"):
        policy.reset(6, 3)
    with cqpolicy.enable(model.transformer, policy), pytest.raises(StepMismatchError):
        run(model, SampleSettings(steps=4, guidance_scale=2.0))
    other = save_table(torch.ones(6, 3, 2, dtype=torch.uint8), ["attn1", "ff"], tmp_path / "t3.json")
    with pytest.raises(ValueError, match="has 3 blocks but the model has 2"):
        make_policy(f"table:path={other}").prepare(model, SETTINGS)
    policy.prepare(model, SETTINGS)
    policy.decide(query(5, 1, "ff"))
    with pytest.raises(StepMismatchError, match="reached step 7"):  # inferred steps: past the table's end
        policy.decide(query(6, 1, "ff", num_steps=None))


def _safetensors(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: write(p / "t.json", {"units": ["attn1"], "table": [[[1], [2]]]}), "must be 0"),
    (lambda p: write(p / "t.json", {"units": ["attn1"], "table": [[[1], [0, 1]]]}), "rectangular"),
    (lambda p: write(p / "t.json", {"table": [[[1]]]}), "expected a JSON object"),
    (lambda p: write(p / "t.json", {"units": ["attn3"], "table": [[[1]]]}), "unknown unit 'attn3'"),
    (lambda p: write(p / "t.json", {"units": ["attn1-3"], "table": [[[1]]]}), "unknown unit"),
    (lambda p: write(p / "t.json", {"units": ["ff", "mlp"], "table": [[[1, 1]]]}), "names a unit twice"),
    (lambda p: write(p / "t.json", {"units": ["ff"], "table": [[1]]}), "shape \\[steps, blocks, units\\]"),
    (lambda p: write(p / "t.json", {"units": ["ff", "attn1"], "table": [[[1]]]}), "1 unit columns"),
    (lambda p: (p / "t.json").write_text("{oops") and p / "t.json", "not valid JSON"),
    (lambda p: _safetensors(p / "t.safetensors", {"table": torch.ones(2, 2, 1)}, {"units": '["ff"]'}),
     "uint8 or bool"),
    (lambda p: _safetensors(p / "t.safetensors", {"table": torch.ones(2, 2, 1, dtype=torch.uint8)}, {}),
     "no 'units' entry"),
    (lambda p: _safetensors(p / "t.safetensors", {"other": torch.ones(2, 2, 1, dtype=torch.uint8)},
                            {"units": '["ff"]'}), "no tensor named 'table'"),
    (lambda p: (p / "t.safetensors").write_bytes(b"garbage") and p / "t.safetensors", "not a readable"),
    (lambda p: (p / "t.pt").write_bytes(b"\x80\x04") and p / "t.pt", "pickled files are never loaded"),
    (lambda p: p / "missing.json", "no such file"),
])
def test_malformed_tables_are_one_line_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        make_policy(f"table:path={path}")
    assert str(info.value).startswith("policy 'table': ") and "\n" not in str(info.value)


def test_save_table_validates(tmp_path):
    with pytest.raises(ValueError, match="must be 0"):
        save_table(torch.full((2, 2, 1), 3), ["ff"], tmp_path / "t.json")
    with pytest.raises(ValueError, match="uint8 or bool"):
        save_table(torch.ones(2, 2, 1), ["ff"], tmp_path / "t.json")
    with pytest.raises(ValueError, match="unsupported file type"):
        save_table(torch.ones(2, 2, 1, dtype=torch.uint8), ["ff"], tmp_path / "t.pt")
    with pytest.raises(ValueError, match="path is required"):
        make_policy("table")
    path = save_table(torch.tensor([[[1, 0]], [[1, 1]]]), ["attn1", "ff"], tmp_path / "t.safetensors")
    assert load_table(path)[0].tolist() == [[[1, 0]], [[1, 1]]] and not list(tmp_path.glob(".*.tmp"))
