"""LResNet-IR (insightface ``symbol/fresnet.py``, ``net_unit=3``, output "E").

Stem: ``(x - 127.5) * 0.0078125`` -> conv0 -> bn0 -> PReLU relu0, where conv0 is 3x3/1
(``net_input=1``, the default of every r* preset) or 7x7/2 (``net_input=0``); four stages whose
first unit has stride 2 (112 -> 7); "E" head: bn1 -> Dropout(0.4) -> pre_fc1 -> fc1 (BatchNorm,
fixed gamma).
"""
from mxnet.gluon import nn

from recognition.models.layers import BatchNorm, Conv, Dense, NamedBlock, PReLU

# insightface's fresnet.get_symbol unit counts (basic-block variant, num_layers < 500).
UNITS = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 14, 3],
    100: [3, 13, 30, 3],
}
FILTERS = [64, 64, 128, 256, 512]


class ResidualUnitV3(NamedBlock):
    """IR unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus (conv1x1 + BN) shortcut."""

    def __init__(self, name, in_channels, channels, stride, dim_match, bn_mom=0.9):
        super().__init__(name)
        self.dim_match = dim_match
        self.bn1 = BatchNorm(name + '_bn1', in_channels, momentum=bn_mom)
        self.conv1 = Conv(name + '_conv1', in_channels, channels, 3, 1, 1)
        self.bn2 = BatchNorm(name + '_bn2', channels, momentum=bn_mom)
        self.relu1 = PReLU(name + '_relu1', channels)
        self.conv2 = Conv(name + '_conv2', channels, channels, 3, stride, 1)
        self.bn3 = BatchNorm(name + '_bn3', channels, momentum=bn_mom)
        if not dim_match:
            self.conv1sc = Conv(name + '_conv1sc', in_channels, channels, 1, stride, 0)
            self.sc = BatchNorm(name + '_sc', channels, momentum=bn_mom)

    def hybrid_forward(self, F, x):
        body = self.bn3(self.conv2(self.relu1(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.dim_match else self.sc(self.conv1sc(x))
        return body + shortcut


class EmbeddingE(NamedBlock):
    """insightface's "E" output (symbol_utils.get_fc1): the embedding is ``fc1_output``."""

    def __init__(self, in_channels, spatial, emb_size, bn_mom=0.9, dropout=0.4):
        super().__init__('fc1')
        self._dropout = dropout
        self.bn1 = BatchNorm('bn1', in_channels, momentum=bn_mom)
        self.pre_fc1 = Dense('pre_fc1', in_channels * spatial * spatial, emb_size)
        self.fc1 = BatchNorm('fc1', emb_size, momentum=bn_mom, fix_gamma=True)

    def hybrid_forward(self, F, x):
        x = self.bn1(x)
        if self._dropout > 0:
            x = F.Dropout(x, p=self._dropout)
        return self.fc1(self.pre_fc1(x))


class FResNet(NamedBlock):
    """LResNet-IR for ``input_size`` x ``input_size`` RGB 0..255 NCHW input; returns ``fc1``."""

    def __init__(self, units, filters=FILTERS, emb_size=512, bn_mom=0.9, input_size=112, net_input=1):
        super().__init__('fresnet')
        if len(filters) != len(units) + 1:
            raise ValueError('filters needs one entry for the stem plus one per stage')
        if net_input not in (0, 1):
            raise ValueError('net_input must be 0 (7x7/2 stem) or 1 (3x3/1 stem)')
        if net_input == 0:
            self.conv0 = Conv('conv0', 3, filters[0], 7, 2, 3)
        else:
            self.conv0 = Conv('conv0', 3, filters[0], 3, 1, 1)
        spatial = input_size if net_input else (input_size + 1) // 2
        self.bn0 = BatchNorm('bn0', filters[0], momentum=bn_mom)
        self.relu0 = PReLU('relu0', filters[0])
        self.body = nn.HybridSequential(prefix='')
        in_channels = filters[0]
        for stage, count in enumerate(units, start=1):
            for unit in range(1, count + 1):
                self.body.add(ResidualUnitV3('stage%d_unit%d' % (stage, unit), in_channels,
                                             filters[stage], 2 if unit == 1 else 1, unit > 1, bn_mom))
                in_channels = filters[stage]
            spatial = (spatial + 1) // 2
        self.output = EmbeddingE(in_channels, spatial, emb_size, bn_mom)

    def hybrid_forward(self, F, x):
        x = F.identity(x, name='id')
        x = (x - 127.5) * 0.0078125
        x = self.relu0(self.bn0(self.conv0(x)))
        return self.output(self.body(x))
