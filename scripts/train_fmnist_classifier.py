#!/usr/bin/env python
"""Train the shipped Fashion-MNIST classifier (FID feature extractor) and its reference statistics.

    python scripts/train_fmnist_classifier.py

Writes ``cqpolicy/evaluation/fmnist-classifier/``: ``model.safetensors``, ``reference_stats.safetensors``
(mean and covariance, float64, of the 128-d features of the 10k real test images) and ``info.json``
(test accuracy and the real-vs-real FID floor: random train subsets of several sizes against the test set).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cqpolicy.data import load_fashion_mnist
from cqpolicy.evaluation.classifier import KID_REFERENCE_FILE, KID_REFERENCE_SIZE, SHIPPED_DIR, FashionClassifier
from cqpolicy.evaluation.quality import feature_stats, fid_from_stats
from cqpolicy.tracking import start_run


def batched_features(model, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)]).double()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(SHIPPED_DIR))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_x, train_y = (torch.from_numpy(a) for a in load_fashion_mnist("train"))
    test_x, test_y = (torch.from_numpy(a) for a in load_fashion_mnist("test"))
    train_x, test_x = train_x.unsqueeze(1), test_x.unsqueeze(1)

    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = len(train_x) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    with start_run("fmnist-classifier", run_name="train-fmnist-classifier") as _:
        import mlflow
        mlflow.log_params(vars(args))
        for epoch in range(args.epochs):
            model.train()
            perm = torch.randperm(len(train_x), generator=gen)
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True)
            for i in bar:
                idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
                loss = F.cross_entropy(model.classify(train_x[idx]), train_y[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if i % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            model.eval()
            with torch.no_grad():
                acc = float((torch.cat([model.classify(test_x[i:i + 1000]).argmax(1) for i in range(0, 10000, 1000)])
                             == test_y).float().mean())
            print(f"epoch {epoch + 1}: test accuracy {acc:.4f}")
            mlflow.log_metric("test_accuracy", acc, step=epoch + 1)

        test_feats = batched_features(model, test_x)
        mean, cov = feature_stats(test_feats)
        # Real-vs-real floor: disjoint random train subsets against the test statistics.
        floor = {}
        rng = np.random.default_rng(args.seed)
        for n in (1000, 5000, 10000):
            values = []
            for _ in range(3):
                idx = torch.from_numpy(rng.choice(len(train_x), size=n, replace=False))
                m, c = feature_stats(batched_features(model, train_x[idx]))
                values.append(fid_from_stats(m, c, mean, cov))
            floor[str(n)] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
            print(f"real-vs-real FID, {n} train images vs 10k test: {np.mean(values):.3f} ± {np.std(values):.3f}")
            mlflow.log_metric(f"real_vs_real_fid_{n}", float(np.mean(values)))

        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        save_file({"mean": mean, "cov": cov, "num_samples": torch.tensor(len(test_feats), dtype=torch.int64)},
                  tmp / "reference_stats.safetensors")
        save_file({"features": test_feats[:KID_REFERENCE_SIZE].float().contiguous()}, tmp / KID_REFERENCE_FILE)
        info = {"test_accuracy": acc, "num_features": FashionClassifier.num_features,
                "reference": "Fashion-MNIST test split (10000 images)", "real_vs_real_fid": floor,
                "seed": args.seed, "epochs": args.epochs}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        mlflow.log_dict(info, "info.json")
        print(f"wrote {out} (test accuracy {acc:.4f})")


if __name__ == "__main__":
    main()
