"""§4.1 training-set statistics: the mean image and the 3×3 RGB covariance with its eigenvectors.

Sums are kept as exact integers (int64), so the result does not depend on the order in which
chunks are added: a resumed prep gives bit-identical statistics to an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOADER_SIZE = 256  # §2: the mean image is over the 256×256 images


@dataclass
class StatSums:
    """Exact integer sums over some images of one stored size S."""
    image_sum: np.ndarray   # (3, S, S) int64: per-pixel sum over images
    pixel_sum: np.ndarray   # (3,) int64: sum of R, G, B over all pixels
    outer_sum: np.ndarray   # (3, 3) int64: sum of x xᵀ over all pixels
    pixels: int = 0
    images: int = 0

    @classmethod
    def zeros(cls, size: int) -> "StatSums":
        return cls(np.zeros((3, size, size), np.int64), np.zeros(3, np.int64), np.zeros((3, 3), np.int64))

    def add_image(self, hwc: np.ndarray) -> None:
        """Add one H×W×3 uint8 image."""
        self.image_sum += hwc.transpose(2, 0, 1)
        flat = hwc.reshape(-1, 3).astype(np.int64)
        # Integer einsum, not BLAS: exact, and no BLAS thread pool in each of N worker processes.
        self.pixel_sum += flat.sum(0)
        self.outer_sum += np.einsum("ni,nj->ij", flat, flat)
        self.pixels += flat.shape[0]
        self.images += 1

    def add(self, other: "StatSums") -> None:
        self.image_sum += other.image_sum
        self.pixel_sum += other.pixel_sum
        self.outer_sum += other.outer_sum
        self.pixels += other.pixels
        self.images += other.images

    def to_arrays(self) -> dict[str, np.ndarray]:
        # Per chunk every per-pixel sum is < chunk_size * 255 < 2**32: uint32 halves the temp files.
        return {"image_sum": self.image_sum.astype(np.uint32), "pixel_sum": self.pixel_sum,
                "outer_sum": self.outer_sum, "pixels": np.int64(self.pixels), "images": np.int64(self.images)}

    @classmethod
    def from_arrays(cls, a) -> "StatSums":
        return cls(a["image_sum"].astype(np.int64), a["pixel_sum"].astype(np.int64),
                   a["outer_sum"].astype(np.int64), int(a["pixels"]), int(a["images"]))


def upsample_mean(mean: np.ndarray, size: int = LOADER_SIZE) -> np.ndarray:
    """The loader's rule for native-size sets, applied to the mean image.

    Bilinear interpolation is linear in the image, so upsampling the mean once equals the mean of
    the upsampled images (up to float rounding).
    """
    if mean.shape[-1] == size:
        return mean.astype(np.float32)
    import torch  # here, not at the top: the prep's worker processes never need torch
    import torch.nn.functional as F
    t = torch.from_numpy(mean.astype(np.float32))[None]
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=False)
    return up[0].numpy().astype(np.float32)


def eigen(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending eigenvalues and column eigenvectors; each column's largest entry made positive.

    A covariance is positive semi-definite: rounding can give tiny negative eigenvalues (e.g.
    ~-1e-12 for a grayscale set, whose covariance has rank 1), so they are clipped at 0.
    """
    val, vec = np.linalg.eigh(cov)
    signs = np.sign(vec[np.abs(vec).argmax(0), np.arange(3)])
    return np.maximum(val, 0.0), vec * signs


def finish(sums: StatSums) -> dict[str, np.ndarray]:
    """Sums → the stats.npz arrays (§4.1). The covariance is the population one (divide by N)."""
    if sums.images == 0:
        raise ValueError("no training images went into the statistics")
    mean = sums.image_sum.astype(np.float64) / sums.images
    mu = sums.pixel_sum.astype(np.float64) / sums.pixels
    cov = sums.outer_sum.astype(np.float64) / sums.pixels - np.outer(mu, mu)
    val, vec = eigen(cov)
    return {"mean": upsample_mean(mean), "rgb_cov": cov, "eigval": val, "eigvec": vec,
            "count": np.int64(sums.images), "source": np.array("computed")}


def from_constants(path: Path) -> dict[str, np.ndarray]:
    """Krizhevsky's cuda-convnet2 `input_meta`, as stats.npz arrays.

    color_pca_stdevs are standard deviations (√eigenvalues) on 0–255, so eigval = stdevs².
    The number of images behind them is not recorded: count = -1.
    """
    with np.load(path) as z:
        mean = z["data_mean"].astype(np.float32).reshape(3, LOADER_SIZE, LOADER_SIZE)
        stdevs = z["color_pca_stdevs"].astype(np.float64)
        vec = z["color_pca_eigvecs"].astype(np.float64)
    val = stdevs ** 2
    return {"mean": mean, "rgb_cov": vec @ np.diag(val) @ vec.T, "eigval": val, "eigvec": vec,
            "count": np.int64(-1), "source": np.array("cuda-convnet2")}


def summary(stats: dict[str, np.ndarray]) -> dict:
    """The numbers worth reading in a manifest: channel means, √eigenvalues, eigenvectors."""
    return {"channel_mean_rgb": [round(float(x), 3) for x in stats["mean"].mean((1, 2))],
            "sqrt_eigval": [round(float(x), 3) for x in np.sqrt(np.maximum(stats["eigval"], 0))],
            "eigvec_columns": [[round(float(x), 4) for x in col] for col in stats["eigvec"].T],
            "count": int(stats["count"]), "source": str(stats["source"])}


def compare(computed: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    """Computed statistics side by side with Krizhevsky's; |cos| between matching eigenvectors."""
    cos = np.abs(np.sum(computed["eigvec"] * reference["eigvec"], axis=0))
    return {"computed": summary(computed), "cuda_convnet2": summary(reference),
            "eigvec_abs_cos": [round(float(c), 4) for c in cos],
            "mean_image_abs_diff": round(float(np.abs(computed["mean"] - reference["mean"]).mean()), 3)}


def save(path: Path, stats: dict[str, np.ndarray]) -> None:
    """Write stats.npz atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **stats)
    tmp.replace(path)
