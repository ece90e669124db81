"""MobileFaceNet (insightface ``symbol/fmobilefacenet.py``) with the GDC output.

Names follow insightface: ``<name>_conv2d``, ``<name>_batchnorm`` (MXNet's default BN eps 1e-3, as
the symbol code does not set it), ``<name>_relu``; residual blocks ``res_3_block0_conv_sep`` ...;
GDC ``conv_6dw7_7`` -> ``pre_fc1`` -> ``fc1`` (fixed gamma, eps 2e-5).
"""
from mxnet.gluon import nn

from recognition.models.layers import BatchNorm, Conv, Dense, NamedBlock, PReLU

MXNET_BN_EPS = 1e-3


class ConvBlock(NamedBlock):
    """Conv -> BN (-> PReLU unless ``linear``): insightface's ``Conv`` / ``Linear`` helpers."""

    def __init__(self, name, in_channels, channels, kernel=1, stride=1, pad=0, groups=1,
                 linear=False, bn_mom=0.9):
        super().__init__(name)
        self.conv = Conv(name + '_conv2d', in_channels, channels, kernel, stride, pad, groups)
        self.bn = BatchNorm(name + '_batchnorm', channels, eps=MXNET_BN_EPS, momentum=bn_mom)
        self.act = None if linear else PReLU(name + '_relu', channels)

    def hybrid_forward(self, F, x):
        x = self.bn(self.conv(x))
        return x if self.act is None else self.act(x)


class DResidual(NamedBlock):
    """1x1 expand to ``groups`` -> depthwise 3x3 (stride) -> linear 1x1 projection."""

    def __init__(self, name, in_channels, channels, stride, groups, bn_mom=0.9):
        super().__init__(name)
        self.sep = ConvBlock(name + '_conv_sep', in_channels, groups, bn_mom=bn_mom)
        self.dw = ConvBlock(name + '_conv_dw', groups, groups, 3, stride, 1, groups, bn_mom=bn_mom)
        self.proj = ConvBlock(name + '_conv_proj', groups, channels, linear=True, bn_mom=bn_mom)

    def hybrid_forward(self, F, x):
        return self.proj(self.dw(self.sep(x)))


class Residual(NamedBlock):
    """``num_block`` stride-1 DResidual blocks, each with an identity shortcut."""

    def __init__(self, name, num_block, channels, groups, bn_mom=0.9):
        super().__init__(name)
        self.blocks = nn.HybridSequential(prefix='')
        for i in range(num_block):
            self.blocks.add(DResidual('%s_block%d' % (name, i), channels, channels, 1, groups, bn_mom))

    def hybrid_forward(self, F, x):
        for block in self.blocks:
            x = block(x) + x
        return x


class MobileFaceNet(NamedBlock):
    """MobileFaceNet for 112x112 RGB 0..255 NCHW input; ``blocks`` is insightface's ``net_blocks``."""

    def __init__(self, emb_size=128, blocks=(1, 4, 6, 2), bn_mom=0.9):
        super().__init__('mobilefacenet')
        self.conv_1 = ConvBlock('conv_1', 3, 64, 3, 2, 1, bn_mom=bn_mom)
        if blocks[0] == 1:
            self.conv_2 = ConvBlock('conv_2_dw', 64, 64, 3, 1, 1, groups=64, bn_mom=bn_mom)
        else:
            self.conv_2 = Residual('res_2', blocks[0], 64, 64, bn_mom)
        self.dconv_23 = DResidual('dconv_23', 64, 64, 2, 128, bn_mom)
        self.res_3 = Residual('res_3', blocks[1], 64, 128, bn_mom)
        self.dconv_34 = DResidual('dconv_34', 64, 128, 2, 256, bn_mom)
        self.res_4 = Residual('res_4', blocks[2], 128, 256, bn_mom)
        self.dconv_45 = DResidual('dconv_45', 128, 128, 2, 512, bn_mom)
        self.res_5 = Residual('res_5', blocks[3], 128, 256, bn_mom)
        self.conv_6sep = ConvBlock('conv_6sep', 128, 512, bn_mom=bn_mom)
        self.conv_6dw = ConvBlock('conv_6dw7_7', 512, 512, 7, groups=512, linear=True, bn_mom=bn_mom)
        self.pre_fc1 = Dense('pre_fc1', 512, emb_size)
        self.fc1 = BatchNorm('fc1', emb_size, momentum=bn_mom, fix_gamma=True)

    def hybrid_forward(self, F, x):
        x = (x - 127.5) * 0.0078125
        x = self.conv_2(self.conv_1(x))
        x = self.res_3(self.dconv_23(x))
        x = self.res_4(self.dconv_34(x))
        x = self.res_5(self.dconv_45(x))
        x = self.conv_6dw(self.conv_6sep(x))
        return self.fc1(self.pre_fc1(x))
