import torch
import torch.nn.functional as F

from cqpolicy.evaluation.cost import PeakMemory, count_macs


def test_linear_macs_are_exact():
    layer = torch.nn.Linear(16, 8, bias=False)
    macs, _ = count_macs(lambda: layer(torch.randn(4, 16)))
    assert macs == 4 * 16 * 8


def test_attention_is_counted_under_the_math_backend():
    q = k = v = torch.randn(2, 3, 10, 8)  # batch, heads, tokens, head dim
    macs, _ = count_macs(lambda: F.scaled_dot_product_attention(q, k, v))
    assert macs >= 2 * (2 * 3 * 10 * 10 * 8)  # QK^T and AV


def test_dit_macs_scale_with_steps(tiny_dit_dir):
    from cqpolicy.models import load_model
    from cqpolicy.sampling import SampleSettings, sample

    model = load_model(str(tiny_dit_dir))
    macs = [count_macs(lambda s=s: sample(model, [0, 1], [0, 1], SampleSettings(steps=s), progress=False))[0]
            for s in (2, 4)]
    assert macs[0] > 0 and macs[1] == 2 * macs[0]


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory() as mem:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB
        block.add_(1)
        import time
        time.sleep(0.05)
        del block
    assert mem.peak_bytes > 32 * 1024 * 1024
