"""pyeff.ops.quant_conv2d / quant_linear: convolution and linear layers computed in integers.

Quantisation (the same as pyeff.ops.fake_quant, so the two agree bit for bit):
  activations: asymmetric, min-max over the call's whole input (range widened to hold 0), integer
               zero point zp, levels q in [0, 2^a_bits - 1];
  weights:     symmetric, one scale per output channel, levels w in [-(2^(w_bits-1) - 1), ...].
The convolution of the levels is integer arithmetic; a fused epilogue dequantises and adds bias:
    out[k] = a_scale * w_scale[k] * sum_i (q_i - zp) * w_ik + bias[k].

Integer slices (widths above 8 bits). Every GEMM multiplies int8 by int8 (or uint8 by int8) with
int32 accumulation; a b-bit operand is split into ceil(b/8) byte digits:
  * activations: q = sum_j 256^j u_j with unsigned digits u_j in [0, 255], zp likewise into z_j,
    so q - zp = sum_j 256^j (u_j - z_j): slice j is an 8-bit activation with zero point z_j
    (padding positions hold z_j, i.e. the value 0, in every slice);
  * weights (w_bits > 8): w - o = 256 h + l with balanced digits l, h in [-128, 127]; the offset o
    is 0 up to 15 bits and 128 for 16 bits (the range [-32767, 32767] does not fit two balanced
    int8 digits). o * sum_i (q_i - zp) comes from a window sum of per-pixel channel sums of the
    digits (`window_sums`), exact in int64.
  Each slice product is exact in int32 (|digit products| <= 2^15 per term); the slices are combined
  in float64 (exact for integers below 2^53) and only then scaled and rounded once.

Kernels (routes.py says which CPU route runs; `cpu_route` reports it):
  CPU "direct" (<= 8 bits both): quantise straight to uint8 in channels_last (C++), then oneDNN's
    int8 convolution (onednn::qconv2d_pointwise: AMX / AVX512-VNNI) with the dequantisation, bias
    and ReLU fused into it (float32 output).
  CPU "sliced" (wider): the same quantiser writes byte slices; each slice runs through oneDNN's
    int8 convolution with unit scales, whose float32 output holds the integer accumulator exactly
    when |acc| < 2^24 (checked from the weights before the call); the C++ epilogue combines slices.
  CPU "gemm" (float64-exact, CPUs without VNNI, accumulators too large for float32): C++ im2col
    of the digits into int8 columns (u - 128) -> at::_int_mm -> the C++ epilogue, which adds the
    exact correction (128 - z_j) * sum_i w_i.
  CUDA: the CUDA versions of the same quantiser / im2col / epilogue around at::_int_mm (cuBLASLt,
    int8 tensor cores). Triton: a quantise + im2col kernel and an int8 tl.dot GEMM with int32
    accumulation (kernels/quant_conv.py), then the same epilogue.

Weights are quantised, sliced and packed per call, or once per weight state when the caller
passes the WeightPacks of the module that owns the weight (`packs=packs_of(module)`;
pyeff.nn.QuantConv2d / QuantLinear / quant_conv2d_of do): there is no process-wide cache.

Every backend returns the output in channels_last memory format (the integer GEMM produces NHWC
rows; converting would cost a pass over the output).

Gradients are straight-through: d/dx and d/dw are those of F.conv2d applied to the fake-quantised
operands fake_quant(x, a_bits) and fake_quant(w, w_bits, scheme="sym", axis=0).

Modules: reference (quantisers, the reference kernel), slicing (digits, window sums), weights
(packed weight forms), routes (the CPU route choice), native / triton (the backends), dispatch
(backend choice), autograd (the torch op, fake kernels, backward), api (checks, public functions).
"""
from pyeff.ops._checks import FLOAT_DTYPES
from pyeff.ops.quant_conv.api import quant_conv2d, quant_linear
from pyeff.ops.quant_conv.dispatch import PREFERENCE, native_ops_built
from pyeff.ops.quant_conv.reference import (activation_levels, activation_params, fixed_range,
                                               quant_conv2d_reference, weight_levels)
from pyeff.ops.quant_conv.routes import (AUTOTUNE_ENV, CPU_PATH_ENV, CPU_PATHS, ROUTES, autotune_enabled,
                                         cpu_has_int8_dot, cpu_route, tracing, tuned_routes)
from pyeff.ops.quant_conv.slicing import act_slices, digit_max, weight_digits, window_sums, zero_point_digits

__all__ = ["quant_conv2d", "quant_linear", "quant_conv2d_reference", "cpu_route", "CPU_PATH_ENV", "CPU_PATHS",
           "ROUTES", "FLOAT_DTYPES", "AUTOTUNE_ENV", "autotune_enabled", "tracing", "tuned_routes"]
