"""ResNeSt (Zhang et al. 2020, "Split-Attention Networks") with insightface's "E" output: the seed's r50sa / r101sa.

The body is ResNeSt-50 / -101 as published (`2s1x64d`: radix 2, cardinality 1, bottleneck width 64): a deep
stem of three 3x3 convolutions (the first with stride 2), bottleneck units whose 3x3 convolution is a
split-attention convolution, the stride of a unit taken by a 3x3 average pool after it (avd), and shortcuts
that average-pool before their 1x1 convolution (avg-down). ReLU throughout, as ResNeSt.

For 112x112 faces the stem's max-pool is left out, so the stages run at 56, 28, 14 and 7 like insightface's
fresnet, and the "E" head (bn1 -> Dropout 0.4 -> pre_fc1 -> fc1) gives `fc1_output`. `classes > 0` instead
builds the ImageNet model (max-pool, global average pool, a `classes`-way `fc`), the network whose published
size (27.5 M / 48.3 M parameters) and FLOPs the tests check the body against. DropBlock (block 3, on the last
two stages as in ResNeSt) drops only in training mode; with `dropblock=0` it is not in the graph.
"""
from mxnet.gluon import nn

from recognition.models.fresnet import EmbeddingE
from recognition.models.layers import BatchNorm, Conv, Dense, NamedBlock

UNITS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
# ResNeSt's deep-stem width: 32 for ResNeSt-50, 64 from ResNeSt-101 on.
STEM_WIDTH = {50: 32, 101: 64}
PLANES = [64, 128, 256, 512]
EXPANSION = 4
RADIX = 2
CARDINALITY = 1
BOTTLENECK_WIDTH = 64
REDUCTION = 4            # attention bottleneck: channels * radix / 4, at least 32
DROPBLOCK_SIZE = 3
DROPBLOCK_STAGES = (3, 4)


class DropBlock(NamedBlock):
    """DropBlock (Ghiasi et al. 2018): zero `block` x `block` squares seeded with probability
    `p / block**2`, rescale by the kept fraction. The seeds are `Dropout` of ones, so the block is the
    identity in inference mode (also when hybridised) and its draws follow MXNet's seed like Dropout's."""

    def __init__(self, name, p, block=DROPBLOCK_SIZE):
        super().__init__(name)
        self._gamma = p / block ** 2
        self._block = block

    def hybrid_forward(self, F, x):
        seeds = F.Dropout(F.ones_like(x), p=self._gamma) == 0
        dropped = F.Pooling(seeds, kernel=(self._block, self._block), stride=(1, 1),
                            pad=(self._block // 2, self._block // 2), pool_type='max')
        keep = 1 - dropped
        scale = F.BlockGrad(F.size_array(keep).astype('float32') / F.maximum(F.sum(keep), 1.0))
        return F.broadcast_mul(x * keep, scale, name=self.op_name)


class SplitAttention(NamedBlock):
    """The split-attention 3x3 convolution: `radix` grouped branches, summed, pooled, two FCs, a softmax over
    the branches (cardinality 1), and the branches weighted by it."""

    def __init__(self, name, in_channels, channels, bn_mom=0.9):
        super().__init__(name)
        self._channels = channels
        inter = max(channels * RADIX // REDUCTION, 32)
        self.conv = Conv(name + '_conv', in_channels, channels * RADIX, 3, 1, 1, groups=CARDINALITY * RADIX)
        self.bn = BatchNorm(name + '_bn', channels * RADIX, momentum=bn_mom)
        self.fc1 = Dense(name + '_fc1', channels, inter)
        self.bn_fc1 = BatchNorm(name + '_bn_fc1', inter, momentum=bn_mom)
        self.fc2 = Dense(name + '_fc2', inter, channels * RADIX)

    def hybrid_forward(self, F, x):
        x = F.Activation(self.bn(self.conv(x)), act_type='relu')
        splits = F.reshape(x, (0, -4, RADIX, -1, -2))              # N, radix, C, H, W
        gap = F.mean(F.sum(splits, axis=1), axis=(2, 3))            # N, C
        att = F.Activation(self.bn_fc1(self.fc1(gap)), act_type='relu')
        att = F.softmax(F.reshape(self.fc2(att), (0, RADIX, -1)), axis=1)   # N, radix, C
        return F.sum(F.broadcast_mul(splits, F.reshape(att, (0, 0, 0, 1, 1))), axis=1, name=self.op_name)


class SplitBottleneck(NamedBlock):
    """ResNeSt unit: 1x1 -> split-attention 3x3 -> (3x3 avg pool, stride) -> 1x1 (x4), plus the shortcut
    (avg pool of the stride, then 1x1 + BN) when the shape changes; DropBlock after each BN when enabled."""

    def __init__(self, name, in_channels, planes, stride, downsample, dropblock=0.0, bn_mom=0.9):
        super().__init__(name)
        width = int(planes * BOTTLENECK_WIDTH / 64) * CARDINALITY
        out_channels = planes * EXPANSION
        self._stride = stride
        self._downsample = downsample
        self.conv1 = Conv(name + '_conv1', in_channels, width, 1)
        self.bn1 = BatchNorm(name + '_bn1', width, momentum=bn_mom)
        self.splat = SplitAttention(name + '_splat', width, width, bn_mom)
        self.conv3 = Conv(name + '_conv3', width, out_channels, 1)
        self.bn3 = BatchNorm(name + '_bn3', out_channels, momentum=bn_mom)
        self.drop1, self.drop2, self.drop3 = ([DropBlock(name + '_drop%d' % i, dropblock) for i in (1, 2, 3)]
                                              if dropblock > 0 else [None] * 3)
        if downsample:
            self.conv1sc = Conv(name + '_conv1sc', in_channels, out_channels, 1)
            self.sc = BatchNorm(name + '_sc', out_channels, momentum=bn_mom)

    @staticmethod
    def _dropped(block, x):
        return x if block is None else block(x)

    def hybrid_forward(self, F, x):
        out = self._dropped(self.drop1, F.Activation(self.bn1(self.conv1(x)), act_type='relu'))
        out = self._dropped(self.drop2, self.splat(out))
        if self._stride > 1:
            out = F.Pooling(out, kernel=(3, 3), stride=(self._stride,) * 2, pad=(1, 1), pool_type='avg')
        out = self._dropped(self.drop3, self.bn3(self.conv3(out)))
        shortcut = x
        if self._downsample:
            if self._stride > 1:
                shortcut = F.Pooling(x, kernel=(self._stride,) * 2, stride=(self._stride,) * 2, pool_type='avg',
                                     pooling_convention='full', count_include_pad=False)
            shortcut = self.sc(self.conv1sc(shortcut))
        return F.Activation(out + shortcut, act_type='relu', name=self.op_name + '_relu')


class ResNeSt(NamedBlock):
    """ResNeSt-`num_layers` for RGB 0..255 NCHW input; returns `fc1` (or ImageNet logits when `classes`)."""

    def __init__(self, num_layers, emb_size=512, dropblock=0.0, bn_mom=0.9, input_size=112, classes=0):
        super().__init__('resnest')
        self._classes = classes
        stem = STEM_WIDTH[num_layers]
        self.conv0 = Conv('conv0', 3, stem, 3, 2, 1)
        self.bn0 = BatchNorm('bn0', stem, momentum=bn_mom)
        self.conv0_2 = Conv('conv0_2', stem, stem, 3, 1, 1)
        self.bn0_2 = BatchNorm('bn0_2', stem, momentum=bn_mom)
        self.conv0_3 = Conv('conv0_3', stem, stem * 2, 3, 1, 1)
        self.bn0_3 = BatchNorm('bn0_3', stem * 2, momentum=bn_mom)
        spatial = (input_size + 1) // 2
        if classes:
            spatial = (spatial + 1) // 2     # the ImageNet stem's 3x3/2 max-pool
        self.body = nn.HybridSequential(prefix='')
        in_channels = stem * 2
        for stage, (count, planes) in enumerate(zip(UNITS[num_layers], PLANES), start=1):
            drop = dropblock if stage in DROPBLOCK_STAGES else 0.0
            for unit in range(1, count + 1):
                stride = 2 if unit == 1 and stage > 1 else 1
                self.body.add(SplitBottleneck('stage%d_unit%d' % (stage, unit), in_channels, planes, stride,
                                              unit == 1, drop, bn_mom))
                in_channels = planes * EXPANSION
            if stage > 1:
                spatial = (spatial + 1) // 2
        if classes:
            self.output = Dense('fc', in_channels, classes)
        else:
            self.output = EmbeddingE(in_channels, spatial, emb_size, bn_mom)

    def hybrid_forward(self, F, x):
        x = F.identity(x, name='id')
        x = (x - 127.5) * 0.0078125
        x = F.Activation(self.bn0(self.conv0(x)), act_type='relu', name='relu0')
        x = F.Activation(self.bn0_2(self.conv0_2(x)), act_type='relu', name='relu0_2')
        x = F.Activation(self.bn0_3(self.conv0_3(x)), act_type='relu', name='relu0_3')
        if self._classes:
            x = F.Pooling(x, kernel=(3, 3), stride=(2, 2), pad=(1, 1), pool_type='max')
        x = self.body(x)
        if self._classes:
            x = F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type='avg')
        return self.output(x)
