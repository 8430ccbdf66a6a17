"""Hold the tensors a feature cache actually reuses, in full or reduced precision, and count their bytes honestly.

What ``CacheStore.get`` returns is rebuilt from exactly what is stored, so the precision loss a reduced
format causes is the loss the model sees, and ``nbytes`` counts every stored byte: payload (including the
padding nibble of int4), plus the float16 scales of the integer formats.

Integer formats are symmetric and zero-point free: ``scale = amax / qmax`` with ``qmax = 127`` (int8) or
``7`` (int4) and ``q = round(x / scale).clamp(-qmax, qmax)``. Scale granularities are defined on the LAST
dimension ``C`` of the tensor, whatever its layout (``[B, N, C]`` tokens or ``[B, C, H, W]`` images alike):

* ``tensor``  -- one scale for the whole tensor;
* ``channel`` -- one scale per index of the last dim (amax over all other dims);
* ``token``   -- one scale per row of the last dim (amax over the last dim only), ``x.shape[:-1]`` scales;
* ``head``    -- the last dim is split into ``num_heads`` contiguous groups of ``C // num_heads``; one scale
  per group (amax over everything but the head index).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch

CACHE_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
GRANULARITIES = ("tensor", "channel", "token", "head")

_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_QMAX = {"int8": 127, "int4": 7}
_SCALE_DTYPE = torch.float16
# Smallest positive float16 (subnormal 2**-24): anything smaller would become 0 once cast and divide by zero.
_MIN_SCALE = 2.0 ** -24
_MAX_SCALE = float(torch.finfo(_SCALE_DTYPE).max)


@dataclass(frozen=True)
class CacheFormat:
    """How cached tensors are stored: a dtype and, for int8/int4, the granularity of their scales."""

    dtype: str = "fp16"  # one of CACHE_DTYPES
    granularity: str = "tensor"  # scale granularity for int8/int4; ignored for float dtypes
    num_heads: int | None = None  # required when granularity == "head"

    def __post_init__(self) -> None:
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"unknown cache dtype {self.dtype!r}; choose from {', '.join(CACHE_DTYPES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown scale granularity {self.granularity!r}; "
                             f"choose from {', '.join(GRANULARITIES)}")
        if self.num_heads is not None and (isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int)
                                           or self.num_heads < 1):
            raise ValueError(f"num_heads must be a positive int, got {self.num_heads!r}")
        if self.granularity == "head" and self.num_heads is None:
            raise ValueError("granularity 'head' needs num_heads (a positive int), got None")

    @property
    def is_float(self) -> bool:
        """True for the plain-cast formats (fp32/fp16/bf16), which carry no scales."""
        return self.dtype in _FLOAT_DTYPES

    @classmethod
    def parse(cls, text: str, *, num_heads: int | None = None) -> "CacheFormat":
        """Parse ``"<dtype>[-<granularity>]"``, e.g. ``"fp16"``, ``"int8"``, ``"int4-token"``, ``"int8-head"``.

        ``num_heads`` is passed separately because it belongs to the model, not to the format name.
        """
        parts = text.strip().lower().split("-")
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"cannot parse cache format {text!r}; expected '<dtype>[-<granularity>]' with dtype in "
                             f"{', '.join(CACHE_DTYPES)} and granularity in {', '.join(GRANULARITIES)}")
        granularity = parts[1] if len(parts) == 2 else "tensor"
        return cls(dtype=parts[0], granularity=granularity, num_heads=num_heads)

    def __str__(self) -> str:
        if self.is_float or self.granularity == "tensor":
            return self.dtype
        return f"{self.dtype}-{self.granularity}"


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """What the cache keeps for one tensor: exactly the bytes counted by ``nbytes``, nothing else.

    ``payload`` is the cast values (fp32/fp16/bf16), int8 values, or uint8 holding two int4 values per byte
    (flattened, low nibble = even index). ``scales`` (int formats only) is float16, shaped to broadcast
    against the values: over ``x`` itself for tensor/channel/token, over ``x`` viewed as
    ``[..., num_heads, C // num_heads]`` for head.
    """

    payload: torch.Tensor
    scales: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype  # dtype of the original tensor, restored by dequantize
    format: CacheFormat

    def dequantize(self) -> torch.Tensor:
        """A fresh tensor of the original shape, dtype and device (never aliasing the stored payload)."""
        if self.format.is_float:
            # copy=True: a caller writing into the result in place must not corrupt the cache
            return self.payload.to(self.dtype, copy=True).reshape(self.shape)
        if self.format.dtype == "int4":
            values = unpack_int4(self.payload, _numel(self.shape))
        else:
            values = self.payload
        grouped = values.reshape(_grouped_shape(self.shape, self.format)).to(torch.float32)
        # The very same fp16 scales quantize used, so the error bound scale/2 holds exactly.
        out = grouped * self.scales.to(torch.float32)
        return out.reshape(self.shape).to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Exact storage: payload bytes (with any int4 padding) plus scale bytes."""
        total = self.payload.numel() * self.payload.element_size()
        if self.scales is not None:
            total += self.scales.numel() * self.scales.element_size()
        return total


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack integers in [-8, 7] two per uint8 byte as ``value + 8`` nibbles (low = even, high = odd index).

    The input is flattened; an odd count is padded with one zero nibble, which ``nbytes`` then counts.
    """
    flat = values.reshape(-1).to(torch.int16) + 8  # int16: no overflow while offsetting
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 15):
        raise ValueError("pack_int4 needs values in [-8, 7]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: the first ``numel`` values, as a flat int8 tensor."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    return torch.stack([low, high], dim=-1).reshape(-1)[:numel] - 8


def quantize(x: torch.Tensor, fmt: CacheFormat) -> StoredTensor:
    """Store ``x`` in format ``fmt``. Always copies, so later in-place edits of ``x`` do not reach the cache."""
    if not x.is_floating_point():
        raise TypeError(f"can only cache floating-point tensors, got {x.dtype}")
    if not (fmt.dtype == "fp32" and torch.is_grad_enabled()):
        x = x.detach()  # fp32 under grad mode keeps the graph: training through the sampler reads the cache
    if fmt.is_float:
        payload = x.to(dtype=_FLOAT_DTYPES[fmt.dtype], copy=True, memory_format=torch.contiguous_format)
        return StoredTensor(payload, None, x.shape, x.dtype, fmt)

    qmax = _QMAX[fmt.dtype]
    grouped = x.to(torch.float32).reshape(_grouped_shape(x.shape, fmt))
    scale_shape = _scale_shape(x.shape, fmt)
    if grouped.numel() == 0:
        amax = grouped.new_zeros(scale_shape)  # amax of an empty reduction is undefined in torch
    else:
        amax = grouped.abs().amax(dim=_reduce_dims(x.shape, fmt), keepdim=True)
    scales = _to_fp16_rounding_up((amax / qmax).clamp_min(_MIN_SCALE))
    q = torch.round(grouped / scales.to(torch.float32)).clamp_(-qmax, qmax)
    if fmt.dtype == "int4":
        payload = pack_int4(q)
    else:
        payload = q.to(torch.int8).reshape(x.shape)
    return StoredTensor(payload, scales, x.shape, x.dtype, fmt)


class CacheStore:
    """Keyed store of StoredTensor for one sampling call; keys are hashable tuples chosen by the caller.

    ``nbytes`` is the sum of the entries' exact storage; ``peak_nbytes`` is its maximum since construction
    or the last ``clear()`` (measured after each put, i.e. not counting the brief overlap of a replaced
    entry and its replacement).
    """

    def __init__(self, fmt: CacheFormat = CacheFormat()) -> None:
        self.fmt = fmt
        self._entries: dict[Hashable, StoredTensor] = {}
        self._nbytes = 0  # running sum, so nbytes is O(1) however many entries are held
        self.peak_nbytes = 0

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Quantize ``tensor`` and store it under ``key``, replacing any previous entry."""
        stored = quantize(tensor, self.fmt)  # quantize first: a failure leaves the old entry in place
        old = self._entries.pop(key, None)
        if old is not None:
            self._nbytes -= old.nbytes
        self._entries[key] = stored
        self._nbytes += stored.nbytes
        self.peak_nbytes = max(self.peak_nbytes, self._nbytes)

    def get(self, key: Hashable) -> torch.Tensor:
        """The dequantized tensor stored under ``key`` (a fresh tensor each call)."""
        try:
            stored = self._entries[key]
        except KeyError:
            raise KeyError(f"no cached tensor under key {key!r} ({len(self._entries)} entries held)") from None
        return stored.dequantize()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry and reset both ``nbytes`` and ``peak_nbytes`` to 0."""
        self._entries.clear()
        self._nbytes = 0
        self.peak_nbytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes currently held: the sum of the entries' ``nbytes``."""
        return self._nbytes


def _numel(shape: torch.Size) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _last_dim(shape: torch.Size, fmt: CacheFormat) -> int:
    if len(shape) == 0:
        raise ValueError(f"granularity {fmt.granularity!r} needs a tensor with at least 1 dim, got a 0-d tensor")
    return shape[-1]


def _grouped_shape(shape: torch.Size, fmt: CacheFormat) -> tuple[int, ...]:
    """The view of ``x`` that the scales broadcast against: ``x`` itself, or ``[..., H, C // H]`` for head."""
    if fmt.granularity != "head":
        return tuple(shape)
    c, h = _last_dim(shape, fmt), fmt.num_heads
    if c % h:
        raise ValueError(f"granularity 'head' needs the last dim ({c}) divisible by num_heads ({h})")
    return (*shape[:-1], h, c // h)


def _reduce_dims(shape: torch.Size, fmt: CacheFormat) -> tuple[int, ...]:
    """Dims of the grouped view that one scale spans."""
    nd = len(shape)
    if fmt.granularity == "tensor":
        return tuple(range(nd))
    _last_dim(shape, fmt)
    if fmt.granularity == "channel":
        return tuple(range(nd - 1))
    if fmt.granularity == "token":
        return (nd - 1,)
    return tuple(range(nd - 1)) + (nd,)  # head: grouped view has nd + 1 dims; keep only dim nd - 1 (the head)


def _scale_shape(shape: torch.Size, fmt: CacheFormat) -> tuple[int, ...]:
    """Shape of the (keepdim) scales tensor, as amax would produce it."""
    grouped = _grouped_shape(shape, fmt)
    reduced = set(_reduce_dims(shape, fmt))
    return tuple(1 if i in reduced else d for i, d in enumerate(grouped))


def _to_fp16_rounding_up(scale: torch.Tensor) -> torch.Tensor:
    """Cast positive fp32 scales to fp16, rounding up so ``scale >= amax / qmax`` still holds.

    Rounding down could push ``|x| / scale`` past qmax, where the clamp would break the scale/2 error bound.
    """
    if scale.numel() and (not bool(torch.isfinite(scale).all()) or float(scale.max()) > _MAX_SCALE):
        raise ValueError("cannot quantize: the tensor holds non-finite values or magnitudes too large for "
                         "float16 scales")
    half = scale.to(_SCALE_DTYPE)
    low = half.to(torch.float32) < scale
    # For positive finite fp16, the next representable value up is the bit pattern plus one.
    bumped = (half.view(torch.int16) + 1).view(_SCALE_DTYPE)
    return torch.where(low, bumped, half)
