#!/usr/bin/env python
"""Train an embedded model (``fmnist-dit``, ``fmnist-unet``) on Fashion-MNIST (CPU, resumable, logged to MLflow).

    python scripts/train_fmnist.py --model fmnist-unet --max-minutes 110   # run or resume
    python scripts/train_fmnist.py --model fmnist-unet --export-only       # ship the current EMA weights

Checkpoints (model, EMA, optimizer, step, MLflow run id) go to ``--ckpt-dir`` (kept out of git) and
are written atomically every ``--save-minutes``. With no checkpoint, training starts from ``--init-dir``
(default: the shipped weights) if it exists, so an interrupted run that only shipped weights can go on.
The exported model is the EMA in fp16, diffusers ``save_pretrained`` layout, with the scheduler config.
Classifier-free guidance training: a share of labels becomes the null class (the DiT's label embedding does
it itself; for the UNet this script does it, ``LABEL_DROPOUT`` of the model's module).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cqpolicy.data import load_fashion_mnist
from cqpolicy.models import EMBEDDED
from cqpolicy.models.training import atomic_save, learning_rate
from cqpolicy.tracking import start_run


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-dit", choices=("fmnist-dit", "fmnist-unet"),
                   help="fmnist-sd3 trains with scripts/train_fmnist_sd3.py")
    p.add_argument("--ckpt-dir", default=None, help="default: checkpoints/<model>")
    p.add_argument("--export-dir", default=None, help="default: the package's folder of the model")
    p.add_argument("--init-dir", default=None,
                   help="with no checkpoint, start from these weights (default: the shipped ones) if they exist")
    p.add_argument("--max-minutes", type=float, default=150.0, help="stop (and save) after this long")
    p.add_argument("--max-steps", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--decay-from", type=int, default=None,
                   help="cosine-decay the learning rate from this step to --lr-final at --max-steps "
                        "(a resumed run sets it to the step it resumes at)")
    p.add_argument("--lr-final", type=float, default=3e-5)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--save-minutes", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--export-only", action="store_true")
    return p.parse_args()


def export(ema, embedded, export_dir: Path):
    """Write fp16 EMA weights + scheduler config in diffusers layout, atomically per folder."""
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    half = copy.deepcopy(ema).to(torch.float16)
    half.save_pretrained(tmp / embedded.FOLDER, safe_serialization=True)
    embedded.build_scheduler().save_pretrained(tmp / "scheduler")
    if export_dir.exists():
        import shutil
        shutil.rmtree(export_dir)
    os.replace(tmp, export_dir)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    embedded = EMBEDDED[args.model]
    ckpt_dir = Path(args.ckpt_dir or f"checkpoints/{args.model}")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "last.pt"
    export_dir = Path(args.export_dir or embedded.SHIPPED_DIR)
    init_dir = Path(args.init_dir or embedded.SHIPPED_DIR)

    torch.manual_seed(args.seed)
    model = embedded.build_denoiser()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, run_id, elapsed_total = 0, None, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, run_id = int(state["step"]), state.get("run_id") or None
        elapsed_total = float(state.get("elapsed", 0.0))
        torch.set_rng_state(state["rng"])
        print(f"resumed from {ckpt_path} at step {step}")
    elif (init_dir / embedded.FOLDER).exists():
        shipped = type(model).from_pretrained(init_dir / embedded.FOLDER).float()
        model.load_state_dict(shipped.state_dict())
        ema.load_state_dict(shipped.state_dict())
        print(f"no checkpoint; starting from the weights in {init_dir}")

    if args.export_only:
        export(ema, embedded, export_dir)
        print(f"exported EMA weights (step {step}) to {export_dir}")
        return

    images, labels = load_fashion_mnist("train")
    x_all = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)
    y_all = torch.from_numpy(labels)
    scheduler = embedded.build_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.float()
    n_train_t = scheduler.config.num_train_timesteps

    params = {k: v for k, v in vars(args).items() if k not in ("export_only",)}
    with start_run(f"{args.model}-training", run_id=run_id, run_name=f"train-{args.model}") as run:
        if run_id is None:
            import mlflow
            mlflow.log_params({**params, **{f"model.{k}": v for k, v in model.config.items() if not k.startswith("_")},
                               "n_params": sum(p.numel() for p in model.parameters())})
        run_id = run.info.run_id
        gen = torch.Generator().manual_seed(args.seed + step)  # resume gets fresh but reproducible batches
        start, last_save = time.time(), time.time()
        model.train()
        losses = []
        bar = tqdm(total=args.max_steps, initial=step, desc=f"train {args.model}", dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 60)  # a log file gets a line a minute
        while step < args.max_steps and (time.time() - start) < args.max_minutes * 60:
            idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
            x0, y = x_all[idx], y_all[idx]
            t = torch.randint(0, n_train_t, (args.batch_size,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            if embedded.LABEL_DROPOUT:
                drop = torch.rand(args.batch_size, generator=gen) < embedded.LABEL_DROPOUT
                y = torch.where(drop, embedded.NUM_CLASSES, y)  # the null class
            pred = model(xt, t, class_labels=y).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for g in opt.param_groups:
                g["lr"] = learning_rate(args, step)
            opt.step()
            step += 1
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            losses.append(loss.item())
            bar.update(1)
            if step % 100 == 0:
                mean_loss = float(np.mean(losses))
                losses.clear()
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                import mlflow
                mlflow.log_metric("loss", mean_loss, step=step)
            if time.time() - last_save > args.save_minutes * 60:
                elapsed = elapsed_total + time.time() - start
                atomic_save(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                                 run_id=run_id, elapsed=elapsed, rng=torch.get_rng_state()), ckpt_path)
                export(ema, embedded, export_dir)  # the package always holds the latest EMA, should the run die
                last_save = time.time()
        bar.close()
        elapsed_total += time.time() - start
        atomic_save(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                         run_id=run_id, elapsed=elapsed_total, rng=torch.get_rng_state()), ckpt_path)
        export(ema, embedded, export_dir)
        import mlflow
        mlflow.log_metrics({"train_hours": elapsed_total / 3600, "final_step": step}, step=step)
        print(f"step {step}, {elapsed_total / 60:.1f} min in total; exported EMA to {export_dir}")


if __name__ == "__main__":
    main()
