"""Weight codecs: how one Linear / Conv2d weight is stored, and how it is rebuilt from exactly what is stored.

* ``uniform``: symmetric, zero-point free integers, ``qmax = 2**(bits-1) - 1``, one float16 scale per output
  channel or per group of ``group_size`` along the flattened input dim. 8 bits are stored as int8, 4 bits packed
  two per byte (``pack_int4``), other widths bit-packed; ``scale >= amax / qmax`` so ``|w - dq| <= scale / 2``.
* ``acqe`` (ACQ-E style): ``2**bits`` non-uniform levels per layer from 1-D k-means (Lloyd) initialised at the
  quantiles of the weight histogram, the level indices coded with a canonical Huffman code of the layer's index
  histogram. Stored: the code stream (padding included), one code length per level, the float16 levels.

``LayerCode.nbytes`` is the sum of the stored tensors' bytes: nothing else is needed to rebuild the weight.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from cqpolicy.runtime.cache_store import _to_fp16_rounding_up, pack_int4, unpack_int4

KINDS = ("uniform", "acqe")
MIN_BITS, MAX_BITS = 2, 8  # symmetric 1-bit has no non-zero level; indices and codes fit a byte up to 8
MAX_CODE_LENGTH = 16  # Huffman codes are limited to this length, so the decoder's lookup table has 2**16 entries
LLOYD_ITERS = 200
HISTOGRAM_BINS_PER_LEVEL = 64  # bin width ~ 1/64 of a level spacing: the histogram barely moves the levels
_MIN_SCALE = 2.0 ** -24  # smallest positive float16: a zero channel still gets a scale that is not 0


@dataclass
class LayerCode:
    """One weight as stored: ``tensors`` are exactly the bytes written to disk."""

    kind: str
    bits: int
    shape: tuple[int, ...]
    tensors: dict[str, torch.Tensor]
    group_size: int | None = None  # uniform only: the group actually used (the flattened input dim = per channel)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def runtime(self) -> "DequantizeWeight":
        """The parametrization that rebuilds this weight at every forward (decoding the Huffman stream once)."""
        if self.kind == "uniform":
            return DequantizeWeight(_uniform_codes(self), self.tensors["scales"].unsqueeze(-1), self.shape)
        return DequantizeWeight(torch.from_numpy(_acqe_indices(self)), self.tensors["centres"], self.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight this code stands for."""
        return self.runtime().weight()


class DequantizeWeight(torch.nn.Module):
    """``weight = values[codes]`` (levels; acqe) or ``codes * scales`` (uniform), rebuilt at every forward.

    Registered with ``parametrize.register_parametrization(..., unsafe=True)``: ``right_inverse`` leaves an empty
    placeholder as the "original" parameter, so the float weight is really gone from memory, and the module keeps
    its nn.Linear / nn.Conv2d type (MAC counting and the model adapters look for those).
    """

    def __init__(self, codes: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("codes", codes)  # uniform: int8 [out, groups, G]; acqe: uint8 level index per weight
        self.register_buffer("values", values)  # uniform: fp16 scales [out, groups, 1]; acqe: fp16 levels
        self.shape = tuple(shape)

    def weight(self) -> torch.Tensor:
        if self.codes.dtype == torch.uint8:
            return self.values.float()[self.codes.long()].reshape(self.shape)
        return (self.codes.float() * self.values.float()).reshape(self.shape)

    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:
        return self.weight().to(placeholder.dtype)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.new_empty(0)  # keeps the dtype (what forward casts to), drops the float weight


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"unsupported weight bit width {bits!r}: use an integer from {MIN_BITS} to {MAX_BITS}")
    return int(bits)


def effective_group(in_features: int, group_size: int | None) -> int:
    """The group along the flattened input dim: ``group_size`` where it divides it, else the whole row."""
    if group_size and group_size < in_features and in_features % group_size == 0:
        return int(group_size)
    return in_features


def encode(weight: torch.Tensor, kind: str, bits: int, group_size: int | None = None) -> LayerCode:
    """Store ``weight`` with codec ``kind`` at ``bits`` (``group_size``: uniform only, None = per channel)."""
    bits = check_bits(bits)
    weight = weight.detach().float().cpu()  # codes are built and stored on the CPU (numpy), moved at attach
    if kind == "uniform":
        return _encode_uniform(weight, bits, group_size)
    if kind == "acqe":
        return _encode_acqe(weight, bits)
    raise ValueError(f"unknown weight codec {kind!r}; choose from {', '.join(KINDS)}")


def _encode_uniform(weight: torch.Tensor, bits: int, group_size: int | None) -> LayerCode:
    out = weight.shape[0]
    rows = weight.reshape(out, -1)
    group = effective_group(rows.shape[1], group_size)
    grouped = rows.reshape(out, -1, group)
    qmax = 2 ** (bits - 1) - 1
    scales = _to_fp16_rounding_up((grouped.abs().amax(-1, keepdim=True) / qmax).clamp_min(_MIN_SCALE))
    q = torch.round(grouped / scales.float()).clamp_(-qmax, qmax).to(torch.int8)
    if bits == 8:
        payload = q.reshape(out, -1)
    elif bits == 4:
        payload = pack_int4(q)
    else:  # offset to [0, 2**bits): unsigned fields for the bit packer
        payload = torch.from_numpy(pack_bits(q.reshape(-1).numpy().astype(np.int16) + 2 ** (bits - 1), bits))
    return LayerCode("uniform", bits, tuple(weight.shape), {"q": payload, "scales": scales.squeeze(-1)}, group)


def _uniform_codes(code: LayerCode) -> torch.Tensor:
    """The int8 codes of a uniform LayerCode, [out, groups, group]."""
    out, numel = code.shape[0], code.numel
    payload = code.tensors["q"]
    if code.bits == 8:
        q = payload
    elif code.bits == 4:
        q = unpack_int4(payload, numel)
    else:
        q = torch.from_numpy(unpack_bits(payload.numpy(), code.bits, numel).astype(np.int8) - 2 ** (code.bits - 1))
    return q.reshape(out, -1, code.group_size).to(torch.int8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``values`` < 2**bits, ``bits`` each, most significant first, into bytes (the tail zero-padded)."""
    shifts = np.arange(bits - 1, -1, -1)
    return np.packbits(((values.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` unsigned values."""
    fields = np.unpackbits(packed)[:count * bits].reshape(count, bits).astype(np.int64)
    return fields @ (1 << np.arange(bits - 1, -1, -1))


# --- ACQ-E: histogram-guided clustering + Huffman-coded indices -------------------------------------------------

def cluster_levels(values: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` sorted levels for ``values``: Lloyd's 1-D k-means run on a fine histogram of the values
    (bin centres weighted by their counts: cheap enough to converge), started at the histogram's quantiles."""
    hist, edges = np.histogram(values, bins=HISTOGRAM_BINS_PER_LEVEL * k)
    mids, cdf = (edges[1:] + edges[:-1]) / 2, np.concatenate([[0.0], np.cumsum(hist) / hist.sum()])
    centres = np.unique(np.interp((np.arange(k) + 0.5) / k, cdf, edges))  # histogram quantiles
    for _ in range(LLOYD_ITERS):
        idx = np.searchsorted((centres[1:] + centres[:-1]) / 2, mids)  # 1-D nearest centre
        counts = np.bincount(idx, weights=hist, minlength=len(centres))
        sums = np.bincount(idx, weights=hist * mids, minlength=len(centres))
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centres)  # an empty cluster keeps its level
        if np.array_equal(updated, centres):
            break
        centres = updated  # 1-D Lloyd keeps the centres sorted
    return centres


def _encode_acqe(weight: torch.Tensor, bits: int) -> LayerCode:
    values = weight.double().reshape(-1).numpy()
    # The stored float16 levels are the ones indices point to (merged where fp16 rounding makes two equal).
    levels = np.unique(cluster_levels(values, 2 ** bits).astype(np.float16)).astype(np.float64)
    idx = np.searchsorted((levels[1:] + levels[:-1]) / 2, values)
    counts = np.bincount(idx, minlength=len(levels))
    used = counts > 0  # unused levels cost table bytes and would get no code: drop them
    idx = (np.cumsum(used) - 1)[idx]
    lengths = huffman_lengths(counts[used])
    tensors = {"stream": torch.from_numpy(huffman_encode(idx, lengths)),
               "lengths": torch.from_numpy(lengths.astype(np.uint8)),
               "centres": torch.from_numpy(levels[used].astype(np.float16))}
    return LayerCode("acqe", bits, tuple(weight.shape), tensors)


def _acqe_indices(code: LayerCode) -> np.ndarray:
    lengths, centres = code.tensors["lengths"].numpy(), code.tensors["centres"]
    if lengths.shape != centres.shape:
        raise ValueError("acqe code table and levels differ in length")
    return huffman_decode(code.tensors["stream"].numpy(), lengths, code.numel).astype(np.uint8)


def huffman_lengths(counts: np.ndarray, limit: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths (0 for a count of 0), at most ``limit`` bits: counts are halved until they fit."""
    counts = np.asarray(counts, dtype=np.int64)
    symbols = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(symbols) == 1:
        lengths[symbols] = 1  # one symbol still needs one bit per occurrence to be countable
        return lengths
    while True:
        heap = [(int(counts[s]), int(s), [int(s)]) for s in symbols]  # (weight, tie-break, leaves)
        heapq.heapify(heap)
        lengths[:] = 0
        while len(heap) > 1:
            wa, ta, a = heapq.heappop(heap)
            wb, tb, b = heapq.heappop(heap)
            lengths[a + b] += 1  # every leaf under the merged node sinks one level
            heapq.heappush(heap, (wa + wb, min(ta, tb), a + b))
        if lengths.max() <= limit:
            return lengths
        counts = np.where(counts > 0, np.maximum(counts >> 1, 1), 0)  # flatter counts, shallower tree


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol (by length, then symbol): only the lengths need storing."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - previous
        codes[s], previous = code, int(lengths[s])
        code += 1
    return codes


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``symbols`` as one canonical Huffman bit stream, packed MSB first into bytes (zero padding at the end)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    size, code = lengths[symbols], codes[symbols]
    if (size == 0).any():
        raise ValueError("a symbol to encode has no code")
    start = np.cumsum(size) - size
    bits = np.zeros(int(size.sum()), dtype=np.uint8)
    for j in range(int(size.max(initial=0))):  # bit j of every code at once
        has = size > j
        bits[start[has] + j] = (code[has] >> (size[has] - 1 - j)) & 1
    return np.packbits(bits)


def huffman_decode(stream: np.ndarray, lengths: np.ndarray, count: int) -> np.ndarray:
    """Inverse of ``huffman_encode``: the first ``count`` symbols; a stream that does not decode raises ValueError.

    Vectorised: a lookup table gives the symbol and code length starting at every bit position, then the
    positions where symbols start are found by pointer doubling (log2(count) gathers, no per-symbol Python loop).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if lengths.max(initial=0) < 1 or lengths.max() > MAX_CODE_LENGTH or (lengths < 0).any():
        raise ValueError("bad Huffman code lengths")
    width = int(lengths.max())
    codes = canonical_codes(lengths)
    table_symbol = np.zeros(2 ** width, dtype=np.int64)
    table_length = np.zeros(2 ** width, dtype=np.int64)  # 0: no code starts with these bits
    for s in np.flatnonzero(lengths):
        first, span = int(codes[s]) << (width - lengths[s]), 1 << (width - lengths[s])
        if first + span > 2 ** width:
            raise ValueError("bad Huffman code lengths (not a prefix code)")
        table_symbol[first:first + span], table_length[first:first + span] = s, lengths[s]
    total = len(stream) * 8
    bits = np.concatenate([np.unpackbits(stream), np.zeros(width, dtype=np.uint8)]).astype(np.int64)
    window = np.zeros(total, dtype=np.int64)
    for j in range(width):  # the next `width` bits at every position, as an integer
        window = (window << 1) | bits[j:j + total]
    step = table_length[window]
    jump = np.append(np.minimum(np.arange(total) + np.maximum(step, 1), total), total)  # `total`: past the end
    starts, power = np.zeros(1, dtype=np.int64), jump
    while len(starts) < count:  # starts of symbols m..2m-1 are jump^m applied to those of 0..m-1
        starts = np.concatenate([starts, power[starts]])
        power = power[power]
    starts = starts[:count]
    if (starts >= total).any() or (step[starts] == 0).any() or starts[-1] + step[starts[-1]] > total:
        raise ValueError("Huffman stream is truncated or corrupted")
    return table_symbol[window[starts]]
