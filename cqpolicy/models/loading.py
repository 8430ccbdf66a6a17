"""Load a diffusers denoiser of a family some adapter claims, by embedded name, local directory or hub id.

Accepted specs:
* ``fmnist-dit`` / ``fmnist-unet`` / ``fmnist-sd3``: the embedded Fashion-MNIST DiT, UNet and text-conditioned SD3
  (its training prompts unless ``prompts`` says otherwise) shipped inside this package;
* a directory holding a pipeline (``model_index.json``) or its folders: ``transformer/`` or ``unet/`` (+
  ``scheduler/``, optional ``vae/``, and the text encoders of a text-conditioned pipeline), or a bare model
  (``config.json``); the model class comes from its config's ``_class_name`` and must be one
  ``cqpolicy.models.adapters`` supports;
* a hub id such as ``facebook/DiT-XL-2-256``, read from the local Hugging Face cache only.

A denoiser folder holding ``quantization.json`` (``cqpolicy quantize``) loads through
``cqpolicy.quantization.storage.load_quantized``: weights dequantised on the fly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cqpolicy import defaults
from cqpolicy.models import fmnist_dit, fmnist_sd3, fmnist_unet
from cqpolicy.models.adapters import ModelAdapter, NoCacheUnitsError, adapter_for
from cqpolicy.models.prompts import Prompts

EMBEDDED = {m.NAME: m for m in (fmnist_dit, fmnist_unet, fmnist_sd3)}  # name -> its module (weights in SHIPPED_DIR)


class ModelLoadError(ValueError):
    """A model spec that names nothing we can load."""


@dataclass
class LoadedModel:
    """A denoiser with what the sampler needs to drive it."""

    name: str
    transformer: torch.nn.Module
    scheduler_config: dict
    vae: torch.nn.Module | None = None
    default_guidance_scale: float = defaults.GUIDANCE_SCALE
    extra: dict = field(default_factory=dict)
    root: Path | None = None  # the pipeline folder (its text encoders encode prompts)
    prompts: Prompts | None = None  # a text-conditioned model's prompt table (``use_prompts``)
    latent_size: tuple[int, int] | None = None  # latent height and width, when not the model's default

    @property
    def config(self):
        return self.transformer.config

    @property
    def adapter(self) -> ModelAdapter:
        return adapter_for(self.transformer)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        shape = self.adapter.latent_shape(self.transformer)
        return shape if self.latent_size is None else (shape[0], *self.latent_size)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The decoded images' shape (channels, height, width): the latents' where there is no VAE."""
        shape = self.latent_shape
        if self.vae is None:
            return shape
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.out_channels, shape[1] * scale, shape[2] * scale)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model; prompts of a text-conditioned one (its "labels" are prompt ids)."""
        if self.adapter.text_conditioned and self.prompts is not None:
            return len(self.prompts)
        return self.adapter.num_classes(self.transformer)

    def set_resolution(self, pixels: int) -> None:
        """Sample images of ``pixels`` a side: latents of ``pixels`` over the VAE's downsampling factor."""
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        if pixels < 1 or pixels % scale:
            raise ModelLoadError(f"--resolution must be a positive multiple of {scale} (the VAE's factor), got "
                                 f"{pixels}")
        self.latent_size = (pixels // scale, pixels // scale)

    def condition(self, labels: torch.Tensor):
        """The model's condition for class labels, or for prompt ids (a dict of prompt-embedding rows)."""
        if not self.adapter.text_conditioned:
            return labels
        if self.prompts is None:
            self.adapter.num_classes(self.transformer)  # the one-line error that asks for prompts
        return self.prompts.take(labels.cpu())

    def null_condition(self, cond, rows: int):
        """The unconditional branch's condition, ``rows`` rows."""
        if self.adapter.text_conditioned:
            return self.prompts.null_rows(rows)
        return self.adapter.null_condition(self.transformer, cond)

    def use_prompts(self, prompts: "Prompts | list[str] | str | Path", negative: str = "") -> "LoadedModel":
        """Set the prompt table: a ``Prompts``, a list of texts or a prompt file (encoded by the pipeline's own text
        encoders, with ``negative`` as the unconditional prompt), or a ``.safetensors`` embeddings file."""
        from cqpolicy.models.prompts import PromptError, encode_prompts, read_prompt_file

        if not self.adapter.text_conditioned:
            raise PromptError(f"{self.name} ({self.adapter.model_class}) is not conditioned on prompts")
        if isinstance(prompts, (str, Path)) and str(prompts).endswith(".safetensors"):
            prompts = Prompts.load(prompts)
        elif isinstance(prompts, (str, Path)):
            prompts = read_prompt_file(prompts)
        if not isinstance(prompts, Prompts):
            prompts = encode_prompts(self.text_pipeline(), self.adapter, list(prompts), negative,
                                     **self.extra.get("prompt_options", {}))
        self.prompts = prompts.to(self.device, self.dtype)
        return self

    def text_pipeline(self):
        """The model's diffusers pipeline with its text encoders, loaded from its folder around this denoiser."""
        import diffusers

        from cqpolicy.models.prompts import PromptError

        if self.root is None or not (self.root / "model_index.json").is_file():
            raise PromptError(f"{self.name} has no pipeline folder with text encoders: give prompt embeddings "
                              f"(--prompt-embeds FILE.safetensors) instead of prompts")
        from cqpolicy.outputs import read_json

        index = read_json(self.root / "model_index.json", ModelLoadError, f"{self.root}/model_index.json is not JSON")
        if any(not isinstance(index.get(k), list) or None in index[k] for k in ("text_encoder", "tokenizer")):
            raise PromptError(f"{self.root} holds no text encoder and tokenizer: give prompt embeddings "
                              f"(--prompts FILE.safetensors) instead of prompt texts")
        folder = _denoiser_folder(self.root).name
        # parts saved as absent (SD3 without T5: text_encoder_3 = None) are passed as None, as diffusers asks
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
        return diffusers.DiffusionPipeline.from_pretrained(
            self.root, **absent, **{folder: self.transformer, "vae": self.vae}, dtype=self.dtype).to(self.device)

    @property
    def null_class(self) -> int:
        return int(self.adapter.null_condition(self.transformer, torch.zeros(1, dtype=torch.long))[0])

    @property
    def learned_sigma(self) -> bool:
        return self.config.out_channels == 2 * self.config.in_channels

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device


DENOISER_FOLDERS = ("transformer", "unet")


def _denoiser(folder: Path, dtype) -> torch.nn.Module:
    """The diffusers model saved in ``folder``, of the class its config names, if an adapter claims that class."""
    import diffusers

    from cqpolicy.outputs import read_json

    config = read_json(folder / "config.json", ModelLoadError, f"{folder} holds no config.json")
    name = config.get("_class_name") if isinstance(config, dict) else None
    try:
        adapter_for(str(name))
    except NoCacheUnitsError as exc:
        raise ModelLoadError(f"{folder}: {exc}") from None
    if (folder / "quantization.json").exists():  # written by ``cqpolicy quantize``: packed weights, not diffusers'
        from cqpolicy.quantization.storage import load_quantized

        return load_quantized(folder, getattr(diffusers, name), dtype)
    return getattr(diffusers, name).from_pretrained(folder, dtype=dtype)


def _denoiser_folder(root: Path) -> Path | None:
    """A pipeline folder's ``transformer/`` or ``unet/`` (the first holding a config), or None."""
    return next((root / f for f in DENOISER_FOLDERS if (root / f / "config.json").is_file()), None)


def _load_components(root: Path, name: str, dtype) -> LoadedModel:
    """A pipeline folder: the denoiser (``transformer/`` or ``unet/``), the scheduler config, the VAE if any."""
    from diffusers import AutoencoderKL, DDIMScheduler

    folder = _denoiser_folder(root)
    if (root / "scheduler").is_dir():
        scheduler_config = dict(DDIMScheduler.load_config(root / "scheduler"))
    else:
        scheduler_config = dict(fmnist_dit.SCHEDULER_CONFIG)
    vae = AutoencoderKL.from_pretrained(root / "vae", dtype=dtype) if (root / "vae").is_dir() else None
    model = LoadedModel(name, _denoiser(folder, dtype), scheduler_config, vae, root=root)
    guidance = _pipeline_default(root, "guidance_scale")
    if guidance is not None:
        model.default_guidance_scale = float(guidance)
    return model


def pipeline_default(pipeline_class, argument: str):
    """The default of ``argument`` in a diffusers pipeline class's ``__call__`` (None: no such argument / default)."""
    import inspect

    parameter = inspect.signature(pipeline_class.__call__).parameters.get(argument)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _pipeline_default(root: Path, argument: str):
    """``pipeline_default`` of the pipeline class ``root/model_index.json`` names."""
    import diffusers

    from cqpolicy.outputs import read_json

    if not (root / "model_index.json").is_file():
        return None
    index = read_json(root / "model_index.json", ModelLoadError, f"{root}/model_index.json is not JSON")
    cls = getattr(diffusers, str(index.get("_class_name")), None) if isinstance(index, dict) else None
    return None if cls is None else pipeline_default(cls, argument)


def load_model(spec: str = fmnist_dit.NAME, dtype: torch.dtype = torch.float32, device: str = "cpu",
               prompts=None, negative_prompt: str = "", resolution: int | None = None) -> LoadedModel:
    """Load ``spec`` (see module doc) in ``dtype`` onto ``device``, in eval mode; a text-conditioned model with
    ``prompts`` (``LoadedModel.use_prompts``); images of ``resolution`` pixels a side (None: the model's)."""
    path = Path(spec)
    if spec in EMBEDDED:
        embedded = EMBEDDED[spec]
        root = embedded.SHIPPED_DIR
        if not (root / embedded.FOLDER / "config.json").is_file():
            train = getattr(embedded, "TRAIN_COMMAND", f"scripts/train_fmnist.py --model {spec}")
            raise ModelLoadError(f"the weights of embedded model {spec!r} are missing from {root}; "
                                 f"reinstall cqpolicy or train them with {train}")
        model = _load_components(root, spec, dtype)
        model.default_guidance_scale = embedded.DEFAULT_GUIDANCE_SCALE
        model.extra["prompt_options"] = dict(getattr(embedded, "PROMPT_OPTIONS", {}))
        if prompts is None and hasattr(embedded, "prompts"):
            prompts = embedded.prompts()  # a text-conditioned embedded model: its training prompts, class i % 10
    elif path.is_dir():
        if _denoiser_folder(path) is not None:
            model = _load_components(path, str(path), dtype)
        elif (path / "config.json").is_file():
            model = LoadedModel(str(path), _denoiser(path, dtype), dict(fmnist_dit.SCHEDULER_CONFIG))
        else:
            raise ModelLoadError(f"{path} holds no diffusers model (no {'/ or '.join(DENOISER_FOLDERS)}/ folder "
                                 f"or config.json)")
    elif "/" in spec and not path.exists() and not spec.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(spec, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types
            raise ModelLoadError(f"hub model {spec!r} is not in the local Hugging Face cache and nothing can be "
                                 f"downloaded here ({type(exc).__name__})") from exc
        if _denoiser_folder(root) is None:
            raise ModelLoadError(f"hub model {spec!r} has no {' or '.join(DENOISER_FOLDERS)} folder")
        model = _load_components(root, spec, dtype)
    else:
        known = ", ".join(sorted(EMBEDDED))
        raise ModelLoadError(f"unknown model {spec!r}: use an embedded name ({known}), a local diffusers "
                             f"directory or a cached hub id")
    if model.adapter.guidance(model.transformer) == "none":
        model.default_guidance_scale = 1.0  # nothing to guide with (an unconditional model, FLUX.1-schnell)
    model.transformer.to(device).eval().requires_grad_(False)
    if model.vae is not None:
        model.vae.to(device).eval().requires_grad_(False)
    if resolution is not None:
        model.set_resolution(resolution)
    if prompts is not None:
        model.use_prompts(prompts, negative_prompt)
    return model
