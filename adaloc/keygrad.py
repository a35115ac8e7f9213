"""Key-row weight gradients: a partly keyed convolution computes only its keyed rows' gradient.

Key-only training needs the weight gradient of the key rows alone, but autograd computes a
layer's whole weight gradient (and a mask then zeroes most of it). For a convolution whose
key holds a few output filters, the weight gradient is a third of the layer's backward
pass, so :func:`restrict_weight_grad` makes it cost only the keyed share: the forward pass
is the module's own (same values), the input gradient is the full one, and the weight
gradient is computed on the keyed output channels and is exactly zero elsewhere (so
optimizers without weight decay leave those values bit-identical; KeyGuard restores them
anyway). PyTorch has no "weight gradient for a subset of rows" option, hence the Function.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd


def _conv_args(conv: _ConvNd) -> tuple:
    zeros = [0] * len(conv.stride)
    return (list(conv.stride), list(conv.padding), list(conv.dilation), False, zeros, 1)


class _RowConv(torch.autograd.Function):
    """conv(x, weight, bias) whose weight gradient covers only ``rows`` (output channels)."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, conv):
        ctx.save_for_backward(x, weight, rows)
        ctx.conv, ctx.has_bias = conv, bias is not None
        return conv._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rows = ctx.saved_tensors
        x_dtype, w_dtype = x.dtype, weight.dtype
        # under CUDA autocast the forward ran in the gradient's (half) precision
        x, weight = x.to(grad_out.dtype), weight.to(grad_out.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        args = _conv_args(ctx.conv)
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        gx = gw = gb = None
        if need_x or need_b:
            gx, _, gb = torch.ops.aten.convolution_backward(
                grad_out, x, weight, bias_sizes, *args, [need_x, False, need_b and ctx.has_bias]
            )
        if need_w:
            _, g_rows, _ = torch.ops.aten.convolution_backward(
                grad_out.index_select(1, rows),
                x,
                weight.index_select(0, rows),
                None,
                *args,
                [False, True, False],
            )
            gw = torch.zeros_like(weight).index_copy_(0, rows, g_rows)
        gx = gx.to(x_dtype) if gx is not None else None
        gb = gb.to(w_dtype) if gb is not None else None
        return gx, gw.to(w_dtype) if gw is not None else None, gb, None, None


def _row_forward(self: _ConvNd, x: torch.Tensor) -> torch.Tensor:
    return _RowConv.apply(x, self.weight, self.bias, self._key_rows, self)


def supports(module: nn.Module) -> bool:
    """Whether ``module``'s weight gradient can be restricted to rows (plain convolutions)."""
    return (
        isinstance(module, _ConvNd)
        and not module.transposed
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def restrict_weight_grad(module: nn.Module, rows: torch.Tensor) -> None:
    """Make ``module`` (see :func:`supports`) compute its weight gradient for ``rows`` only."""
    module._key_rows = rows.to(module.weight.device, torch.long)
    module.forward = types.MethodType(_row_forward, module)  # instance attribute: undone below


def release(module: nn.Module) -> None:
    """Undo :func:`restrict_weight_grad`."""
    module.__dict__.pop("forward", None)
    module.__dict__.pop("_key_rows", None)
