"""Quality metrics: FID against real data, class accuracy, and paired fidelity to a reference run.

* ``ClassifierFID``: torchmetrics' ``FrechetInceptionDistance`` with the shipped Fashion-MNIST classifier
  as feature extractor; its real statistics are those of the 10k real test images (loaded, not
  recomputed, and kept across ``reset``).
* ``ClassifierKID``: unbiased KID (torchmetrics' cubic-polynomial-kernel MMD) in the same feature space,
  between all generated images and 2000 real test images; unbiased at small N, where FID is not.
* ``paired_fidelity``: PSNR and SSIM (torchmetrics) of images against those of a reference run with the
  same seeds; good for search, never a substitute for FID.
* ``inception_metrics``: Inception FID / IS / KID / precision-recall through torch-fidelity, for real
  checkpoints, from a local Inception weights file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of ``features`` [N, D]."""
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    from torchmetrics.image.fid import _compute_fid

    return float(_compute_fid(mu1.double(), sigma1.double(), mu2.double(), sigma2.double()))


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ClassifierFID:
    """FID in the feature space of the shipped Fashion-MNIST classifier, against the real test set."""

    def __init__(self, classifier_dir: str | Path | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        from cqpolicy.evaluation.classifier import SHIPPED_DIR, frozen, load_classifier, load_reference_stats

        directory = classifier_dir or SHIPPED_DIR
        self.classifier = load_classifier(directory)
        stats = load_reference_stats(directory)
        # every rank of a torchrun launch scores the whole gathered run: no syncing of features across ranks
        self.metric = FrechetInceptionDistance(feature=frozen(self.classifier), reset_real_features=False,
                                               sync_on_compute=False)
        n = int(stats["num_samples"])
        mean, cov = stats["mean"].double(), stats["cov"].double()
        # torchmetrics keeps sums; rebuild them from the shipped mean / covariance.
        self.metric.real_features_sum = mean * n
        self.metric.real_features_cov_sum = cov * (n - 1) + n * torch.outer(mean, mean)
        self.metric.real_features_num_samples = torch.tensor(n, dtype=torch.long)

    def __call__(self, images_uint8: torch.Tensor) -> float:
        self.metric.reset()
        for i in range(0, len(images_uint8), 500):
            self.metric.update(images_uint8[i:i + 500], real=False)
        return float(self.metric.compute())


class ClassifierKID:
    """KID (the unbiased MMD^2 estimate, cubic kernel) of images against the real reference features."""

    def __init__(self, classifier_dir: str | Path | None = None):
        from cqpolicy.evaluation.classifier import SHIPPED_DIR, load_classifier, load_kid_reference

        directory = classifier_dir or SHIPPED_DIR
        self.classifier = load_classifier(directory)
        self.real = load_kid_reference(directory).double()

    def __call__(self, images_uint8: torch.Tensor) -> float:
        if len(images_uint8) < 2:
            return float("nan")
        with torch.no_grad():
            fake = torch.cat([self.classifier(images_uint8[i:i + 500]) for i in range(0, len(images_uint8), 500)])
        return unbiased_poly_mmd(self.real, fake.double())


def unbiased_poly_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with KID's kernel (torchmetrics' cubic ``poly_kernel``) for sets of any two sizes
    (torchmetrics' ``poly_mmd`` assumes equal sizes)."""
    from torchmetrics.image.kid import poly_kernel

    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def class_accuracy(images_uint8: torch.Tensor, labels: torch.Tensor, classifier=None) -> float:
    from cqpolicy.evaluation.classifier import load_classifier

    classifier = classifier or load_classifier()
    with torch.no_grad():
        preds = torch.cat([classifier.classify(images_uint8[i:i + 500]).argmax(1)
                           for i in range(0, len(images_uint8), 500)])
    return float((preds == labels).float().mean())


def paired_fidelity(images_uint8: torch.Tensor, reference_uint8: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of images against the reference run's images (same seeds, same noise)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if images_uint8.shape != reference_uint8.shape:
        raise ValueError(f"paired fidelity needs equal shapes, got {tuple(images_uint8.shape)} "
                         f"and {tuple(reference_uint8.shape)}")
    a, b = images_uint8.float() / 255.0, reference_uint8.float() / 255.0
    if torch.equal(a, b):
        psnr = float("inf")
    else:
        psnr = float(peak_signal_noise_ratio(a, b, data_range=1.0))
    ssim = float(structural_similarity_index_measure(a, b, data_range=1.0))
    return {"psnr": psnr, "ssim": ssim}


INCEPTION_HINT = ("Inception FID needs local weights: pass --inception-weights FILE "
                  "(torch-fidelity's pt_inception-2015-12-05 .pth) or put it in $TORCH_HOME/hub/checkpoints/")


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The local Inception weights file for torch-fidelity, checked, or a clear one-line error.

    torch-fidelity unpickles the file with ``weights_only=False``; it is first loaded here with
    ``weights_only=True``, so a file holding anything but tensors (pickled objects, code) is refused before it
    gets there, and one that holds other tensors than Inception's is refused too (``ValueError``)."""
    if path:
        candidate = Path(path)
        if not candidate.is_file():
            raise FileNotFoundError(f"Inception weights {candidate} not found; {INCEPTION_HINT}")
    else:
        torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
        found = sorted((torch_home / "hub" / "checkpoints").glob("pt_inception*.pth"))
        if not found:
            raise FileNotFoundError(INCEPTION_HINT)
        candidate = found[0]
    import pickle

    fix = "use torch-fidelity's pt_inception-2015-12-05 .pth"
    try:
        state = torch.load(candidate, map_location="cpu", weights_only=True)  # refuses pickled objects and code
    except pickle.UnpicklingError:
        raise ValueError(f"Inception weights {candidate} is not a tensor-only weights file (it holds pickled "
                         f"objects, which are never loaded); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - a file that is no torch file at all fails in many ways
        raise ValueError(f"Inception weights {candidate} is not a tensor-only weights file (torch.load with "
                         f"weights_only=True cannot read it: {type(exc).__name__}); {fix}") from None
    # torch-fidelity's InceptionV3 state dict: its first convolution and its 2048 -> 1008 classifier
    signature = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048)}
    fits = isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values()) and all(
        torch.is_tensor(state.get(k)) and tuple(state[k].shape) == shape for k, shape in signature.items())
    if not fits:
        raise ValueError(f"Inception weights {candidate} does not hold torch-fidelity's InceptionV3 state dict; "
                         f"{fix}")
    return candidate


def inception_metrics(fake_uint8: torch.Tensor, real_uint8: torch.Tensor,
                      weights_path: str | os.PathLike | None = None) -> dict[str, float]:
    """Inception FID / IS / KID / precision-recall of uint8 [N, C, H, W] images via torch-fidelity.

    torch-fidelity unpickles the weights file; ``find_inception_weights`` first loads it with
    ``weights_only=True`` so a file that holds anything but tensors is refused before it gets there.
    """
    import torch_fidelity

    weights = find_inception_weights(weights_path)

    class _Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i]

    try:
        metrics = torch_fidelity.calculate_metrics(
            input1=_Images(fake_uint8), input2=_Images(real_uint8), cuda=torch.cuda.is_available(),
            isc=True, fid=True, kid=True, prc=True, verbose=False, cache=False,
            feature_extractor_weights_path=str(weights),
            kid_subset_size=min(1000, len(fake_uint8), len(real_uint8)),
        )
    except RuntimeError as exc:
        if "state_dict" not in str(exc):
            raise
        raise ValueError(f"Inception weights {weights} do not fit torch-fidelity's InceptionV3 "
                         f"({str(exc).splitlines()[0]}); use torch-fidelity's pt_inception-2015-12-05 .pth") from None
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}


@torch.no_grad()
def clip_score(images_uint8: torch.Tensor, texts: list[str], model_dir: str | os.PathLike) -> float:
    """Mean CLIP score (as torchmetrics defines it: 100 x the cosine of image and text embeddings, floored at 0) of
    each image against its prompt, with a local CLIP model folder (transformers ``CLIPModel`` and
    ``CLIPProcessor``; nothing is downloaded). torchmetrics' own ``CLIPScore`` reads transformers 4's feature
    outputs, so the embeddings come from the model's forward here. One-line ValueError for a folder without one."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--clip-model {folder}: no CLIP model folder (config.json, weights, processor files)")
    if len(texts) != len(images_uint8):
        raise ValueError(f"{len(images_uint8)} images but {len(texts)} prompts")
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=list(texts), images=list(images_uint8), return_tensors="pt", padding=True,
                       truncation=True)
    out = model(**inputs)  # image_embeds and text_embeds come normalised
    cosine = (out.image_embeds * out.text_embeds).sum(dim=-1)
    return float((100 * cosine.clamp_min(0)).mean())
