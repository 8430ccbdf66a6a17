#!/usr/bin/env python
"""Train the embedded text-conditioned ``fmnist-sd3`` (CPU, resumable, logged to MLflow), in two phases:

    python scripts/train_fmnist_sd3.py --phase vae --max-minutes 20     # the AutoencoderKL, then the latents' stats
    python scripts/train_fmnist_sd3.py --phase flow --max-minutes 150   # run or resume: transformer + text encoders
    python scripts/train_fmnist_sd3.py --phase export                   # ship the current EMA weights

``vae``: a KL autoencoder (reconstruction MSE + ``--kl-weight`` x KL) from 28x28 pixels to 4x14x14 latents; SD3's
``shift_factor`` and ``scaling_factor`` come from the training latents' mean and std; the posterior of every
training image is cached for the next phase. ``flow``: rectified flow on those latents (SD3's recipe: logit-normal
noise levels, the velocity ``noise - latent`` as target), the transformer and both CLIP text encoders trained
together, an EMA of all three. Each image's prompt is its class word in a random training template
(``fmnist_sd3.TRAIN_TEMPLATES``), replaced by "" for ``PROMPT_DROPOUT`` of them (the unconditional branch) and given
one filler word for ``FILLER_RATE``.

SD3's pipeline appends ``max_sequence_length`` zero rows (the absent T5 stream, 256 by default) to the CLIP tokens.
Identical rows stay identical through every block, so n of them act as one row whose attention logit is raised by
log n: training draws n per image (0, 256 or uniform in 1..256) and runs one such row, so the model serves the
pipeline's default and ``max_sequence_length=0`` (what cqpolicy samples with: 256 fewer tokens a call) alike.

Checkpoints (``--ckpt-dir``, default ``checkpoints/fmnist-sd3``, outside git) are written atomically every
``--save-minutes``; the exported pipeline (EMA weights, fp16 safetensors, diffusers ``save_pretrained`` layout, and
``training.json``: the step and minutes they come from) goes to the package's ``fmnist-sd3`` folder, or
``--export-dir``, at the same times. Without a checkpoint (another machine, a lost folder) the flow phase starts from
those shipped weights at their step, with a fresh optimizer.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cqpolicy.data import load_fashion_mnist
from cqpolicy.models import fmnist_sd3
from cqpolicy.models.training import atomic_save, learning_rate
from cqpolicy.tracking import start_run

ZERO_ROWS = 256  # StableDiffusion3Pipeline's default max_sequence_length: the zero rows of a missing T5
LATENTS = "latents.safetensors"  # the training set's posteriors, in the checkpoint folder
PROGRESS = "training.json"  # beside the shipped weights: the step and minutes they come from


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("vae", "flow", "export"), required=True)
    p.add_argument("--ckpt-dir", default="checkpoints/fmnist-sd3")
    p.add_argument("--export-dir", default=None, help="default: the package's fmnist-sd3 folder")
    p.add_argument("--max-minutes", type=float, default=150.0, help="stop (and save) after this long")
    p.add_argument("--max-steps", type=int, default=None, help="default: 2,000 (vae), 30,000 (flow)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (vae), 3e-4 (flow)")
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--decay-from", type=int, default=None,
                   help="cosine-decay the learning rate from this step to --lr-final at --max-steps")
    p.add_argument("--lr-final", type=float, default=3e-5)
    p.add_argument("--kl-weight", type=float, default=1e-4, help="vae: weight of the KL term")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--save-minutes", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    defaults = {"vae": (2_000, 1e-3), "flow": (30_000, 3e-4), "export": (0, 0.0)}[args.phase]
    args.max_steps = defaults[0] if args.max_steps is None else args.max_steps
    args.lr = defaults[1] if args.lr is None else args.lr
    return args


def pixels(split: str):
    images, labels = load_fashion_mnist(split)
    return torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1), torch.from_numpy(labels).long()


class _Trainer:
    """A resumable loop: ``modules`` (name -> module) trained by ``loss(step, gen)``, an EMA of each."""

    def __init__(self, args, name: str, modules: dict, ckpt: Path):
        self.args, self.name, self.ckpt = args, name, ckpt
        self.modules = torch.nn.ModuleDict(modules)
        self.ema = copy.deepcopy(self.modules).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.modules.parameters(), lr=args.lr, weight_decay=0.0)
        self.step, self.run_id, self.elapsed = 0, None, 0.0
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=True)
            self.modules.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["opt"])
            self.step, self.run_id, self.elapsed = int(state["step"]), state.get("run_id"), float(state["elapsed"])
            torch.set_rng_state(state["rng"])
            print(f"resumed {name} from {ckpt} at step {self.step}")

    def save(self):
        atomic_save(dict(model=self.modules.state_dict(), ema=self.ema.state_dict(), opt=self.opt.state_dict(),
                         step=self.step, run_id=self.run_id, elapsed=self.elapsed, rng=torch.get_rng_state()),
                    self.ckpt)

    def run(self, loss_fn, on_save=None) -> None:
        args = self.args
        with start_run("fmnist-sd3-training", run_id=self.run_id, run_name=f"train-fmnist-sd3-{self.name}") as run:
            import mlflow

            if self.run_id is None:
                mlflow.log_params({**vars(args), "n_params": sum(p.numel() for p in self.modules.parameters())})
            self.run_id = run.info.run_id
            gen = torch.Generator().manual_seed(args.seed + self.step)  # a resumed run: fresh, reproducible batches
            start = last_save = time.time()
            elapsed_before = self.elapsed
            self.modules.train()
            losses = []
            bar = tqdm(total=args.max_steps, initial=self.step, desc=f"train fmnist-sd3 {self.name}",
                       dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 60)
            while self.step < args.max_steps and time.time() - start < args.max_minutes * 60:
                loss = loss_fn(self.step, gen)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 1.0)
                for group in self.opt.param_groups:
                    group["lr"] = learning_rate(args, self.step)
                self.opt.step()
                self.step += 1
                decay = min(args.ema_decay, (1 + self.step) / (10 + self.step))
                with torch.no_grad():
                    for pe, pm in zip(self.ema.parameters(), self.modules.parameters()):
                        pe.lerp_(pm, 1 - decay)
                losses.append(loss.item())
                bar.update(1)
                if self.step % 100 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses):.4f}")
                    mlflow.log_metric("loss", float(np.mean(losses)), step=self.step)
                    losses.clear()
                if time.time() - last_save > args.save_minutes * 60:
                    self.elapsed = elapsed_before + time.time() - start
                    self.save()
                    if on_save is not None:
                        on_save()
                    last_save = time.time()
            bar.close()
            self.elapsed = elapsed_before + time.time() - start
            self.save()
            mlflow.log_metrics({"train_hours": self.elapsed / 3600, "final_step": self.step}, step=self.step)
        print(f"{self.name}: step {self.step}, {self.elapsed / 60:.1f} min in all")


# -- phase 1: the autoencoder -------------------------------------------------------------------------------------
def train_vae(args, ckpt_dir: Path, export_dir: Path) -> None:
    x_all, _ = pixels("train")
    trainer = _Trainer(args, "vae", {"vae": fmnist_sd3.build_vae()}, ckpt_dir / "vae.pt")
    vae = trainer.modules["vae"]

    def loss_fn(step, gen):
        x = x_all[torch.randint(0, len(x_all), (args.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        return F.mse_loss(recon, x) + args.kl_weight * posterior.kl().mean() / z[0].numel()

    trainer.run(loss_fn)
    if trainer.step >= args.max_steps:
        finish_vae(trainer.ema["vae"], x_all, ckpt_dir, export_dir)


@torch.no_grad()
def finish_vae(vae, x_all, ckpt_dir: Path, export_dir: Path) -> None:
    """The EMA rounded to the fp16 it ships in; SD3's latent normalisation from the training posteriors' means; the
    VAE shipped into ``export_dir/vae`` (so the flow phase, and a later session, start from what ships) and the
    posteriors cached for phase 2."""
    vae = vae.half().float().eval()
    mean, std = encode_training_set(vae, x_all)
    vae.register_to_config(shift_factor=float(mean.mean()), scaling_factor=float(1.0 / mean.std()))
    export_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(export_dir / "vae", ignore_errors=True)
    copy.deepcopy(vae).half().save_pretrained(export_dir / "vae")
    fid = reconstruction_fid(vae)
    import mlflow

    with start_run("fmnist-sd3-training", run_name="fmnist-sd3-vae-reconstruction"):
        mlflow.log_metrics({**fid, "shift_factor": vae.config.shift_factor,
                            "scaling_factor": vae.config.scaling_factor})
    print(f"vae: classifier FID of the test images reconstructed (the floor under samples' FID): {fid}")
    cache_latents(ckpt_dir, mean, std)
    print(f"vae: shift {vae.config.shift_factor:.4f}, scale {vae.config.scaling_factor:.4f}; shipped to "
          f"{export_dir / 'vae'}, latents cached")


@torch.no_grad()
def encode_training_set(vae, x_all) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds of every training image."""
    means, stds = [], []
    for start in tqdm(range(0, len(x_all), 500), desc="encode the training set"):
        posterior = vae.encode(x_all[start:start + 500]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def cache_latents(ckpt_dir: Path, mean: torch.Tensor, std: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"mean": mean.half().contiguous(), "std": std.half().contiguous()}, str(ckpt_dir / LATENTS))


@torch.no_grad()
def reconstruction_fid(vae) -> dict:
    """FID (shipped classifier's features, against the real test set) of the first 1,000 and of all 10,000 real test
    images after encode -> posterior mean -> decode: the floor under any sample's FID at that N."""
    from cqpolicy.evaluation.quality import ClassifierFID, images_to_uint8

    x, _ = pixels("test")
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 500]).latent_dist.mean).sample for i in range(0, len(x), 500)])
    recon = images_to_uint8(recon)
    return {f"reconstruction_fid_{n}": float(ClassifierFID()(recon[:n])) for n in (1000, 10000)}


# -- phase 2: rectified flow --------------------------------------------------------------------------------------
class ZeroRowsAttnProcessor:
    """SD3's joint attention (``JointAttnProcessor2_0``) with an additive key bias ``attention_mask``, which the
    stock processor ignores: log n on the one zero row that stands for n identical ones, -inf for n = 0."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x, norm):
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return x if norm is None else norm(x)

        q = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                       heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        k = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                       heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        v = torch.cat([heads(attn.to_v(hidden_states), None), heads(attn.add_v_proj(encoder_hidden_states), None)],
                      dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask).transpose(1, 2).flatten(2)
        image, context = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def encode(text_encoders, ids: torch.Tensor):
    """What ``StableDiffusion3Pipeline.encode_prompt`` computes from CLIP token ids (no T5, no zero rows): the two
    encoders' penultimate hidden states side by side, and their pooled projections side by side."""
    hidden, pooled = [], []
    for encoder in text_encoders:
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    return torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)


def training_prompts(labels: torch.Tensor, gen: torch.Generator) -> list[str]:
    """A random training template per class label; some empty (unconditional), some with one filler word."""
    fillers = fmnist_sd3.filler_words()
    texts = []
    for label in labels.tolist():
        u = torch.rand(3, generator=gen).tolist()
        if u[0] < fmnist_sd3.PROMPT_DROPOUT:
            texts.append("")
            continue
        template = fmnist_sd3.TRAIN_TEMPLATES[int(u[1] * len(fmnist_sd3.TRAIN_TEMPLATES))]
        words = template.format("{}").split(" ")  # the class name stays one piece: no filler inside "ankle boot"
        words = [w.format(fmnist_sd3.CLASS_WORDS[label]) for w in words]
        if u[2] < fmnist_sd3.FILLER_RATE:
            at = int(torch.randint(0, len(words) + 1, (1,), generator=gen))
            words.insert(at, fillers[int(torch.randint(0, len(fillers), (1,), generator=gen))])
        texts.append(" ".join(words))
    return texts


def zero_rows(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Per image, how many zero rows the pipeline would append: 0, 256 (its default) or uniform in 1..256."""
    u = torch.rand(batch, generator=gen)
    uniform = torch.randint(1, ZERO_ROWS + 1, (batch,), generator=gen)
    return torch.where(u < 0.5, 0, torch.where(u < 0.75, ZERO_ROWS, uniform))


def train_flow(args, ckpt_dir: Path, export_dir: Path, export_only: bool = False) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    if not (export_dir / "vae" / "config.json").is_file():
        sys.exit(f"train_fmnist_sd3: error: no trained VAE in {export_dir}: run --phase vae first")
    vae = AutoencoderKL.from_pretrained(export_dir / "vae").float().eval()  # what ships: latents as sampled
    tokenizer = fmnist_sd3.build_tokenizer()
    torch.manual_seed(args.seed)
    modules = {"transformer": fmnist_sd3.build_denoiser(), "text_encoder": fmnist_sd3.build_text_encoder(tokenizer),
               "text_encoder_2": fmnist_sd3.build_text_encoder(tokenizer)}
    trainer = _Trainer(args, "flow", modules, ckpt_dir / "flow.pt")
    if trainer.step == 0 and (export_dir / PROGRESS).is_file():
        resume_from_shipped(trainer, export_dir)

    def ship():
        export(trainer.ema, vae, tokenizer, export_dir)
        (export_dir / PROGRESS).write_text(json.dumps({"step": trainer.step, "minutes": trainer.elapsed / 60,
                                                       "batch_size": args.batch_size}) + "\n")

    if export_only:
        ship()
        print(f"exported the EMA of step {trainer.step}")
        return
    if not (ckpt_dir / LATENTS).is_file():
        cache_latents(ckpt_dir, *encode_training_set(vae, pixels("train")[0]))
    cached = load_file(str(ckpt_dir / LATENTS))
    mean, std = cached["mean"].float(), cached["std"].float()
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    _, labels_all = pixels("train")
    transformer = trainer.modules["transformer"]
    transformer.set_attn_processor(ZeroRowsAttnProcessor())
    encoders = (trainer.modules["text_encoder"], trainer.modules["text_encoder_2"])
    image_tokens = (fmnist_sd3.TRANSFORMER_CONFIG["sample_size"] // fmnist_sd3.TRANSFORMER_CONFIG["patch_size"]) ** 2

    def loss_fn(step, gen):
        idx = torch.randint(0, len(mean), (args.batch_size,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen) - shift) * scale
        ids = tokenizer(training_prompts(labels_all[idx], gen), padding="max_length", truncation=True,
                        max_length=fmnist_sd3.MAX_TOKENS, return_tensors="pt").input_ids
        hidden, pooled = encode(encoders, ids)
        n = zero_rows(len(idx), gen)
        context = torch.cat([hidden, hidden.new_zeros(len(idx), 1, hidden.shape[-1])], dim=1)
        bias = torch.zeros(len(idx), 1, 1, image_tokens + context.shape[1])
        bias[:, 0, 0, -1] = torch.where(n > 0, n.float().clamp_min(1).log(), torch.tensor(-math.inf))
        sigma = torch.sigmoid(torch.randn(len(idx), generator=gen))  # logit-normal noise levels (SD3)
        noise = torch.randn(z.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        pred = transformer(hidden_states=(1 - s) * z + s * noise, encoder_hidden_states=context,
                           pooled_projections=pooled, timestep=sigma * 1000,
                           joint_attention_kwargs={"attention_mask": bias}).sample
        return F.mse_loss(pred, noise - z)

    trainer.run(loss_fn, on_save=ship)
    ship()


def resume_from_shipped(trainer: "_Trainer", export_dir: Path) -> None:
    """No checkpoint (another machine, a lost folder): start from the shipped EMA weights, model and EMA alike, at
    the step they record; the optimizer starts afresh."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    shipped = {"transformer": SD3Transformer2DModel.from_pretrained(export_dir / "transformer"),
               "text_encoder": CLIPTextModelWithProjection.from_pretrained(export_dir / "text_encoder"),
               "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(export_dir / "text_encoder_2")}
    for name, module in shipped.items():
        state = {k: v.float() for k, v in module.state_dict().items()}
        trainer.modules[name].load_state_dict(state)
        trainer.ema[name].load_state_dict(state)
    progress = json.loads((export_dir / PROGRESS).read_text())
    trainer.step, trainer.elapsed = int(progress["step"]), float(progress["minutes"]) * 60
    print(f"no checkpoint: starting from the shipped weights of step {trainer.step} in {export_dir}")


def export(ema, vae, tokenizer, export_dir: Path) -> None:
    """The EMA pipeline in fp16, diffusers layout, written to a temporary folder and then moved into place."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    parts = copy.deepcopy(ema).to(torch.float16)
    parts["transformer"].set_attn_processor(JointAttnProcessor2_0())  # the stock one: nothing of training ships
    # a VAE rebuilt from its config: one loaded from disk would ship the folder it came from (_name_or_path)
    shipped_vae = type(vae).from_config({k: v for k, v in vae.config.items() if not k.startswith("_")})
    shipped_vae.load_state_dict(vae.state_dict())
    pipe = fmnist_sd3.build_pipeline(parts["transformer"], shipped_vae.to(torch.float16), tokenizer,
                                     parts["text_encoder"], parts["text_encoder_2"])
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ckpt_dir, export_dir = Path(args.ckpt_dir), Path(args.export_dir or fmnist_sd3.SHIPPED_DIR)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if args.phase == "vae":
        train_vae(args, ckpt_dir, export_dir)
    else:
        train_flow(args, ckpt_dir, export_dir, export_only=args.phase == "export")


if __name__ == "__main__":
    main()
