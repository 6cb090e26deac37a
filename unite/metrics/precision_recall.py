"""Improved precision and recall (Kynkaanniemi et al. 2019) as the ADM evaluator and
torch-fidelity compute them: each set's manifold is the union of balls around its points, each
ball reaching the k-th nearest other point of the set (k = 3). Precision is the share of generated
points inside the reference manifold, recall the share of reference points inside the generated
one. Distances are exact Euclidean ones in float64, computed in row blocks so that memory is
block x N, never N x N."""

from __future__ import annotations

import torch
from torch import Tensor

from unite.metrics.inputs import MetricsInputError

NEIGHBOURHOOD = 3  # k, as in the paper, the ADM evaluator and torch-fidelity (prc_neighborhood)
BLOCK_ROWS = 256  # a block of distances to 50,000 points takes 100 MB in float64


def manifold_radii(features: Tensor, k: int = NEIGHBOURHOOD, block: int = BLOCK_ROWS) -> Tensor:
    """Distance from each point to its k-th nearest other point (the k + 1-th smallest distance,
    the point itself being the first)."""
    return torch.cat([torch.cdist(rows, features).kthvalue(k + 1, dim=1).values for rows in features.split(block)])


def inside(points: Tensor, centres: Tensor, radii: Tensor, block: int = BLOCK_ROWS) -> Tensor:
    """Whether each point lies within the radius of some centre (boundary included)."""
    return torch.cat([(torch.cdist(rows, centres) <= radii).any(dim=1) for rows in points.split(block)])


def precision_recall(
    generated, reference, k: int = NEIGHBOURHOOD, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """(precision, recall) of generated (N, D) features against reference (M, D) ones."""
    generated = torch.as_tensor(generated).to(device, torch.float64)
    reference = torch.as_tensor(reference).to(device, torch.float64)
    if generated.ndim != 2 or reference.ndim != 2 or generated.shape[1] != reference.shape[1]:
        raise MetricsInputError(f"precision/recall: features of shapes {tuple(generated.shape)} and "
                                f"{tuple(reference.shape)}; they must be (N, D) and (M, D) with one D")
    if min(len(generated), len(reference)) <= k:
        raise MetricsInputError(
            f"precision/recall: {len(generated)} generated and {len(reference)} reference feature rows; each set "
            f"needs more than k={k} points for its k-th nearest neighbour (generate more images, or keep more "
            f"reference features: fid_ref.set_images)"
        )
    precision = inside(generated, reference, manifold_radii(reference, k)).double().mean()
    recall = inside(reference, generated, manifold_radii(generated, k)).double().mean()
    return float(precision), float(recall)
