"""The cache store keeps what it claims to keep, at the precision and byte count it claims."""
import math

import pytest
import torch

from cqpolicy.runtime.cache_store import (
    CACHE_DTYPES,
    GRANULARITIES,
    CacheFormat,
    CacheStore,
    pack_int4,
    quantize,
    unpack_int4,
)

QMAX = {"int8": 127, "int4": 7}
INT_FORMATS = [(d, g) for d in ("int8", "int4") for g in GRANULARITIES]
HEADS = 4


def fmt_of(dtype: str, granularity: str = "tensor") -> CacheFormat:
    return CacheFormat(dtype, granularity, HEADS if granularity == "head" else None)


def reference_amax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """amax per scale group, computed independently of the module (granularities act on the last dim)."""
    a, c = x.abs().float(), x.shape[-1]
    if granularity == "tensor":
        return a.amax().reshape(1)
    if granularity == "channel":
        return a.reshape(-1, c).amax(0)
    if granularity == "token":
        return a.amax(-1).reshape(-1)
    return a.reshape(-1, HEADS, c // HEADS).amax(dim=(0, 2))


def per_element_scale(stored, x: torch.Tensor) -> torch.Tensor:
    """Expand the stored scales to x's shape, following their documented broadcast layout."""
    s = stored.scales.float()
    if stored.format.granularity == "head":
        grouped = x.reshape(*x.shape[:-1], HEADS, x.shape[-1] // HEADS)
        return s.expand_as(grouped).reshape(x.shape)
    return s.expand_as(x)


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(2, 6, 16) * 3


# 1. round trips

def test_fp32_round_trip_is_exact_and_a_copy(x):
    stored = quantize(x, CacheFormat("fp32"))
    assert stored.scales is None
    assert torch.equal(stored.dequantize(), x)
    x.add_(1.0)  # the cache holds its own copy
    assert not torch.equal(stored.dequantize(), x)


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_formats_equal_a_plain_cast(x, name, dtype):
    stored = quantize(x, CacheFormat(name))
    assert stored.payload.dtype == dtype and stored.scales is None
    out = stored.dequantize()
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, x.to(dtype).to(torch.float32))


@pytest.mark.parametrize("dtype,granularity", INT_FORMATS)
@pytest.mark.parametrize("shape", [(2, 6, 16), (2, 8, 3, 4)])  # tokens [B, N, C] and images [B, C, H, W]
def test_int_error_is_at_most_half_a_scale(dtype, granularity, shape):
    torch.manual_seed(1)
    x = torch.randn(shape) * torch.logspace(-2, 1, shape[-1])  # uneven channels
    stored = quantize(x, fmt_of(dtype, granularity))
    assert stored.scales.dtype == torch.float16
    # scales are the ideal amax / qmax, rounded up (never down) to float16
    ideal = reference_amax(x, granularity) / QMAX[dtype]
    got = stored.scales.float().reshape(-1)
    assert got.shape == ideal.shape
    assert torch.all(got >= ideal) and torch.all(got <= ideal * (1 + 2 ** -9))
    out = stored.dequantize()
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    err = (out - x).abs()
    assert torch.all(err <= per_element_scale(stored, x) / 2 + 1e-6)
    assert err.max() > 0  # really quantized, not a disguised float copy


def test_int8_keeps_a_half_precision_source_dtype():
    x = torch.randn(3, 8).half()
    out = quantize(x, CacheFormat("int8", "token")).dequantize()
    assert out.dtype == torch.float16 and out.shape == x.shape


# 2. int4 packing

@pytest.mark.parametrize("n", [15, 16, 1, 7])
def test_int4_pack_unpack_is_exact(n):
    values = (torch.arange(n) % 15 - 7).to(torch.int8)  # every value in [-7, 7] once n >= 15
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 2)
    assert torch.equal(unpack_int4(packed, n), values)


def test_int4_nibble_order_is_low_even_high_odd():
    packed = pack_int4(torch.tensor([-7, 7, 0], dtype=torch.int8))
    assert packed.tolist() == [(-7 + 8) | ((7 + 8) << 4), 0 + 8]  # the odd count is padded with a 0 nibble


def test_int4_quantize_is_exact_on_integer_grid_of_odd_size():
    x = (torch.arange(15, dtype=torch.float32) - 7).reshape(3, 5)  # amax 7 -> scale exactly 1
    stored = quantize(x, CacheFormat("int4"))
    assert stored.payload.numel() == 8
    assert torch.equal(stored.dequantize(), x)


# 3. byte accounting

@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_bytes_shrink_with_precision(granularity):
    x = torch.randn(2, 49, 128)
    fp16 = quantize(x, fmt_of("fp16", granularity)).nbytes
    assert fp16 == x.numel() * 2
    assert quantize(x, fmt_of("fp32", granularity)).nbytes == x.numel() * 4
    assert abs(quantize(x, fmt_of("int8", granularity)).nbytes / fp16 - 0.50) <= 0.02
    assert abs(quantize(x, fmt_of("int4", granularity)).nbytes / fp16 - 0.25) <= 0.02


def test_nbytes_is_payload_plus_scales_exactly():
    x = torch.randn(2, 49, 128)
    n = x.numel()
    assert quantize(x, CacheFormat("int4", "token")).nbytes == math.ceil(n / 2) + 2 * 49 * 2  # fp16 scale per token
    assert quantize(x, CacheFormat("int8", "channel")).nbytes == n + 128 * 2
    assert quantize(x, CacheFormat("int8", "head", 4)).nbytes == n + 4 * 2
    assert quantize(x, CacheFormat("int8")).nbytes == n + 2
    odd = torch.randn(3, 5)
    assert quantize(odd, CacheFormat("int4")).nbytes == 8 + 2  # the padding nibble's byte counts


# 4. granularity matters

def _mse(x, fmt):
    return float((quantize(x, fmt).dequantize() - x).pow(2).mean())


def test_per_channel_beats_per_tensor_on_uneven_channels():
    torch.manual_seed(2)
    x = torch.randn(2, 32, 16) * torch.logspace(-3, 2, 16)  # channel magnitudes span 5 decades
    assert _mse(x, CacheFormat("int8", "channel")) < _mse(x, CacheFormat("int8", "tensor"))


def test_per_token_beats_per_tensor_on_uneven_tokens():
    torch.manual_seed(3)
    x = torch.randn(2, 16, 32) * torch.logspace(-3, 2, 16)[:, None]  # token magnitudes span 5 decades
    assert _mse(x, CacheFormat("int8", "token")) < _mse(x, CacheFormat("int8", "tensor"))


def test_per_head_beats_per_tensor_on_uneven_heads():
    torch.manual_seed(4)
    x = torch.randn(2, 16, 32) * torch.tensor([1e-3, 1e-1, 1.0, 1e2]).repeat_interleave(8)
    assert _mse(x, CacheFormat("int8", "head", 4)) < _mse(x, CacheFormat("int8", "tensor"))


# 5. errors

def test_parse():
    assert CacheFormat.parse("fp16") == CacheFormat("fp16")
    assert CacheFormat.parse("int8") == CacheFormat("int8", "tensor")
    assert CacheFormat.parse("int4-token") == CacheFormat("int4", "token")
    assert CacheFormat.parse(" INT8-head ", num_heads=4) == CacheFormat("int8", "head", 4)
    for name in CACHE_DTYPES:
        assert CacheFormat.parse(name).dtype == name


@pytest.mark.parametrize("make,needle", [
    (lambda: CacheFormat("int3"), "int3"),
    (lambda: CacheFormat.parse("int3-token"), "int3"),
    (lambda: CacheFormat("int8", "row"), "row"),
    (lambda: CacheFormat.parse("int8-row"), "row"),
    (lambda: CacheFormat.parse("int8-token-x"), "int8-token-x"),
    (lambda: CacheFormat("int8", "head"), "num_heads"),
    (lambda: CacheFormat.parse("int4-head"), "num_heads"),
    (lambda: CacheFormat("int8", "head", 0), "num_heads"),
])
def test_bad_formats_raise_a_clear_value_error(make, needle):
    with pytest.raises(ValueError, match=needle) as info:
        make()
    assert "\n" not in str(info.value)


def test_unknown_values_list_the_allowed_ones():
    with pytest.raises(ValueError, match="int8.*int4"):
        CacheFormat("int3")
    with pytest.raises(ValueError, match="channel.*token.*head"):
        CacheFormat("int8", "row")


def test_head_granularity_needs_divisible_channels():
    with pytest.raises(ValueError, match=r"\(10\).*num_heads \(4\)"):
        quantize(torch.randn(2, 10), CacheFormat("int8", "head", 4))


def test_non_finite_values_cannot_be_quantized_silently():
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([1.0, float("nan")]), CacheFormat("int8"))
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([1.0, float("inf")]), CacheFormat("int4"))


def test_missing_key_raises_key_error():
    store = CacheStore()
    store.put(("block", 0), torch.ones(2))
    with pytest.raises(KeyError, match="block"):
        store.get(("block", 1))


# 6. the store

def test_store_put_get_replace_clear():
    store = CacheStore(CacheFormat("int8", "token"))
    a, b, c = torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(4, 8, 8)
    store.put(("attn", 0), a)
    store.put(("mlp", 0), b)
    assert len(store) == 2 and ("attn", 0) in store and ("attn", 1) not in store
    assert torch.allclose(store.get(("attn", 0)), a, atol=a.abs().max().item() / 127)
    sizes = {k: quantize(v, store.fmt).nbytes for k, v in {("attn", 0): a, ("mlp", 0): b}.items()}
    assert store.nbytes == sum(sizes.values()) == store.peak_nbytes

    store.put(("attn", 0), c)  # replace with a larger tensor
    assert len(store) == 2
    assert store.get(("attn", 0)).shape == c.shape
    assert store.nbytes == sizes[("mlp", 0)] + quantize(c, store.fmt).nbytes
    peak = store.nbytes
    assert store.peak_nbytes == peak

    store.put(("attn", 0), a)  # shrink again: the peak remembers
    assert store.nbytes < peak and store.peak_nbytes == peak

    out = store.get(("mlp", 0))
    out.zero_()  # results are fresh tensors: writing into one leaves the cache intact
    assert store.get(("mlp", 0)).abs().sum() > 0

    store.clear()
    assert len(store) == 0 and store.nbytes == 0 and store.peak_nbytes == 0 and ("mlp", 0) not in store


def test_fp16_store_does_not_alias_caller_tensors():
    store = CacheStore()  # default fp16
    x = torch.randn(4, 4).half()
    store.put("k", x)
    x.zero_()
    got = store.get("k")
    assert got.abs().sum() > 0
    got.zero_()
    assert store.get("k").abs().sum() > 0


# 7. degenerate inputs

@pytest.mark.parametrize("dtype,granularity", INT_FORMATS)
@pytest.mark.parametrize("value", [0.0, 1e-30])
def test_zero_and_tiny_tensors_stay_finite(dtype, granularity, value):
    x = torch.full((2, 3, 8), value)
    out = quantize(x, fmt_of(dtype, granularity)).dequantize()
    assert torch.isfinite(out).all()
    assert torch.allclose(out, x, atol=1e-7)
    if value == 0.0:
        assert torch.equal(out, x)
