"""The torch op pyeff::quant_conv2d: declaration, fake kernel (shapes for torch.compile) and the
straight-through backward; and the fake kernels of the compiled passes."""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyeff.ops._shapes import conv_out_hw
from pyeff.ops.fake_quant import fake_quant
from pyeff.ops.quant_conv.dispatch import native_ops_built, resolve, run
from pyeff.ops.quant_conv.reference import activation_levels, activation_params, fixed_range
from pyeff.ops.quant_conv.weights import WeightForms


@torch.library.custom_op("pyeff::quant_conv2d", mutates_args=())
def quant_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                    dilation: List[int], groups: int, w_bits: int, a_bits: int, backend: str,
                    a_range: Optional[List[float]] = None, out_scale: Optional[Tensor] = None,
                    relu: bool = False) -> Tensor:
    # an op's arguments are tensors and scalars, so its weight forms are built per call
    return run(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, resolve(x.device, backend),
               a_range, out_scale, relu, WeightForms(None, weight))


@quant_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, backend, a_range=None, out_scale=None,
      relu=False):
    OH, OW = conv_out_hw(x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], OH, OW)).contiguous(memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, backend, a_range, out_scale, relu = inputs
    ctx.save_for_backward(x, weight, out_scale, output if relu else None)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.bits = (w_bits, a_bits)
    ctx.a_range = a_range
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    # straight-through: the gradients of F.conv2d on the fake-quantised operands, then of the
    # per-channel scale, the bias and the ReLU applied to its output
    x, weight, out_scale, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    w_bits, a_bits = ctx.bits
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_s = out_scale is not None and ctx.needs_input_grad[11]
    grad = grad.to(x.dtype)
    if out is not None:  # relu
        grad = grad * (out > 0).to(grad.dtype)
    if not (need_w or need_s):
        xq = x
    elif ctx.a_range is None:
        xq = fake_quant(x.detach(), a_bits)
    else:  # the fixed range's levels (values outside saturate)
        scale, inv, zp, qmax = activation_params(x, a_bits, fixed_range(ctx.a_range))
        xq = ((activation_levels(x.detach(), scale, inv, zp, qmax) - zp) * scale).to(x.dtype)
    wq = fake_quant(weight.detach(), w_bits, scheme="sym", axis=0) if (need_x or need_s) else weight
    g_conv = grad if out_scale is None else grad * out_scale.to(grad.dtype).view(1, -1, 1, 1)
    gx, gw, _ = torch.ops.aten.convolution_backward(
        g_conv, xq, wq, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False])
    gb = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None
    gs = None
    if need_s:
        gs = (grad * F.conv2d(xq, wq, None, stride, padding, dilation, groups)).sum((0, 2, 3)).to(out_scale.dtype)
    return gx, gw, gb, None, None, None, None, None, None, None, None, gs, None


quant_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _register_kernel_fakes():
    @torch.library.register_fake("pyeff::quant_conv_quantize")
    def _(x, inv_scale, zero_point, qmax, slices):
        N, C, H, W = x.shape
        return x.new_empty((slices, N, H, W, C), dtype=torch.uint8).permute(0, 1, 4, 2, 3)

    @torch.library.register_fake("pyeff::quant_conv_quantize_auto")
    def _(x, a_range, qmax, slices):
        N, C, H, W = x.shape
        digits = x.new_empty((slices, N, H, W, C), dtype=torch.uint8).permute(0, 1, 4, 2, 3)
        return digits, x.new_empty((5,), dtype=torch.float64)

    @torch.library.register_fake("pyeff::quant_conv_window_sums")
    def _(digits, zero_digits, groups, kernel, stride, padding, dilation):
        S, N, C, H, W = digits.shape
        OH, OW = conv_out_hw((H, W), kernel, stride, padding, dilation)
        return digits.new_empty((N * OH * OW, groups), dtype=torch.float64)

    @torch.library.register_fake("pyeff::quant_conv_im2col")
    def _(digits, pad_digits, kernel, stride, padding, dilation, groups, k_pad):
        S, N, C, H, W = digits.shape
        OH, OW = conv_out_hw((H, W), kernel, stride, padding, dilation)
        return digits.new_empty((groups, S * N * OH * OW, k_pad), dtype=torch.int8)

    @torch.library.register_fake("pyeff::quant_conv_epilogue")
    def _(acc, corr, slices_w, rowsum, a_scale, w_scale, bias, out_shape, out_dtype):
        N, K, OH, OW = out_shape
        return corr.new_empty((N, K, OH, OW), dtype=out_dtype).contiguous(memory_format=torch.channels_last)


if native_ops_built():
    _register_kernel_fakes()
