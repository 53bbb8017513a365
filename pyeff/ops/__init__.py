"""pyeff's ops: each declared once as a torch op (`torch.ops.pyeff.<name>`) with a pure-PyTorch
reference kernel, compiled CPU/CUDA kernels, a Triton kernel, a fake kernel and autograd."""
from pyeff.ops.fake_quant import fake_quant, fake_quant_reference
from pyeff.ops.masked_conv import masked_conv2d, masked_conv2d_reference
from pyeff.ops.skip import SkipBlock, run_on_subset
from pyeff.ops.quant_conv import quant_conv2d, quant_conv2d_reference, quant_linear
from pyeff.ops.psg import psg_conv2d_weight_grad, psg_conv2d_weight_grad_reference

__all__ = ["fake_quant", "fake_quant_reference", "masked_conv2d", "masked_conv2d_reference", "run_on_subset",
           "SkipBlock", "quant_conv2d", "quant_conv2d_reference", "quant_linear", "psg_conv2d_weight_grad",
           "psg_conv2d_weight_grad_reference"]
