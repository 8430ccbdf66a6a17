"""Gates trained through the sampler: soft decisions in the runtime, the budget rule, training, deployment."""
from __future__ import annotations

import json

import pytest
import torch

from cqpolicy.models import load_model
from cqpolicy.policies import make_policy
from cqpolicy.policies.base import Policy
from cqpolicy.policies.gates import GateNet, gate_inputs, min_budget, plan
from cqpolicy.runtime import enable
from cqpolicy.sampling import SampleSettings
from cqpolicy.sampling.sampler import denoise_batch, initial_noise


class _Gate(Policy):
    """Every unit gets ``gate`` (a float tensor: soft) or ``compute`` (a bool: hard)."""

    def __init__(self, gate):
        self.gate = gate

    def decide(self, query):
        return self.gate(query)


def _run(model, policy, settings, grad=False, cache_format="fp32"):
    noise = initial_noise([5, 6], model.latent_shape)
    with enable(model.transformer, policy, cache_format=cache_format):
        return denoise_batch(model, torch.tensor([1, 2]), noise, settings, grad=grad)


def test_soft_gates_of_one_and_zero_are_the_hard_schedule_and_gradients_reach_them(tiny_dit_dir):
    model = load_model(str(tiny_dit_dir))
    settings = SampleSettings(steps=6, guidance_scale=2.0, batch_size=2)
    every_other = lambda q: q.step % 2 == 0  # noqa: E731
    hard = _run(model, _Gate(every_other), settings)
    soft = _run(model, _Gate(lambda q: torch.tensor(float(every_other(q)))), settings)
    assert torch.allclose(hard, soft, atol=1e-5)
    assert not torch.allclose(hard, _run(model, _Gate(lambda q: True), settings), atol=1e-3)

    gates = torch.full((6,), 0.5, requires_grad=True)
    x = _run(model, _Gate(lambda q: gates[q.step]), settings, grad=True)
    x.pow(2).mean().backward()
    assert gates.grad[0] == 0  # step 0 has no cache: its gate mixes nothing
    assert int((gates.grad[1:] != 0).sum()) >= 3  # (the random model's last steps may saturate clip_sample)
    for p in model.transformer.parameters():
        assert p.grad is None


def test_plan_spends_the_budget_and_starts_as_a_uniform_interval():
    torch.manual_seed(0)
    steps, macs = 20, torch.tensor([[3.0, 5.0], [3.0, 5.0], [2.0, 9.0]])
    row = float(macs.sum()) + 1.0

    def fraction(table):
        return (steps * (row - float(macs.sum())) + float((table.double() * macs.reshape(-1).double()).sum())) / (
            steps * row)

    a, b = torch.randn(steps, 6), torch.rand(steps, 6) + 0.5
    for budget in (0.2, 0.35, 0.6, 0.9):
        table, scores, theta = plan(a, b, budget, row, macs)
        assert bool(table[0].all())
        assert fraction(table) <= budget + 1e-9
        assert fraction(table) >= budget - 0.1  # a threshold fills the budget up to a few cells
        assert bool((scores[1:][table[1:]] > theta).all()) and bool((scores[1:][~table[1:]] <= theta).all())
    net = GateNet(6)  # zero last layer: every unit refreshes at the same interval, the largest the budget allows
    a, b = net(gate_inputs(torch.linspace(-5, 5, steps), 0.3, [0, 0.5, 0.3], [3, 0.3, 0.1]))
    table, _, _ = plan(a, b, 0.3, row, macs)
    assert bool((table == table[:, :1]).all())
    computed = table[:, 0].nonzero().flatten().tolist()
    assert computed == list(range(0, steps, computed[1]))
    assert min_budget(steps, row, macs) == pytest.approx((steps * 1.0 + float(macs.sum())) / (steps * row))


@pytest.fixture(scope="module")
def gates_artifact(tmp_path_factory):
    from cqpolicy.training.rollout import train_gates
    from conftest import mlflow_store_at, save_with_scheduler, tiny_fmnist_dit

    root = tmp_path_factory.mktemp("gates")
    model_dir = save_with_scheduler(tiny_fmnist_dit(), root / "tiny-dit")
    with mlflow_store_at(root):
        meta = train_gates(str(model_dir), root / "gates", steps=6, budget_range=(0.3, 0.8), train_samples=4,
                           val_samples=2, batch_size=2, max_epochs=2, progress=False)
    return model_dir, root / "gates", meta


def test_train_gates_writes_a_budget_conditioned_artifact(gates_artifact):
    _, path, meta = gates_artifact
    assert meta["kind"] == "gates" and meta["budget_range"] == [0.3, 0.8]
    assert meta["training"]["global_step"] == 4  # 2 epochs x 2 batches of 2 rollout seeds
    assert meta["training"]["rollout_seeds"][0] == 22_000_000
    for budget in (0.3, 0.55, 0.8):  # the held-out runs spend what was asked, to one unit of one step
        assert meta["metrics"][f"val_macs_fraction_b{budget:g}"] == pytest.approx(budget, abs=0.06)
    assert json.loads((path / "policy.json").read_text())["weights_sha256"]


def test_gates_deploy_at_any_budget_in_range_and_other_step_counts(gates_artifact):
    from cqpolicy.evaluation.cost import measured_sample

    model_dir, path, _ = gates_artifact
    model = load_model(str(model_dir))
    for steps in (6, 12):  # trained at 6 steps; keyed on log-SNR and progress, so 12 steps work as well
        settings = SampleSettings(steps=steps, guidance_scale=2.0, batch_size=2)
        plain = measured_sample(model, None, "fp16", [1, 2], [3, 4], settings)
        for budget in (0.35, 0.75):
            policy = make_policy(f"learned:path={path},budget={budget}")
            policy.prepare(model, settings)
            run = measured_sample(model, policy, "fp16", [1, 2], [3, 4], settings)
            assert run.macs / plain.macs == pytest.approx(budget, abs=0.08)
            assert run.reuse_ratio > 0


def test_gates_bad_budgets_are_one_line_errors(gates_artifact, tmp_path):
    from cqpolicy.cli import main

    model_dir, path, _ = gates_artifact
    for spec, says in ((f"learned:path={path}", "none given"), (f"learned:path={path},budget=0.9", "got 0.9"),
                       (f"learned:path={path},budget=0.1", "got 0.1")):
        with pytest.raises(ValueError, match=says):
            make_policy(spec)
    out = tmp_path / "s"
    assert main(["sample", "--model", str(model_dir), "--policy", f"learned:path={path},budget=0.95",
                 "--num-samples", "2", "--steps", "6", "--out", str(out)]) != 0
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ValueError, match="below the least"):  # 1 step: step 0 computes everything
        policy = make_policy(f"learned:path={path},budget=0.3")
        policy.prepare(load_model(str(model_dir)), SampleSettings(steps=1, guidance_scale=2.0))


def test_gates_of_another_model_are_refused(gates_artifact, tiny_unet_dir, tmp_path):
    from cqpolicy.policies.artifact import ArtifactError
    from conftest import save_with_scheduler, tiny_fmnist_dit

    _, path, _ = gates_artifact
    model = load_model(str(save_with_scheduler(tiny_fmnist_dit(seed=1), tmp_path / "other")))
    policy = make_policy(f"learned:path={path},budget=0.5")
    with pytest.raises(ArtifactError, match="weight hash"):
        policy.prepare(model, SampleSettings(steps=6, guidance_scale=2.0))
    unet = load_model(str(tiny_unet_dir))
    with pytest.raises(ArtifactError, match="model class"):
        policy.prepare(unet, SampleSettings(steps=6, guidance_scale=2.0))


def test_gates_train_and_deploy_on_a_unet(tiny_unet_dir, tmp_path):
    from cqpolicy.evaluation.cost import measured_sample
    from cqpolicy.training.rollout import train_gates

    meta = train_gates(str(tiny_unet_dir), tmp_path / "gates", steps=6, budget_range=(0.5, 0.9), train_samples=2,
                       val_samples=2, batch_size=2, max_epochs=1, progress=False)
    assert meta["model"]["class"] == "UNet2DModel" and meta["model"]["units"] == ["layer"]
    model = load_model(str(tiny_unet_dir))
    settings = SampleSettings(steps=6, guidance_scale=2.0, batch_size=2)
    policy = make_policy(f"learned:path={tmp_path / 'gates'},budget=0.6")
    policy.prepare(model, settings)
    run = measured_sample(model, policy, "fp16", [1, 2], [3, 4], settings)
    plain = measured_sample(model, None, "fp16", [1, 2], [3, 4], settings)
    assert run.macs / plain.macs == pytest.approx(0.6, abs=0.1)


def test_gates_warm_started_from_a_trace_trained_mlp_rank_cells_as_its_predictions(gates_artifact, tmp_path):
    from conftest import mlflow_store_at

    from cqpolicy.tracing.collect import collect
    from cqpolicy.training.rollout import mlp_prior, train_gates, warm_start
    from cqpolicy.training.train import train_policy

    model_dir, _, _ = gates_artifact
    model = load_model(str(model_dir))
    collect(model, SampleSettings(steps=6, guidance_scale=2.0, batch_size=2), tmp_path / "chain", num_samples=4,
            probes=("chain",), progress=False)
    train_policy([tmp_path / "chain"], out_dir=tmp_path / "mlp", max_epochs=2, chain=True, label="local",
                 progress=False)
    blocks = 2
    targets, mask = mlp_prior(tmp_path / "mlp", tmp_path / "chain", 6, ("attn1", "ff"), blocks)
    assert targets.shape == (6, 2 * blocks, 8)
    assert bool(mask[1:, :, 0].all()) and not bool(mask[:, :, 6:].any())  # age s needs step >= s; 6 steps
    assert bool(mask[5, :, :5].all())

    net = GateNet(2 * blocks)
    snrs = torch.linspace(3, -3, 6).tolist()
    mean, std = [0.0, 0.5, 0.55], [2.0, 0.3, 0.15]
    ages = torch.log(torch.arange(1, 9, dtype=torch.float32))

    def misfit():  # the score's squared error against each step's centred targets
        with torch.no_grad():
            a, b = net(gate_inputs(snrs, 0.55, mean, std))
        centred = targets - (targets * mask).sum((1, 2), keepdim=True) / mask.sum((1, 2), keepdim=True).clamp_min(1)
        return float((((a[..., None] + b[..., None] * ages) - centred).pow(2) * mask).sum() / mask.sum())

    before = misfit()
    warm_start(net, targets, mask, snrs, (0.3, 0.8), mean, std, iterations=300)
    assert misfit() < 0.5 * before

    with mlflow_store_at(tmp_path):
        meta = train_gates(str(model_dir), tmp_path / "warm", steps=6, budget_range=(0.3, 0.8), train_samples=2,
                           val_samples=2, batch_size=2, max_epochs=0, init_mlp=str(tmp_path / "mlp"),
                           init_traces=str(tmp_path / "chain"), progress=False)
        with pytest.raises(ValueError, match="both init_mlp"):
            train_gates(str(model_dir), tmp_path / "half", steps=6, init_mlp=str(tmp_path / "mlp"), progress=False)
    assert meta["warm_start"]["fit_mse"] >= 0 and meta["training"]["global_step"] == 0
    policy = make_policy(f"learned:path={tmp_path / 'warm'},budget=0.5")
    settings = SampleSettings(steps=6, guidance_scale=2.0)
    policy.prepare(model, settings)
    assert 0 < float(policy.table.float().mean()) < 1


def test_gates_rollouts_are_recorded_as_traces_an_mlp_trains_on(gates_artifact, tmp_path):
    from cqpolicy.tracing.collect import collect
    from cqpolicy.tracing.store import TraceReader
    from cqpolicy.training.rollout import train_gates, trace_rollouts
    from cqpolicy.training.train import train_policy

    model_dir, path, _ = gates_artifact
    model = load_model(str(model_dir))
    settings = SampleSettings(steps=6, guidance_scale=2.0, batch_size=2)
    summaries = trace_rollouts(model, settings, path, 2, [0.3, 0.8], out_dir=tmp_path / "rollouts",
                               probes=("chain",), progress=False)
    runs = [tmp_path / "rollouts" / "budget-0.3", tmp_path / "rollouts" / "budget-0.8"]
    assert [s["run_dir"] for s in summaries] == [str(r) for r in runs]
    computed = []
    for run, seeds in zip(runs, ([22_000_000, 22_000_001], [22_000_002, 22_000_003])):
        reader = TraceReader([run])
        assert reader.seeds() == seeds and reader.manifest["policy"].endswith(f"budget={run.name[7:]}")
        table = reader.table(["computed", "impact_stale_2"]).to_pandas()
        computed.append(float(table["computed"].mean()))
        assert table["impact_stale_2"].notna().any()  # the same schema as any trace run, chain labels included
    assert computed[0] < computed[1] < 1  # the low budget's rollouts reuse more

    collect(model, settings, tmp_path / "plain", num_samples=2, probes=("chain",), progress=False)
    from cqpolicy.training.data import TraceDataModule, TraceError

    data = TraceDataModule([tmp_path / "plain", *runs], chain=True)
    rows = {name: torch.cat([data.split[s][name] for s in ("train", "val")]) for name in ("seed", "x")}
    since = rows["x"][:, data.features.index("steps_since_compute")]
    rollout = rows["seed"] >= 22_000_000
    assert bool(rollout.any()) and since[rollout].unique().numel() > 1  # the rollouts' own cache ages
    assert int((~rollout).sum()) > int(rollout.sum())  # plain rows carry every staleness, rollouts one each
    with pytest.raises(TraceError, match="plain model"):
        TraceDataModule(runs, chain=True)
    meta = train_policy([tmp_path / "plain", *runs], out_dir=tmp_path / "mlp", max_epochs=1, chain=True,
                        label="local", progress=False)
    assert meta["metrics"]["train_seeds"] + meta["metrics"]["val_seeds"] == 6
    with pytest.raises(ValueError, match="exceeds the 4 training rollouts"):
        train_gates(str(model_dir), tmp_path / "g", steps=6, train_samples=4, rollout_traces=2, progress=False)
