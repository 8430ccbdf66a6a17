"""Prompts of a text-conditioned model: read from a file, encoded once by the pipeline's own text encoders, or
given as embeddings; the sampler then takes prompt ids where a class-conditional model takes class labels.

A ``Prompts`` table holds, per prompt, the keyword tensors the denoiser takes (the adapter's ``cond_keys``:
T5 / CLIP token embeddings, attention masks, pooled embeddings) and the negative prompt's (the unconditional
branch of classifier-free guidance; an empty negative prompt is the unconditional one). An embeddings file is a
safetensors file with those keys for the rows and ``null.<key>`` for the negative prompt (``Prompts.save``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


class PromptError(ValueError):
    """A prompt file or embeddings file that cannot be used."""


@dataclass
class Prompts:
    texts: list[str]
    rows: dict[str, torch.Tensor]  # key -> [num_prompts, ...]
    null: dict[str, torch.Tensor] | None = None  # key -> [1, ...]; None: no negative prompt (FLUX: no CFG batch)

    def __post_init__(self):
        sizes = {k: v.shape[0] for k, v in self.rows.items()}
        if not self.rows or set(sizes.values()) != {len(self.texts)}:
            raise PromptError(f"prompt embeddings hold {sizes} rows for {len(self.texts)} prompts")

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(ids, dtype=torch.long)
        return {k: v[ids.to(v.device)] for k, v in self.rows.items()}

    def null_rows(self, n: int) -> dict[str, torch.Tensor]:
        if self.null is None:
            raise PromptError("these prompts have no negative prompt: classifier-free guidance is not possible")
        return {k: v.expand(n, *v.shape[1:]) for k, v in self.null.items()}

    def to(self, device=None, dtype=None) -> "Prompts":
        """Floating tensors in ``dtype``, all on ``device`` (masks keep their type)."""
        def move(v):
            return v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        return Prompts(self.texts, {k: move(v) for k, v in self.rows.items()},
                       None if self.null is None else {k: move(v) for k, v in self.null.items()})

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.contiguous().cpu() for k, v in self.rows.items()}
        tensors.update({f"null.{k}": v.contiguous().cpu() for k, v in (self.null or {}).items()})
        save_file(tensors, str(path), metadata={"texts": "\n".join(self.texts)})

    @classmethod
    def load(cls, path: str | Path) -> "Prompts":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise PromptError(f"no prompt embeddings file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                texts_meta = (f.metadata() or {}).get("texts")
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad header
            raise PromptError(f"{path} is not a safetensors file of prompt embeddings ({exc})") from None
        rows = {k: v for k, v in tensors.items() if not k.startswith("null.")}
        null = {k[len("null."):]: v for k, v in tensors.items() if k.startswith("null.")} or None
        if not rows:
            raise PromptError(f"{path} holds no prompt embeddings")
        n = next(iter(rows.values())).shape[0]
        texts = texts_meta.split("\n") if texts_meta is not None else [f"<prompt {i}>" for i in range(n)]
        return cls(texts, rows, null)


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-blank line of a UTF-8 text file; a one-line PromptError for a missing, empty or binary
    file."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"no prompt file at {path}")
    data = path.read_bytes()
    if b"\x00" in data:
        raise PromptError(f"{path} is a binary file, not prompts (one per line)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PromptError(f"{path} is not UTF-8 text (prompts, one per line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"{path} holds no prompts (one per line)")
    return prompts


@torch.no_grad()
def encode_prompts(pipeline, adapter, texts: list[str], negative: str = "", **options) -> Prompts:
    """``texts`` and the ``negative`` prompt encoded once by ``pipeline``'s own ``encode_prompt`` (``options``: more
    of its arguments, e.g. ``max_sequence_length``)."""
    rows, null = adapter.encode_prompts(pipeline, list(texts), negative, **options)
    return Prompts(list(texts), {k: v for k, v in rows.items() if v is not None},
                   None if null is None else {k: v for k, v in null.items() if v is not None})
