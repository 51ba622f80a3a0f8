"""nn.Module twins of the functional API."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import functional as F


class PermutohedralFilter(nn.Module):
    """Module form of :func:`rrm_cuda.permutohedral_filter` (no parameters; ``cache`` as there)."""

    def __init__(self, reverse: bool = False, cache: bool = False) -> None:
        super().__init__()
        self.reverse = reverse
        self.cache = cache

    def forward(self, values: Tensor, features: Tensor) -> Tensor:
        return F.permutohedral_filter(values, features, reverse=self.reverse, cache=self.cache)

    def extra_repr(self) -> str:
        return f"reverse={self.reverse}, cache={self.cache}"


class DenseCRF(nn.Module):
    """Module form of :func:`rrm_cuda.dense_crf` holding the kernel parameters.

    Defaults are pydensecrf's usual ones (and RRM's pseudo-label CRF): Gaussian sxy 3 compat 3,
    bilateral sxy 80 srgb 13 compat 10, 10 iterations, symmetric normalisation.

    ``forward(unary=None, image=None, probs=None, pairwise=())`` -> Q (B, L, *S), differentiable
    w.r.t. ``unary``/``probs`` and tensor compatibilities (assign an ``nn.Parameter``, e.g.
    ``m.bilateral_compat = nn.Parameter(torch.full((L,), -10.0))``, to learn one), not the image.
    """

    def __init__(
        self,
        iterations: int = 10,
        gaussian_sxy: float | Tensor = 3.0,
        gaussian_compat: F.Compat = 3.0,
        bilateral_sxy: float | Tensor = 80.0,
        bilateral_srgb: float | Tensor = 13.0,
        bilateral_compat: F.Compat = 10.0,
        normalization: str = "symmetric",
        clip: float | None = 1e-5,
    ) -> None:
        super().__init__()
        self.iterations = iterations
        self.gaussian_sxy = gaussian_sxy
        self.gaussian_compat = gaussian_compat
        self.bilateral_sxy = bilateral_sxy
        self.bilateral_srgb = bilateral_srgb
        self.bilateral_compat = bilateral_compat
        self.normalization = normalization
        self.clip = clip

    def forward(
        self,
        unary: Tensor | None = None,
        image: Tensor | None = None,
        probs: Tensor | None = None,
        pairwise: Sequence[tuple[Tensor, F.Compat]] = (),
    ) -> Tensor:
        return F.dense_crf(
            unary,
            image,
            probs=probs,
            iterations=self.iterations,
            gaussian_sxy=self.gaussian_sxy,
            gaussian_compat=self.gaussian_compat,
            bilateral_sxy=self.bilateral_sxy,
            bilateral_srgb=self.bilateral_srgb,
            bilateral_compat=self.bilateral_compat,
            pairwise=pairwise,
            normalization=self.normalization,
            clip=self.clip,
        )

    def extra_repr(self) -> str:
        return (
            f"iterations={self.iterations}, gaussian=(sxy={self.gaussian_sxy}, compat={self.gaussian_compat}), "
            f"bilateral=(sxy={self.bilateral_sxy}, srgb={self.bilateral_srgb}, compat={self.bilateral_compat}), "
            f"normalization={self.normalization!r}"
        )


__all__ = ["DenseCRF", "PermutohedralFilter"]
