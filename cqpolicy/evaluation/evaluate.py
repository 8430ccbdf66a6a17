"""Measure one sampling setting: images plus quality and cost metrics (DESIGN.md section 4)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cqpolicy.evaluation.cost import PeakMemory, measured_sample
from cqpolicy.evaluation.quality import images_to_uint8
from cqpolicy.models.loading import LoadedModel
from cqpolicy.sampling import SampleSettings


def is_fashion_mnist_like(model: LoadedModel) -> bool:
    """The shipped classifier (accuracy, offline FID) applies to 1x28x28 images of the 10 Fashion-MNIST classes: a
    10-class model, or a text-conditioned one each of whose prompts names one class (``fmnist-sd3``)."""
    labels = torch.arange(model.num_classes) if model.adapter.text_conditioned else torch.arange(1)
    return model.image_shape == (1, 28, 28) and sample_classes(model, labels) is not None


def sample_classes(model: LoadedModel, labels: torch.Tensor) -> torch.Tensor | None:
    """The Fashion-MNIST class of each sample: its class label, or the class its prompt names (prompt ids of a
    text-conditioned model); None where that is not known."""
    if not model.adapter.text_conditioned:
        return labels if model.num_classes == 10 else None
    from cqpolicy.models.fmnist_sd3 import prompt_class

    if model.prompts is None:
        return None
    classes = [prompt_class(model.prompts.texts[i]) for i in labels.tolist()]
    return None if None in classes else torch.tensor(classes)


def default_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num_samples) % num_classes


@dataclass
class Evaluation:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor
    seeds: list[int]
    metrics: dict


def evaluate(model: LoadedModel, settings: SampleSettings, num_samples: int, seed: int,
             policy: str = "none", cache_format: str = "fp16",
             fid: bool = False, count_cost: bool = True, progress: bool = True,
             inception_weights: str | None = None, fid_reference: torch.Tensor | None = None,
             clip_model: str | None = None) -> Evaluation:
    """Sample ``num_samples`` images (sample i: class i mod classes, seed ``seed + i``) under ``policy``
    (a spec string, run in the cache runtime) and measure them; text-conditioned models: sample i takes prompt i
    mod prompts, and ``clip_model`` (a local CLIP folder) adds the CLIP score against those prompts."""
    from cqpolicy.policies import make_policy, spec_string

    settings.validate()
    if num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {num_samples}")
    fmnist = is_fashion_mnist_like(model)
    if fid and not fmnist and fid_reference is None:
        raise ValueError("--fid on this model needs --fid-reference (real images .npz) and Inception weights")
    labels = default_labels(num_samples, model.num_classes)
    seeds = [seed + i for i in range(num_samples)]

    policy_obj = make_policy(policy)
    policy_obj.prepare(model, settings)  # calibrating policies calibrate here (uncached runs of their own)
    with PeakMemory(model.device) as mem:
        run = measured_sample(model, policy_obj, cache_format, labels, seeds, settings, progress=progress)
    images_u8 = images_to_uint8(run.images)
    metrics = {
        "policy": policy, "policy_config": spec_string(policy_obj), "family": policy_obj.family,
        "cache_dtype": str(cache_format), "reuse_ratio": run.reuse_ratio, "cache_bytes": run.cache_bytes,
        "model": model.name, "num_samples": num_samples, "steps": settings.steps, "seed": seed,
        "guidance_scale": settings.guidance_scale, "scheduler": settings.scheduler,
        "batch_size": settings.batch_size, "wall_s": run.wall_s,
        "time_per_image_s": run.wall_s / num_samples, "peak_memory_bytes": mem.peak_bytes,
    }
    if count_cost:  # exact for this run (evaluation.cost)
        metrics["macs"] = run.macs
        metrics["macs_per_image"] = run.macs / num_samples
        metrics["macs_source"] = run.macs_source
    if fmnist:
        from cqpolicy.evaluation.classifier import load_classifier
        from cqpolicy.evaluation.quality import ClassifierFID, class_accuracy

        classifier = load_classifier()
        metrics["class_accuracy"] = class_accuracy(images_u8, sample_classes(model, labels), classifier)
        if fid:
            from cqpolicy.evaluation.quality import ClassifierKID

            metrics["fid"] = ClassifierFID()(images_u8)
            metrics["kid"] = ClassifierKID()(images_u8)
            metrics["fid_features"] = "fmnist-classifier (128-d), reference: Fashion-MNIST test set (10k)"
    else:
        metrics["class_accuracy"] = None
    if clip_model is not None:
        from cqpolicy.evaluation.quality import clip_score

        if model.prompts is None:
            raise ValueError("--clip-model scores images against their prompts: give --prompts")
        metrics["clip_score"] = clip_score(images_u8, [model.prompts.texts[i] for i in labels.tolist()], clip_model)
    if fid and not fmnist:
        from cqpolicy.evaluation.quality import inception_metrics

        metrics.update({f"inception_{k}": v for k, v in
                        inception_metrics(images_u8, fid_reference, inception_weights).items()})
    return Evaluation(images_u8, labels, seeds, metrics)


def save_grid(images_u8: torch.Tensor, path, nrow: int | None = None, scale: int = 3):
    """A PNG grid of uint8 images, upscaled (nearest) so small images stay readable."""
    from PIL import Image
    from torchvision.utils import make_grid

    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(images_u8)))))
    grid = make_grid(images_u8, nrow=nrow, padding=2, pad_value=255)
    array = grid.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    image = Image.fromarray(np.ascontiguousarray(array))
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)
