"""The norm family of model.py: LayerNorm, RMSNorm, and the normalization-free DyT and Derf, built by make_norm.

    layernorm  (x - mean) / sqrt(var + eps) * weight + bias             torch.nn.LayerNorm (GPT-2)
    rmsnorm    x / sqrt(mean(x^2) + eps) * weight                       torch.nn.RMSNorm
    dyt        weight * tanh(alpha * x) + bias                          DyT: Zhu, Chen, He, LeCun, Liu 2025,
                                                                        "Transformers without Normalization"
    derf       weight * erf(alpha * x + shift) + bias                   Derf: Chen, Lu, Zhu, Sun, Liu 2025,
                                                                        "Stronger Normalization-Free Transformers"

DyT and Derf are point-wise: no statistic over the channels, a learned scalar alpha (and for Derf a learned
scalar shift, initialised to 0) sets how soon the squashing function saturates; weight (the papers' gamma,
ones) and bias (beta, zeros) are per channel, as the norms' affine parameters. Their initial alpha is set per
site by the caller (model.py: the attention's norm, the MLP's, the final one), as both papers' language models do.

scale: the module's output times a constant (1.0: nothing is multiplied). LayerNorm Scaling (model.py's
norm_scaling) gives the norm that feeds block l's sub-layers 1/sqrt(l); depth_scaling gives a sub-layer's output
norm (peri-LN, reordered) its branch multiplier. The learned parameters keep their names and values: only the
output is scaled, as in the papers' code (LNS multiplies the norm's output, it does not rescale its weight).

This module imports nothing of the project (model.py imports it).
"""

import torch
import torch.nn as nn

NORMS = ("layernorm", "rmsnorm", "dyt", "derf")
POINTWISE = ("dyt", "derf")  # the normalization-free ones
EPS = 1e-5  # GPT-2's LayerNorm epsilon, also RMSNorm's here
# the switches a point-wise norm does not combine with (model.GPTConfig refuses them; norm_position: post and mix)
POINTWISE_REFUSES = {
    "qk_norm": "a point-wise squash does not normalise q and k per head, and has no initial alpha for them",
    "embed_norm": "DyT's and Derf's language models scale the embeddings by a learned sqrt(n_embd) instead",
    "deepnorm": "deepnorm up-weights the skip before a norm that rescales the sum; DyT and Derf do not rescale",
    "norm_position": "a post-LN norm renormalises the stream after each add; DyT and Derf only squash it (about "
    "alpha * weight per sub-layer in their linear range), so it would shrink with depth: use pre, peri or reordered",
}


class OutputScale:
    """Mixed into a module class: its output times the constant self.scale."""

    scale: float = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:.4g}"


class ScaledLayerNorm(OutputScale, nn.LayerNorm):
    pass


class ScaledRMSNorm(OutputScale, nn.RMSNorm):
    pass


class DyT(nn.Module):
    """Dynamic Tanh: weight * tanh(alpha * x) + bias over the last dim (the official DynamicTanh, with weight and
    bias left out when affine=False, bias when bias=False). alpha is one learned scalar, shape (1,)."""

    def __init__(self, dim: int, alpha: float, affine: bool = True, bias: bool = True):
        super().__init__()
        self.dim, self.alpha_init = dim, alpha
        self.alpha = nn.Parameter(torch.full((1,), float(alpha)))
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and bias else None

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        """The bounded function before the affine part, in (-1, 1): tanh(alpha * x). An instrument's saturation
        is the fraction of units where |squash(x)| > 0.99."""
        return torch.tanh(self.alpha * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.squash(x)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def readings(self) -> dict[str, float]:
        """What an instrument reports from the parameters alone."""
        return {"alpha": _item(self.alpha)}

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha_init={self.alpha_init}, affine={self.weight is not None}"


class Derf(DyT):
    """Dynamic erf: weight * erf(alpha * x + shift) + bias; alpha and shift are learned scalars, shift from 0
    (the official Dynamic_erf)."""

    def __init__(self, dim: int, alpha: float, affine: bool = True, bias: bool = True):
        super().__init__(dim, alpha, affine, bias)
        self.shift = nn.Parameter(torch.zeros(1))

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(self.alpha * x + self.shift)

    def readings(self) -> dict[str, float]:
        return {"alpha": _item(self.alpha), "shift": _item(self.shift)}


class ScaledDyT(OutputScale, DyT):
    pass


class ScaledDerf(OutputScale, Derf):
    pass


def _item(p: torch.Tensor) -> float:
    """A scalar parameter's value (a sharded DTensor gathered first)."""
    p = p.detach()
    return float(p.full_tensor() if hasattr(p, "full_tensor") else p)


def make_norm(kind: str, dim: int, affine: bool = True, bias: bool = True, alpha: float = 1.0, scale: float = 1.0):
    """A norm of the given kind over the last dim (alpha: DyT's and Derf's initial alpha; scale: see above)."""
    if kind in POINTWISE:
        cls = {"dyt": (DyT, ScaledDyT), "derf": (Derf, ScaledDerf)}[kind][scale != 1.0]
        norm = cls(dim, alpha, affine, bias)
    elif kind == "rmsnorm":
        norm = (ScaledRMSNorm if scale != 1.0 else nn.RMSNorm)(dim, eps=EPS, elementwise_affine=affine)
    else:
        cls = ScaledLayerNorm if scale != 1.0 else nn.LayerNorm
        norm = cls(dim, eps=EPS, elementwise_affine=affine, bias=bias and affine)
    if scale != 1.0:
        norm.scale = scale
    return norm
