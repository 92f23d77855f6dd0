"""The smallest networks of each kind, shared by the tests that need a network but not its
quality (export, runtimes, TensorRT logic, batch): a few hundred parameters, instant on a CPU."""

from livedecon.engines._networks import DpsSpec, Network2DSpec, Network3DSpec, UNetSpec
from livedecon.engines._selfnet import SelfNetSpec

TINY_2D = Network2DSpec(
    kind="zs-deconvnet-2d-fast",
    unet=UNetSpec(levels=2, convs_per_block=1, base_width=4),
    tail_width=8,
)
TINY_3D = Network3DSpec(width=4, residual_groups=1, blocks_per_group=1, attention_reduction=2)
# what 3D recipes serve by default: the denoised stack, for Richardson-Lucy to deconvolve
TINY_3D_DENOISED = TINY_3D.model_copy(update={"serve": "denoised"})
TINY_SELFNET = SelfNetSpec(width=8, blocks=1)
# SIM models work on the SR grid: no upsampling
TINY_SIM = TINY_2D.model_copy(update={"upsample": False})
TINY_DPS = DpsSpec(
    unet=UNetSpec(levels=2, convs_per_block=1, base_width=4), feedback_width=4, upsample=False
)
