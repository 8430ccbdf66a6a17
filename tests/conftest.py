"""Shared fixtures: tiny random diffusers DiTs (as diffusers' own hook tests use) and an isolated MLflow."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import diffusers.utils.logging
import pytest
import torch

# diffusers' log handler keeps the stderr of the moment its logging is first set up: set it up now, on the real
# stderr, not inside a test whose captured stream is closed afterwards (later log lines would fail to print)
diffusers.utils.logging.get_logger("diffusers")


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def module_mlflow_db():
    """One MLflow store for a whole test module (never the project's mlruns/): creating a sqlite store costs
    seconds of fsyncs, so modules with many MLflow-logging tests share one (on tmpfs where there is one).
    Such a module overrides ``isolated_mlflow`` to point ``MLFLOW_TRACKING_URI`` here."""
    folder = tempfile.mkdtemp(prefix="cqpolicy-test-mlflow-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    yield f"sqlite:///{folder}/mlflow.db"
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mlflow_store_at(folder):
    """``MLFLOW_TRACKING_URI`` pointed at a sqlite store in ``folder`` for the block (module-scoped fixtures cannot
    take ``monkeypatch``); the previous value comes back after."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def load_script(name: str, folder: str = "scripts"):
    """``<folder>/<name>.py`` imported as a module (scripts and benchmarks/research are not packages)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_fmnist_dit(num_layers: int = 2, seed: int = 0):
    """fmnist-dit layout (1x28x28, 10 classes, patch 4), but narrow and shallow, randomly initialised."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                  num_layers=num_layers, sample_size=28, patch_size=4, num_embeds_ada_norm=10)
    # adaLN-zero starts as identity blocks; perturb so every block matters in the tests
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_unet(conditional: bool = True, seed: int = 0):
    """A UNet2DModel of the ddpm-cifar10 layout (a plain and an attention level, a mid block), 1x16x16, narrow,
    randomly initialised; conditional: 10 classes plus the CFG null class in its class embedding."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                       num_class_embeds=11 if conditional else None).eval()


def save_with_scheduler(model, root, folder: str = "transformer"):
    """``model`` saved as ``root/<folder>/`` beside the fmnist-dit scheduler in ``root/scheduler/``; returns root."""
    from cqpolicy.models import fmnist_dit

    model.save_pretrained(root / folder)
    fmnist_dit.build_scheduler().save_pretrained(root / "scheduler")
    return root


def dit_pipeline_call(pipe, noise, steps=5):
    """An unmodified DiTPipeline call for classes 1 and 2 (guidance 4) starting from ``noise``."""
    import diffusers.pipelines.dit.pipeline_dit as dit_module

    original = dit_module.randn_tensor
    dit_module.randn_tensor = lambda shape, **kw: noise.clone()
    try:
        return pipe(class_labels=[1, 2], guidance_scale=4.0, num_inference_steps=steps, output_type="pt").images
    finally:
        dit_module.randn_tensor = original


def tiny_sd_pipeline():
    """A StableDiffusionPipeline of the SD layout (cross-attention levels, mid block, VAE), tiny and random, without
    text encoder or tokenizer: it is called with prompt embeddings (12-d, 5 tokens)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_unet_dir(tmp_path):
    """A tiny class-conditional UNet2DModel saved as unet/ + scheduler/ (a DDPM pipeline's layout)."""
    return save_with_scheduler(tiny_unet(), tmp_path / "tiny-unet", "unet")


@pytest.fixture
def tiny_dit_dir(tmp_path):
    """A tiny random fmnist-style DiT saved as transformer/ + scheduler/ (the shipped layout)."""
    return save_with_scheduler(tiny_fmnist_dit(), tmp_path / "tiny-dit")


@pytest.fixture
def tiny_xl_pipeline_dir(tmp_path):
    """A random DiTPipeline of the DiT-XL-2-256 layout: 4 latent channels, learned sigma, patch 2, tiny VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    root = tmp_path / "tiny-xl-pipeline"
    pipe.save_pretrained(root)
    return root


def _tiny_vae(latent_channels: int = 4, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16, **config)


def _perturbed(model, scale: float = 0.02):
    """Zero-initialised gates and projections made to matter (adaLN-zero blocks start as identities)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def tiny_pixart_pipeline():
    """A PixArtAlphaPipeline of the PixArt-α layout (ada_norm_single blocks, cross-attention, learned sigma), tiny
    and random, called with T5-like prompt embeddings (16-d, 6 tokens, with a mask)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae(), transformer=_perturbed(transformer),
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline():
    """A StableDiffusion3Pipeline (MMDiT joint blocks, the last context_pre_only; flow matching, shift 3), tiny and
    random, called with joint (16-d, 5 tokens) and pooled (8-d) prompt embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                        pooled_projection_dim=8, out_channels=4)
    pipe = StableDiffusion3Pipeline(
        transformer=_perturbed(transformer), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(shift_factor=0.0609, scaling_factor=1.5035), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(guidance_embeds: bool = True):
    """A FluxPipeline (dual- then single-stream blocks, packed latents, dynamic shifting; embedded guidance like
    FLUX.1-dev, or none like -schnell), tiny and random, called with T5-like (16-d, 5 tokens) and pooled (8-d)
    prompt embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=[2, 2, 4],
                                         guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_tiny_vae(latent_channels=1, shift_factor=0.1159,
                                                           scaling_factor=0.3611),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=_perturbed(transformer))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip(folder, width: int = 12, max_length: int = 8):
    """A CLIP text encoder and tokenizer, tiny and random, saved under ``folder``: the tokenizer's vocabulary is
    the 256 byte symbols (a word it does not know is spelled out, never an error)."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>",
                                                                                   "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           max_position_embeddings=max_length, bos_token_id=len(vocab) - 2,
                                           eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)).eval()
    return tokenizer, encoder


@pytest.fixture
def tiny_sd_dir(tmp_path):
    """A tiny random StableDiffusionPipeline with its CLIP text encoder and tokenizer, saved as a pipeline folder."""
    pipe = tiny_sd_pipeline()
    pipe.tokenizer, pipe.text_encoder = tiny_clip(tmp_path / "clip")
    pipe.register_modules(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    root = tmp_path / "tiny-sd"
    pipe.save_pretrained(root)
    return root


@pytest.fixture
def tiny_clip_model_dir(tmp_path):
    """A CLIP model (text and vision towers) and its processor, tiny and random, saved as a local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer, text = tiny_clip(tmp_path / "clip-tokenizer")
    config = CLIPConfig(text_config=text.config.to_dict(), projection_dim=8,
                        vision_config=dict(image_size=16, patch_size=8, hidden_size=12, intermediate_size=24,
                                           num_hidden_layers=1, num_attention_heads=2))
    torch.manual_seed(0)
    folder = tmp_path / "clip-model"
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder
