"""The runtime under torch.compile (CPU, inductor): each unit's computation compiled on its own."""
import torch

import cqpolicy
from conftest import tiny_fmnist_dit
from cqpolicy.models import fmnist_dit
from cqpolicy.models.loading import LoadedModel
from cqpolicy.sampling import SampleSettings, sample

SETTINGS = SampleSettings(steps=4, guidance_scale=2.0, batch_size=2)


def test_compiled_units_share_one_graph_per_kind_and_give_the_eager_images():
    """Tolerance: inductor fuses and reorders float32 reductions, so images move by ~1e-5 (measured up to 9e-5
    over 8 steps on a 4-block model); 2e-4 on images in [-1, 1] is far below one 8-bit grey level (7.8e-3)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = LoadedModel("tiny", tiny_fmnist_dit(num_layers=3), dict(fmnist_dit.SCHEDULER_CONFIG))
    with cqpolicy.enable(model.transformer, "fora:interval=2", "fp32"):
        eager = sample(model, [1, 2], [0, 1], SETTINGS, progress=False)
    runs = []
    for _ in range(2):
        with cqpolicy.enable(model.transformer, "fora:interval=2", "fp32", compile=True) as handle:
            runs.append(sample(model, [1, 2], [0, 1], SETTINGS, progress=False))
            assert handle.reuse_ratio == 0.5  # the schedule still decides, in Python
    torch.testing.assert_close(runs[0], eager, rtol=0, atol=2e-4)
    assert torch.equal(runs[0], runs[1])
    assert counters["stats"]["unique_graphs"] == 2  # attn1 and ff, each shared by the 3 blocks, no recompile
    assert not counters["graph_break"]
    with cqpolicy.enable(model.transformer, "fora:interval=2", "fp32"):
        assert torch.equal(sample(model, [1, 2], [0, 1], SETTINGS, progress=False), eager)  # eager again after
