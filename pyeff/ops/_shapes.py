"""Shape arithmetic shared by the ops and their kernels."""


def conv_out_hw(hw, kernel, stride, padding, dilation) -> tuple:
    """(OH, OW) of a 2-D convolution, as torch.nn.functional.conv2d defines them; each argument is a
    pair (height, width). Below 1 when the padded input is smaller than the dilated kernel."""
    # two explicit terms: a generator costs a few microseconds per call in the ops' hot path
    return ((hw[0] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
            (hw[1] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1)


def effective_dilation(kernel, dilation) -> tuple:
    """`dilation` (a pair) with 1 along each axis of kernel size 1, where it changes nothing: oneDNN's
    float16 / bfloat16 convolution (F.conv2d) segfaults on a dilated 1-tap axis of a channels_last
    input with padding (found by tests/test_fuzz_masked_conv.py)."""
    return (1 if kernel[0] == 1 else dilation[0], 1 if kernel[1] == 1 else dilation[1])
