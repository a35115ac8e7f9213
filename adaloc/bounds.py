"""Layer-wise (Lipschitz-style) upper bounds on how much the logits move when weights change.

For two networks of the same sequential architecture, a reference ``a`` (e.g. the
authorized model) and a perturbed ``b`` (the base without its key, or the next key
version), the output gap on an input x obeys, layer by layer, with x_a the reference
activations and d the bound on ``||x_b - x_a||``:

    linear / conv:  d' = L(W_b) d + L(W_b - W_a) ||x_a|| + ||b_b - b_a|| sqrt(positions)
    batch norm:     d' = max|s_b| d + max|s_b - s_a| ||x_a|| + ||c_b - c_a|| sqrt(positions)
                    (eval mode: y = s x + c per channel, s = gamma / sqrt(var + eps))
    ReLU, max-pool (non-overlapping), flatten: d' = d;  average pooling: its operator norm.

``L`` is the spectral norm for a linear layer and, for a convolution, the smaller of
``sum over kernel offsets of ||W[:, :, i, j]||_2`` and ``sqrt(kh * kw) ||W as [out, in*kh*kw]||_2``
(both upper-bound the convolution operator with zero padding and any stride). Every term
is per sample, from the reference forward pass only, so the bound holds for every input;
the check is that the measured ``||logits_b - logits_a||`` never exceeds it.
"""

from __future__ import annotations

import torch
from torch import nn

from adaloc.errors import ModelError

_PASS = (nn.ReLU, nn.Flatten, nn.Identity, nn.Dropout)


def _spec(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.double(), ord=2)) if w.numel() else 0.0


def conv_norm(w: torch.Tensor) -> float:
    """Upper bound on the L2 operator norm of a convolution with weight ``w`` [out, in, kh, kw]."""
    kh, kw = w.shape[2], w.shape[3]
    per_offset = sum(_spec(w[:, :, i, j]) for i in range(kh) for j in range(kw))
    stacked = (kh * kw) ** 0.5 * _spec(w.reshape(w.shape[0], -1))
    return min(per_offset, stacked)


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    eye = torch.eye(n_in, dtype=torch.float64)[:, None, :]  # [n_in, 1, n_in]
    return nn.functional.adaptive_avg_pool1d(eye, n_out)[:, 0, :].T  # [n_out, n_in]


def _avgpool_norm(module: nn.AdaptiveAvgPool2d, x: torch.Tensor) -> float:
    out = module.output_size
    oh, ow = (out, out) if isinstance(out, int) else out
    h, w = x.shape[-2:]
    return _spec(_pool_matrix(h, oh or h)) * _spec(_pool_matrix(w, ow or w))


def _bn_affine(m: nn.modules.batchnorm._BatchNorm):
    scale = m.weight.detach().double() if m.affine else torch.ones_like(m.running_var.double())
    shift = m.bias.detach().double() if m.affine else torch.zeros_like(scale)
    s = scale / torch.sqrt(m.running_var.double() + m.eps)
    return s, shift - s * m.running_mean.double()


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.double().flatten(1).norm(dim=1)


def _positions(y: torch.Tensor) -> float:
    return float(y[0, 0].numel()) if y.dim() > 2 else 1.0


@torch.no_grad()
def logit_change_bound(
    a: nn.Module, b: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(bound, measured)`` of ``||b(x) - a(x)||_2`` for sequential a and b (eval).

    Raises ModelError for a layer type the bound does not cover (e.g. residual blocks).
    """
    if not isinstance(a, nn.Sequential) or not isinstance(b, nn.Sequential) or len(a) != len(b):
        raise ModelError("the bound covers nn.Sequential models of the same layout (cnn, mlp)")
    a, b = a.eval(), b.eval()
    xa = x.double()
    d = torch.zeros(len(x), dtype=torch.float64)
    for ma, mb in zip(a, b, strict=True):
        ma, mb = ma.double(), mb.double()
        ya = ma(xa)
        if isinstance(ma, nn.Linear | nn.Conv2d):
            if isinstance(ma, nn.Conv2d) and (ma.groups != 1 or ma.dilation != (1, 1)):
                raise ModelError(f"bound: grouped or dilated convolution {ma} is not covered")
            lip = conv_norm if isinstance(ma, nn.Conv2d) else _spec
            dw = mb.weight - ma.weight
            db = 0.0
            if ma.bias is not None:
                db = float((mb.bias - ma.bias).norm()) * _positions(ya) ** 0.5
            d = lip(mb.weight) * d + lip(dw) * _norms(xa) + db
        elif isinstance(ma, nn.modules.batchnorm._BatchNorm):
            sa, ca = _bn_affine(ma)
            sb, cb = _bn_affine(mb)
            d = (
                float(sb.abs().max()) * d
                + float((sb - sa).abs().max()) * _norms(xa)
                + float((cb - ca).norm()) * _positions(ya) ** 0.5
            )
        elif isinstance(ma, nn.MaxPool2d):
            k, s = ma.kernel_size, ma.stride
            k, s = (k if isinstance(k, int) else max(k)), (s if isinstance(s, int) else min(s))
            d = d * float(-(-k // s))  # each input feeds at most ceil(k/s)^2 windows
        elif isinstance(ma, nn.AdaptiveAvgPool2d):
            d = d * _avgpool_norm(ma, xa)
        elif not isinstance(ma, _PASS):
            raise ModelError(f"bound: layer {type(ma).__name__} is not covered")
        xa = ya
        ma.float(), mb.float()
    measured = (b(x) - a(x)).double().norm(dim=1)
    return d, measured


def bound_report(a: nn.Module, b: nn.Module, data, *, batch_size: int = 256) -> dict:
    """Bound vs measured logit change over ``data``: violations and tightness (measured/bound)."""
    bounds, meas = [], []
    for s in range(0, len(data.y), batch_size):
        bd, ms = logit_change_bound(a, b, data.x[s : s + batch_size])
        bounds.append(bd)
        meas.append(ms)
    bd, ms = torch.cat(bounds), torch.cat(meas)
    ratio = ms / bd.clamp_min(1e-300)
    return {
        "samples": len(bd),
        "violations": int((ms > bd * (1 + 1e-6) + 1e-9).sum()),
        "bound_median": float(bd.median()),
        "measured_median": float(ms.median()),
        "tightness_median": float(ratio.median()),
        "tightness_max": float(ratio.max()),
    }
