"""Classification heads on the embedding: insightface's margin softmax family, the FairFace seed's
arc-circle loss and its other class-level and pair-wise (triplet) losses, center loss and attribute
(gender / age) heads; `AuxiliaryTasks` trains the last two beside the margin loss (`--center-loss-weight`,
`--attr-heads`). Formulas: docs/losses.md.

Class-level heads return logits; the loss is softmax cross-entropy over them (insightface's
``SoftmaxOutput(normalization='valid')`` averaged over the batch; `HeadLoss`, with label smoothing).  The
classifier weight is ``fc7_weight`` (classes x emb) as in insightface, so checkpoints keep it under that
name.  Pair-wise heads return their own per-sample loss on triplet batches.
"""
import inspect
import json
import math

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from recognition.config import HEAD_ARGS, preset
from recognition.utils import UserError

__all__ = ['MarginHead', 'ArcCircleHead', 'CenterLoss', 'AttributeHead', 'AuxiliaryTasks', 'build_auxiliary',
           'build_head', 'head_preset', 'HEAD_TYPES', 'SvxSoftmaxHead', 'SoftmaxCircleHead', 'FixArcCircleHead',
           'TripletHead', 'FusionHead', 'SoftmaxLoss', 'HeadLoss', 'triplet_batches']

# Clip for cos(theta) before arccos: rounding can push a dot product of unit vectors to or just
# past +-1, where arccos is NaN or its gradient infinite (insightface does not guard this).  Only
# |cos| > 1 - 1e-6, i.e. theta within ~0.08 degrees of 0 or pi, is affected.
_COS_LIMIT = 1.0 - 1e-6


def _scaled_cosine(F, emb, weight, num_classes, scale=1.0):
    """``scale * cos(theta)`` of every embedding to every fc7 row, computed as insightface does
    (L2-normalised embedding times ``scale``, then FullyConnected with the normalised weight)."""
    x = F.L2Normalization(emb, mode='instance', name='fc1n')
    if scale != 1.0:
        x = x * scale
    w = F.L2Normalization(weight, mode='instance')
    return F.FullyConnected(x, w, no_bias=True, num_hidden=num_classes, name='fc7')


class _Fc7Head(gluon.HybridBlock):
    """Owns ``fc7_weight`` with insightface's Normal(0.01) init and lr / wd multipliers."""

    def __init__(self, num_classes, emb_size, fc7_lr_mult=1.0, fc7_wd_mult=1.0, prefix=''):
        super().__init__(prefix=prefix)
        self.num_classes = num_classes
        self.fc7_weight = self.params.get('fc7_weight', shape=(num_classes, emb_size),
                                          init=mx.init.Normal(0.01), lr_mult=fc7_lr_mult,
                                          wd_mult=fc7_wd_mult)

    def cosine(self, emb):
        """cos(theta_j) of ``emb`` (NDArray) to every class: the un-margined scores, for accuracy
        and hard-sample mining (argmax equals the prediction of the head without its margin; for
        the plain softmax head, which has no normalisation, it ignores weight norms and bias)."""
        return _scaled_cosine(mx.nd, emb, self.fc7_weight.data(emb.context), self.num_classes)


class MarginHead(_Fc7Head):
    """insightface's ``margin_softmax``: target logit ``s * (cos(m1 * theta + m2) - m3)``.

    * ``s`` None or 0: plain softmax, ``FullyConnected(emb, fc7_weight, fc7_bias)`` with the bias
      at lr x2 and no weight decay (``no_bias=True`` drops it, insightface's ``fc7_no_bias``).
    * ``m1 == 1, m2 == 0`` (CosFace, or nsoftmax when m3 == 0): ``s * cos - s * m3`` on the target.
    * ArcFace (``m1 == 1, m2 > 0, m3 == 0``): as the old ``train_softmax`` loss_type 4, where
      ``theta + m2 > pi`` (cos <= cos(pi - m2)) the target logit is ``s * (cos - m2 * sin(m2))``
      instead of the non-monotonic ``s * cos(theta + m2)``; ``easy_margin`` applies the margin only
      where cos > 0 and keeps the plain logit elsewhere.
    * any other m1 / m2 / m3: the combined formula through arccos, as insightface's train.py.
    """

    def __init__(self, num_classes, emb_size, s=64.0, m1=1.0, m2=0.0, m3=0.0, easy_margin=False,
                 fc7_lr_mult=1.0, fc7_wd_mult=1.0, prefix='', no_bias=False):
        super().__init__(num_classes, emb_size, fc7_lr_mult, fc7_wd_mult, prefix)
        self.s, self.m1, self.m2, self.m3 = (float(s) if s else 0.0), float(m1), float(m2), float(m3)
        self.easy_margin = bool(easy_margin)
        self.arcface = self.m1 == 1.0 and self.m2 > 0.0 and self.m3 == 0.0
        if self.easy_margin and not self.arcface:
            raise ValueError('easy_margin applies to ArcFace only (m1=1, m2>0, m3=0)')
        if self.arcface and not 0.0 <= self.m2 < math.pi / 2:
            raise ValueError('ArcFace margin m2 must be in [0, pi/2)')
        self.fc7_bias = None
        if not self.s and not no_bias:
            self.fc7_bias = self.params.get('fc7_bias', shape=(num_classes,), init='zeros',
                                            lr_mult=2.0, wd_mult=0.0)

    def hybrid_forward(self, F, emb, label, fc7_weight, fc7_bias=None):
        if not self.s:
            if fc7_bias is None:
                return F.FullyConnected(emb, fc7_weight, no_bias=True, num_hidden=self.num_classes, name='fc7')
            return F.FullyConnected(emb, fc7_weight, fc7_bias, num_hidden=self.num_classes, name='fc7')
        s = self.s
        fc7 = _scaled_cosine(F, emb, fc7_weight, self.num_classes, s)
        if self.m1 == 1.0 and self.m2 == 0.0:
            if self.m3 == 0.0:
                return fc7
            return fc7 - F.one_hot(label, depth=self.num_classes, on_value=s * self.m3, off_value=0.0)
        zy = F.pick(fc7, label, axis=1)
        cos_t = F.clip(zy / s, -_COS_LIMIT, _COS_LIMIT)
        theta = F.arccos(cos_t)
        new_zy = (F.cos(theta * self.m1 + self.m2) - self.m3) * s
        if self.arcface:
            if self.easy_margin:
                cond, zy_keep = cos_t > 0.0, zy
            else:
                cond = cos_t > math.cos(math.pi - self.m2)
                zy_keep = zy - s * math.sin(math.pi - self.m2) * self.m2
            new_zy = F.where(cond, new_zy, zy_keep)
        diff = F.expand_dims(new_zy - zy, 1)
        return fc7 + F.broadcast_mul(F.one_hot(label, depth=self.num_classes), diff)


class ArcCircleHead(_Fc7Head):
    """The FairFace seed's ``arc_circle_softmax`` (class_level_loss.py).

    With theta = arccos(cos) and margin ``m``: target ``cos(clip(theta + m, 0, pi)) *
    relu(theta + pi - m)``, others ``cos(clip(theta + pi - m, 0, pi)) * relu(m - theta)``, all
    times ``gamma``.
    """

    def __init__(self, num_classes, emb_size, gamma=64.0, margin=0.65 * math.pi,
                 fc7_lr_mult=1.0, fc7_wd_mult=1.0, prefix=''):
        super().__init__(num_classes, emb_size, fc7_lr_mult, fc7_wd_mult, prefix)
        self.gamma, self.margin = float(gamma), float(margin)

    def hybrid_forward(self, F, emb, label, fc7_weight):
        m = self.margin
        theta = F.arccos(F.clip(_scaled_cosine(F, emb, fc7_weight, self.num_classes), -_COS_LIMIT, _COS_LIMIT))
        shift = F.one_hot(label, depth=self.num_classes, on_value=m, off_value=math.pi - m)
        offset = F.one_hot(label, depth=self.num_classes, on_value=math.pi - m, off_value=m)
        sign = F.one_hot(label, depth=self.num_classes, on_value=1.0, off_value=-1.0)
        margin_cos = F.cos(F.clip(theta + shift, 0.0, math.pi))
        weight = F.relu(theta * sign + offset)
        return margin_cos * weight * self.gamma


class CenterLoss(gluon.Block):
    """Center loss (Wen et al. 2016), the HW_face auxiliary: ``0.5 * ||x - c_y||^2`` per sample.

    The centers are not trained by the optimizer: in a training forward pass each center moves by
    ``alpha * sum_i(x_i - c_j) / (1 + n_j)`` over the batch's samples of class j.  The update is
    applied to every context's copy, so data-parallel devices keep identical centers.
    """

    def __init__(self, num_classes, emb_size, alpha=0.5, prefix='centerloss_'):
        super().__init__(prefix=prefix)
        self.num_classes, self.alpha = num_classes, float(alpha)
        self.centers = self.params.get('centers', shape=(num_classes, emb_size), init='zeros',
                                       grad_req='null', differentiable=False)

    def forward(self, emb, label):
        centers = self.centers.data(emb.context)
        diff = emb - mx.nd.take(centers, label)
        loss = 0.5 * mx.nd.sum(diff * diff, axis=1)
        if autograd.is_training():
            with autograd.pause():
                self._update(diff.detach(), label)
        return loss

    def _update(self, diff, label):
        one_hot = mx.nd.one_hot(label, self.num_classes)                  # N x K
        counts = mx.nd.sum(one_hot, axis=0).reshape((-1, 1))               # K x 1
        delta = mx.nd.dot(one_hot, diff, transpose_a=True) / (1.0 + counts)
        for copy in self.centers.list_data():
            copy += self.alpha * delta.as_in_context(copy.context)


class AttributeHead(gluon.HybridBlock):
    """Multi-task classifier on the embedding (gender, age group): Dense+PReLU layers then logits.

    Its logits feed their own SoftmaxCrossEntropyLoss, weighted against the identity loss.
    """

    def __init__(self, emb_size, num_classes, hidden=(512,), prefix='attr_'):
        super().__init__(prefix=prefix)
        with self.name_scope():
            self.body = gluon.nn.HybridSequential()
            in_units = emb_size
            for units in hidden:
                self.body.add(gluon.nn.Dense(units, in_units=in_units), gluon.nn.PReLU())
                in_units = units
            self.body.add(gluon.nn.Dense(num_classes, in_units=in_units))

    def hybrid_forward(self, F, emb):
        return self.body(emb)



class AuxiliaryTasks(gluon.Block):
    """The auxiliary losses trained beside the margin loss on the same embedding:
    ``total = margin + center_weight * center + sum_a weight_a * attribute_a`` (per sample).

    ``attributes``: ``[(name, label column, num_classes, weight, class names)]``; the label column
    indexes the dataset's ``[identity, *attributes]`` vector.  An attribute code of -1 (unknown)
    gives no loss and no gradient; each attribute loss is rescaled by batch / known so it is the
    mean over the samples whose code is known (unknowns do not dilute the task weight).
    Parameters: ``centerloss_centers`` and ``attr_<name>_*``; exported outputs ``attr_<name>_output``.
    """

    def __init__(self, emb_size, num_classes, center_weight=0.0, center_alpha=0.5, attributes=(),
                 hidden=(512,)):
        super().__init__(prefix='')
        self.center_weight = float(center_weight)
        self.attributes = [tuple(a) for a in attributes]
        self.center = CenterLoss(num_classes, emb_size, center_alpha) if self.center_weight > 0 else None
        self.heads = [AttributeHead(emb_size, n, hidden, prefix='attr_%s_' % name)
                      for name, _, n, _, _ in self.attributes]
        for head in self.heads:
            self.register_child(head)
        self._ce = gluon.loss.SoftmaxCrossEntropyLoss()
        self._window = {}

    def split_labels(self, label, contexts):
        """Per context ``(codes N_i x A NDArray, scales)`` from the batch's ``[identity, *attributes]``."""
        label = label.asnumpy() if isinstance(label, mx.nd.NDArray) else np.asarray(label)
        codes = label[:, [column for _, column, _, _, _ in self.attributes]].reshape(len(label), -1)
        for j, (name, _, n, _, _) in enumerate(self.attributes):
            bad = (codes[:, j] >= n) | ((codes[:, j] < 0) & (codes[:, j] != -1)) | (codes[:, j] % 1 != 0)
            if bad.any():
                raise UserError('attribute %s: label code %g outside 0..%d (or -1 for unknown)'
                                % (name, codes[bad, j][0], n - 1))
        known = (codes >= 0).sum(axis=0)
        scales = [len(codes) / k if k else 0.0 for k in known]
        parts = gluon.utils.split_and_load(mx.nd.array(codes), contexts)
        return [(p, scales) for p in parts]

    def forward(self, emb, identity, labels, margin_loss):
        """``(total per-sample loss, record)``; ``labels`` is one item of :meth:`split_labels` and
        ``record`` goes to :meth:`account` after the backward pass."""
        codes, scales = labels
        total = margin_loss
        record = {'n': emb.shape[0], 'margin_loss': margin_loss}
        if self.center is not None:
            center = self.center(emb, identity)
            total = total + self.center_weight * center
            record['center_loss'] = center
        for j, ((name, _, _, weight, _), head) in enumerate(zip(self.attributes, self.heads)):
            code = codes[:, j]
            known = code >= 0
            logits = head(emb)
            loss = self._ce(logits, mx.nd.relu(code)) * known      # -1 becomes class 0, then masked out
            total = total + (weight * scales[j]) * loss
            record[name] = (loss, logits, code, known)
        return total, record

    def account(self, records):
        """Add a step's records to the log window."""
        window = self._window
        for r in records:
            window['n'] = window.get('n', 0) + r['n']
            for key in ('margin_loss', 'center_loss'):
                if key in r:
                    window[key] = window.get(key, 0.0) + float(r[key].sum().asscalar())
            for name, _, _, _, _ in self.attributes:
                loss, logits, code, known = r[name]
                hits = (logits.argmax(axis=1) == code) * known
                sums = window.setdefault(name, [0.0, 0, 0])
                sums[0] += float(loss.sum().asscalar())
                sums[1] += int(hits.sum().asscalar())
                sums[2] += int(known.sum().asscalar())

    def window(self):
        """Means since the last call: margin_loss, center_loss, attr_<name>_loss / _acc (over known codes)."""
        window, self._window = self._window, {}
        n = max(1, window.get('n', 0))
        out = {key: window[key] / n for key in ('margin_loss', 'center_loss') if key in window}
        for name, _, _, _, _ in self.attributes:
            loss, hits, known = window.get(name, (0.0, 0, 0))
            out['attr_%s_loss' % name] = loss / known if known else float('nan')
            out['attr_%s_acc' % name] = hits / known if known else float('nan')
        return out

    def output_symbols(self, emb):
        """The attribute heads' class probabilities as graph outputs ``attr_<name>_output``; each
        node carries its class names in the ``__classes__`` attribute (JSON list)."""
        return [mx.sym.softmax(head(emb), name='attr_' + name, attr={'__classes__': json.dumps(list(classes))})
                for (name, _, _, _, classes), head in zip(self.attributes, self.heads)]


def _attribute_classes(dataset, name):
    """(num_classes, class names) of a categorical attribute: its codes in the rec's sidecar, else
    the largest code in the data + 1."""
    codes = dataset.attribute_codes.get(name) or {}
    if codes:
        n = max(codes) + 1
    else:
        values = dataset.sample_attributes[:, dataset.attribute_names.index(name)]
        if (values % 1 != 0).any() or (values < -1).any():
            raise UserError('%s: attribute %s is not categorical (codes must be integers, -1 unknown)'
                            % (dataset.rec_paths[0], name))
        n = int(values.max()) + 1
    if n < 2:
        raise UserError('%s: attribute %s has fewer than two classes' % (dataset.rec_paths[0], name))
    return n, [codes.get(i, str(i)) for i in range(n)]


def build_auxiliary(dataset, emb_size, center_weight=0.0, center_alpha=0.5, attr_heads='', attr_weights='',
                    hidden=(512,)):
    """The :class:`AuxiliaryTasks` of ``--center-loss-weight`` and ``--attr-heads gender,age
    --attr-weights 1.0,0.5`` (names as in the rec's ``.attributes.json``), or None when both are off."""
    names = [n.strip() for n in str(attr_heads or '').split(',') if n.strip()]
    if not names and not center_weight:
        return None
    if center_weight < 0:
        raise UserError('--center-loss-weight %g: must be >= 0 (0 = off)' % center_weight)
    weights = [w.strip() for w in str(attr_weights or '').split(',') if w.strip()]
    try:
        weights = [float(w) for w in weights] or [1.0] * len(names)
    except ValueError:
        raise UserError('--attr-weights %r: expected comma-separated numbers' % attr_weights) from None
    if len(weights) != len(names):
        raise UserError('--attr-weights %r: %d weights for %d --attr-heads' % (attr_weights, len(weights), len(names)))
    attributes = []
    if names:
        where = dataset.rec_paths[0] if hasattr(dataset, 'rec_paths') else 'dataset'
        if not getattr(dataset, 'return_attributes', False):
            raise UserError('%s: --attr-heads needs a dataset that returns attributes' % where)
        lower = {a.lower(): a for a in dataset.attribute_names}
        for name, weight in zip(names, weights):
            if name.lower() not in lower:
                raise UserError('%s: no attribute %r for --attr-heads (the .attributes.json sidecar names %s)'
                                % (where, name, dataset.attribute_names or 'none'))
            real = lower[name.lower()]
            n, classes = _attribute_classes(dataset, real)
            attributes.append((real, 1 + dataset.attribute_names.index(real), n, weight, classes))
    return AuxiliaryTasks(emb_size, int(dataset.num_classes), center_weight, center_alpha, attributes, hidden)


# --- The FairFace seed's other heads (class_level_loss.py, pair_wise_loss.py) -----------------------------
# Formulas: docs/losses.md. Parameter checks raise UserError naming the CLI flag, since the values come from it.

def _check(ok, flag, value, rule):
    if not ok:
        raise UserError(f'{flag} {value:g}: {rule}')


def _cos_theta(F, emb, weight, num_classes):
    """(cos, theta) of every embedding to every fc7 row, theta from the clipped cosine."""
    cos = _scaled_cosine(F, emb, weight, num_classes)
    return cos, F.arccos(F.clip(cos, -_COS_LIMIT, _COS_LIMIT))


class SvxSoftmaxHead(_Fc7Head):
    """The seed's ``svx_softmax`` (``--loss marginface``): the target logit with the combined margin,
    ``cos(m1*theta_y + m2) - m3``; every non-target logit ``c_j = cos(theta_j / nm1 - nm2) + nm3`` (plain
    ``cos_j`` without non-target margins) and, where the sample is hard for that class (``cos_j`` >= the
    margined target), re-weighted by the mask t as ``t*c_j + t - 1``; all times s.

    As in the seed there is no guard for ``m1*theta + m2 > pi``.  Unlike the seed the hard-negative mask also
    applies when every target margin is 0 (the seed skipped the whole block then, and crashed for m1=1, m2=0,
    m3>0 on an undefined target).
    """

    def __init__(self, num_classes, emb_size, s=64.0, m1=1.0, m2=0.5, m3=0.0, nm1=1.0, nm2=0.0, nm3=0.0,
                 mask=1.0, fc7_lr_mult=1.0, fc7_wd_mult=1.0, prefix=''):
        super().__init__(num_classes, emb_size, fc7_lr_mult, fc7_wd_mult, prefix)
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.nm1, self.nm2, self.nm3, self.mask = float(nm1), float(nm2), float(nm3), float(mask)
        _check(self.s > 0, '--loss-s', self.s, 'the scale must be > 0')
        _check(self.mask >= 1, '--loss-mask', self.mask, 'must be >= 1 (1 leaves hard negatives as they are)')
        for flag, value, low in (('--loss-m1', self.m1, 1), ('--loss-nm1', self.nm1, 1), ('--loss-m2', self.m2, 0),
                                 ('--loss-m3', self.m3, 0), ('--loss-nm2', self.nm2, 0), ('--loss-nm3', self.nm3, 0)):
            _check(value >= low, flag, value, f'a margin must be >= {low} (margins make the loss harder)')

    def hybrid_forward(self, F, emb, label, fc7_weight):
        cos, theta = _cos_theta(F, emb, fc7_weight, self.num_classes)
        if self.m1 == 1.0 and self.m2 == 0.0:
            target = F.pick(cos, label, axis=1) - self.m3
        else:
            target = F.cos(F.pick(theta, label, axis=1) * self.m1 + self.m2) - self.m3
        other = cos
        if self.nm1 != 1.0 or self.nm2 != 0.0 or self.nm3 != 0.0:
            other = F.cos(theta / self.nm1 - self.nm2) + self.nm3
        is_target = F.one_hot(label, depth=self.num_classes)
        target = F.expand_dims(target, 1)
        hard = F.broadcast_greater_equal(cos, target) * (1 - is_target)
        t = self.mask
        other = other + hard * ((t - 1.0) * other + t - 1.0)
        return (F.broadcast_mul(is_target, target) + (1 - is_target) * other) * self.s


class SoftmaxCircleHead(_Fc7Head):
    """The seed's ``softmax_circle_loss``: circle loss (Sun et al., CVPR 2020) with one positive per sample,
    on the cosine mapped to [0, 1], ``c = (cos + 1) / 2``: target ``gamma * relu(1 + m - c) * (c - (1 - m))``,
    others ``gamma * relu(c + m) * (c - m)``; softmax cross-entropy over these is the paper's
    ``log(1 + sum_j exp(gamma a_n (c_j - m)) exp(-gamma a_p (c_y - 1 + m)))``.  The weights a_p, a_n are
    not detached (the seed's graph)."""

    def __init__(self, num_classes, emb_size, gamma=64.0, margin=0.25, fc7_lr_mult=1.0, fc7_wd_mult=1.0,
                 prefix=''):
        super().__init__(num_classes, emb_size, fc7_lr_mult, fc7_wd_mult, prefix)
        self.gamma, self.margin = float(gamma), float(margin)
        _check(self.gamma > 0, '--loss-gamma', self.gamma, 'the scale must be > 0')
        _check(0 <= self.margin < 0.5, '--loss-margin', self.margin,
               'the circle relaxation must be in [0, 0.5) (optima 1 + m and -m, decision margins 1 - m > m)')

    def hybrid_forward(self, F, emb, label, fc7_weight):
        m, k = self.margin, self.num_classes
        c = _scaled_cosine(F, emb, fc7_weight, k) * 0.5 + 0.5
        sign = F.one_hot(label, depth=k, on_value=-1.0, off_value=1.0)
        optimum = F.one_hot(label, depth=k, on_value=1.0 + m, off_value=m)
        delta = F.one_hot(label, depth=k, on_value=1.0 - m, off_value=m)
        return F.relu(c * sign + optimum) * (c - delta) * self.gamma


class FixArcCircleHead(_Fc7Head):
    """The seed's ``fix_arc_circle_softmax``: arc_circle with fixed optima and an offset.  With
    d = 0.1 * (2 pi - 2 m): target ``cos(clip(theta + m, 0, pi)) * relu(theta + pi - m) + d``, others
    ``cos(clip(theta - m, 0, pi)) * relu(2 pi - m - theta) - d``, all times gamma."""

    def __init__(self, num_classes, emb_size, gamma=64.0, margin=0.65 * math.pi, fc7_lr_mult=1.0,
                 fc7_wd_mult=1.0, prefix=''):
        super().__init__(num_classes, emb_size, fc7_lr_mult, fc7_wd_mult, prefix)
        self.gamma, self.margin = float(gamma), float(margin)
        _check(self.gamma > 0, '--loss-gamma', self.gamma, 'the scale must be > 0')
        _check(0 < self.margin < math.pi, '--loss-margin', self.margin, 'the angular margin must be in (0, pi)')

    def hybrid_forward(self, F, emb, label, fc7_weight):
        m, k = self.margin, self.num_classes
        _, theta = _cos_theta(F, emb, fc7_weight, k)
        shift = F.one_hot(label, depth=k, on_value=m, off_value=-m)
        optimum = F.one_hot(label, depth=k, on_value=math.pi - m, off_value=2 * math.pi - m)
        sign = F.one_hot(label, depth=k, on_value=1.0, off_value=-1.0)
        offset = sign * (0.1 * (2 * math.pi - 2 * m))
        return (F.cos(F.clip(theta + shift, 0.0, math.pi)) * F.relu(theta * sign + optimum) + offset) * self.gamma


PAIR_LOSSES = ('triplet', 'atriplet', 'arc_circle_triplet', 'fix_arc_circle_triplet')
MINING = ('hardest', 'semihard')


class TripletHead(gluon.HybridBlock):
    """The seed's pair-wise losses on a triplet batch, with the negative mined within the batch.

    The batch (one context's) is ``[anchors | positives | negative slots]``, T rows each (the sampler of
    ``recognition.data.triplets``).  Embeddings are L2-normalised.  Each anchor's negative is a sample of
    the batch with another label: ``hardest`` the most similar one, ``semihard`` the most similar one that is
    still less similar than the positive (FaceNet), or the least similar one if there is none (as
    TensorFlow's semi-hard triplet loss).  The losses of (cos_ap, cos_an) per triplet:

    * ``triplet``: ``relu(|a-p|^2 - |a-n|^2 + alpha)``; ``atriplet``: ``relu(theta_ap - theta_an + alpha)``;
    * ``fix_arc_circle_triplet``: ``relu(s_n - s_p)`` with the fix_arc_circle logits (gamma, margin);
    * ``arc_circle_triplet``: one value per batch, ``log(1 + sum exp(s_n) * sum exp(-s_p))`` with the
      arc_circle logits at gamma / pi (computed as softplus of two log-sum-exps).

    Returns ``(loss, hit)`` per sample: each sample carries its triplet's loss (the batch loss for
    arc_circle_triplet), so the mean over the batch is the mean over triplets; ``hit`` is 1 where the
    positive is more similar than every negative of the batch, whatever the mining.  No fc7:
    ``num_classes``, ``emb_size`` and the fc7 multipliers are accepted for the registry's one constructor
    signature.
    """

    triplet_batches = True

    def __init__(self, num_classes, emb_size, kind='triplet', alpha=0.3, mining='semihard', gamma=64.0,
                 margin=0.65 * math.pi, fc7_lr_mult=1.0, fc7_wd_mult=1.0, prefix=''):
        super().__init__(prefix=prefix)
        if kind not in PAIR_LOSSES:
            raise ValueError(f'unknown pair-wise loss {kind!r} (choose from {", ".join(PAIR_LOSSES)})')
        if mining not in MINING:
            raise UserError(f'--triplet-mining {mining!r}: choose {" or ".join(MINING)}')
        self.kind, self.mining = kind, mining
        self.alpha, self.gamma, self.margin = float(alpha), float(gamma), float(margin)
        _check(self.alpha >= 0, '--triplet-alpha', self.alpha, 'the triplet margin must be >= 0')
        _check(self.gamma > 0, '--loss-gamma', self.gamma, 'the scale must be > 0')
        _check(0 < self.margin < math.pi, '--loss-margin', self.margin, 'the angular margin must be in (0, pi)')

    def _mine(self, F, sim, cos_ap, neg):
        """(cos(anchor, mined negative), cos(anchor, hardest negative) without gradient) from the T x N
        similarities and the 0/1 negative mask."""
        score = F.BlockGrad(sim)
        hardest = F.argmax(F.where(neg, score, score * 0 - 3.0), axis=1)
        chosen = hardest
        if self.mining == 'semihard':
            easier = neg * F.broadcast_lesser(score, F.expand_dims(F.BlockGrad(cos_ap), 1))
            semihard = F.argmax(F.where(easier, score, score * 0 - 3.0), axis=1)
            easiest = F.argmin(F.where(neg, score, score * 0 + 3.0), axis=1)
            chosen = F.where(F.max(easier, axis=1) > 0, semihard, easiest)
        return F.pick(sim, chosen, axis=1), F.pick(score, hardest, axis=1)

    def _circle_logits(self, F, cos_ap, cos_an, gamma, fixed):
        m = self.margin
        tp = F.arccos(F.clip(cos_ap, -_COS_LIMIT, _COS_LIMIT))
        tn = F.arccos(F.clip(cos_an, -_COS_LIMIT, _COS_LIMIT))
        sp = gamma * F.relu(tp + math.pi - m) * F.cos(F.clip(tp + m, 0.0, math.pi))
        if fixed:
            sn = gamma * F.relu(2 * math.pi - m - tn) * F.cos(F.clip(tn - m, 0.0, math.pi))
        else:
            sn = gamma * F.relu(m - tn) * F.cos(F.clip(tn + math.pi - m, 0.0, math.pi))
        return sp, sn

    def hybrid_forward(self, F, emb, label):
        x = F.L2Normalization(emb, mode='instance')
        anchor, positive, _ = F.split(F.reshape(x, shape=(-4, 3, -1, -2)), num_outputs=3, axis=0,
                                      squeeze_axis=True)
        anchor_label = F.split(F.reshape(label, shape=(3, -1)), num_outputs=3, axis=0, squeeze_axis=True)[0]
        cos_ap = F.sum(anchor * positive, axis=1)
        sim = F.dot(anchor, x, transpose_b=True)
        neg = F.broadcast_not_equal(F.expand_dims(anchor_label, 1), F.expand_dims(label, 0))
        cos_an, cos_hardest = self._mine(F, sim, cos_ap, neg)
        if self.kind == 'triplet':
            loss = F.relu((2 - 2 * cos_ap) - (2 - 2 * cos_an) + self.alpha)
        elif self.kind == 'atriplet':
            loss = F.relu(F.arccos(F.clip(cos_ap, -_COS_LIMIT, _COS_LIMIT))
                          - F.arccos(F.clip(cos_an, -_COS_LIMIT, _COS_LIMIT)) + self.alpha)
        elif self.kind == 'fix_arc_circle_triplet':
            sp, sn = self._circle_logits(F, cos_ap, cos_an, self.gamma, fixed=True)
            loss = F.relu(sn - sp)
        else:
            sp, sn = self._circle_logits(F, cos_ap, cos_an, self.gamma / math.pi, fixed=False)
            loss = F.Activation(_log_sum_exp(F, sn) + _log_sum_exp(F, -sp), act_type='softrelu')
            loss = F.broadcast_like(F.reshape(loss, shape=(1,)), cos_ap)
        hit = F.BlockGrad(cos_ap) > cos_hardest
        return F.concat(loss, loss, loss, dim=0), F.concat(hit, hit, hit, dim=0)


def _log_sum_exp(F, v):
    top = F.BlockGrad(F.max(v))
    return F.log(F.sum(F.exp(F.broadcast_sub(v, top)))) + top


class FusionHead(gluon.HybridBlock):
    """The seed's ``<pair>_fusion_<class>`` losses: a class-level head (its ``fc7_weight``) and a pair-wise
    loss on the same triplet batch, ``softmax CE(class logits) + weight * pair loss`` per sample (the seed
    adds the two with weight 1, and fills a quarter of its batch with unpaired images; here the negative
    slots of the triplets play that part).  Returns ``(logits, weight * pair loss)``; :class:`HeadLoss` adds
    the cross-entropy."""

    triplet_batches = True

    def __init__(self, num_classes, emb_size, pair='triplet', classes='arc_circle', weight=1.0, alpha=0.3,
                 mining='semihard', gamma=64.0, margin=0.65 * math.pi, fc7_lr_mult=1.0, fc7_wd_mult=1.0,
                 prefix=''):
        super().__init__(prefix=prefix)
        self.weight = float(weight)
        _check(self.weight >= 0, '--triplet-weight', self.weight, 'the pair-wise loss weight must be >= 0')
        cls, base = HEAD_TYPES[classes]
        self.classifier = cls(num_classes, emb_size, **dict(base, gamma=gamma, margin=margin),
                              fc7_lr_mult=fc7_lr_mult, fc7_wd_mult=fc7_wd_mult, prefix='')
        self.pair = TripletHead(num_classes, emb_size, pair, alpha=alpha, mining=mining, gamma=gamma,
                                margin=margin)
        self.num_classes = num_classes
        self.alpha, self.mining, self.gamma, self.margin = self.pair.alpha, mining, float(gamma), float(margin)

    def cosine(self, emb):
        """The class-level head's cos(theta_j) (accuracy, hard samples, ``--fpr-penalty``)."""
        return self.classifier.cosine(emb)

    def hybrid_forward(self, F, emb, label):
        return self.classifier(emb, label), self.pair(emb, label)[0] * self.weight


class SoftmaxLoss(gluon.HybridBlock):
    """Softmax cross-entropy per sample with MXNet ``SoftmaxOutput``'s ``smooth_alpha`` label smoothing (the
    seed's ``--label-smoothing``, 0.1 there): the target distribution is 1 - alpha on the label and
    alpha / (K - 1) on each of the other K - 1 classes."""

    def __init__(self, num_classes, alpha):
        super().__init__(prefix='')
        self.alpha = float(alpha)
        _check(0 < self.alpha < 1, '--label-smoothing', self.alpha, 'must be in [0, 1) (0 = off)')
        self.rest = self.alpha / (num_classes - 1)

    def hybrid_forward(self, F, logits, label):
        logp = F.log_softmax(logits, axis=-1)
        return -(1 - self.alpha - self.rest) * F.pick(logp, label, axis=-1) - self.rest * F.sum(logp, axis=-1)


class HeadLoss:
    """The per-sample training loss of a head and its hits (for the accuracy log), ``(loss, hit) =
    head_loss(emb, label)``: softmax cross-entropy (``label_smoothing``: :class:`SoftmaxLoss`) over a
    class-level head's logits; a pair-wise head's own loss; for a fusion head both."""

    def __init__(self, head, label_smoothing=0.0):
        self.head = head
        label_smoothing = float(label_smoothing or 0.0)
        if label_smoothing and isinstance(head, TripletHead):
            raise UserError(f'--label-smoothing {label_smoothing:g}: the pair-wise loss {head.kind} has no '
                            f'softmax to smooth (use a softmax-family or fusion loss)')
        self.softmax = (SoftmaxLoss(head.num_classes, label_smoothing) if label_smoothing
                        else gluon.loss.SoftmaxCrossEntropyLoss())

    def __call__(self, emb, label):
        if isinstance(self.head, TripletHead):
            return self.head(emb, label)
        if isinstance(self.head, FusionHead):
            logits, pair = self.head(emb, label)
            loss = self.softmax(logits, label) + pair
        else:
            logits = self.head(emb, label)
            loss = self.softmax(logits, label)
        return loss, logits.argmax(axis=1) == label


def triplet_batches(head):
    """Whether a head (or the ``--loss`` preset named) trains on triplet batches."""
    cls = head_preset(head)[0] if isinstance(head, str) else type(head)
    return bool(getattr(cls, 'triplet_batches', False))


# insightface's loss_name -> (head class, its arguments before the preset's values). `softmax` is the plain
# FullyConnected with fc7_bias (no scale); `margin_softmax` the s/m1/m2/m3 family.
HEAD_TYPES = {
    'softmax': (MarginHead, {'s': None}),
    'margin_softmax': (MarginHead, {}),
    'arc_circle': (ArcCircleHead, {}),
    'svx_softmax': (SvxSoftmaxHead, {}),
    'softmax_circle': (SoftmaxCircleHead, {}),
    'fix_arc_circle': (FixArcCircleHead, {}),
    **{kind: (TripletHead, {'kind': kind}) for kind in PAIR_LOSSES},
    'triplet_fusion_arc_circle': (FusionHead, {'pair': 'triplet', 'classes': 'arc_circle'}),
    'arc_circle_triplet_fusion_arc_circle': (FusionHead, {'pair': 'arc_circle_triplet', 'classes': 'arc_circle'}),
}


def head_preset(loss_name):
    """``(head class, constructor arguments)`` of the ``--loss`` preset ``loss_name`` of recognition/config.py."""
    settings = preset('loss', loss_name)
    cls, base = HEAD_TYPES[settings.loss_name]
    return cls, dict(base, **{HEAD_ARGS[k]: v for k, v in settings.items() if k != 'loss_name'})


def build_head(loss_name, num_classes, emb_size, **cfg):
    """Head for a ``--loss`` preset; ``cfg`` overrides its values (``s``/``loss_s``, ``m1``..``m3``,
    ``easy_margin``, ``gamma``/``loss_gamma``, ``margin``/``loss_margin``, ``fc7_lr_mult``, ``fc7_wd_mult``,
    ``no_bias``, and the other ``config.HEAD_ARGS``); a setting the head does not take is a UserError naming
    its flag."""
    cls, kwargs = head_preset(loss_name)
    kwargs.update({HEAD_ARGS.get(k, k): v for k, v in cfg.items()})
    accepted = inspect.signature(cls.__init__).parameters
    flags = {arg: key for key, arg in HEAD_ARGS.items()}
    for arg in kwargs:
        if arg not in accepted:
            raise UserError(f'--{flags.get(arg, arg).replace("_", "-")} does not apply to --loss {loss_name} '
                            f'({preset("loss", loss_name).loss_name})')
    return cls(num_classes, emb_size, **kwargs)


class GroupMarginHead(MarginHead):
    """``MarginHead`` with the additive angular margin per sample (``--group-margin``): sample i's m2 is
    ``class_m2[y_i]``, the margin of its identity's protected group; s, m1, m3 and easy_margin as the preset.

    Target logit ``s * (cos(m1 * theta + m2_i) - m3)``; with m1 == 1 and m3 == 0 (the ArcFace family) the
    ``MarginHead`` guard per sample where theta + m2_i > pi (``s * (cos - m2_i * sin(m2_i))``), or easy margin.
    The per-identity table is not a parameter: checkpoints hold ``fc7_weight`` only, and the training graph a
    checkpoint saves (``checkpoint.training_symbol``, symbolic input) carries the preset's scalar m2.
    """

    def __init__(self, num_classes, emb_size, class_m2, **kwargs):
        super().__init__(num_classes, emb_size, **kwargs)
        if not self.s:
            raise ValueError('GroupMarginHead needs a scale s (a margin-softmax head)')
        self.class_m2 = np.asarray(class_m2, np.float32).reshape(num_classes)
        self._m2 = {}

    def forward(self, emb, label):
        if isinstance(emb, mx.nd.NDArray):
            table = self._m2.get(emb.context)
            if table is None:
                table = self._m2[emb.context] = mx.nd.array(self.class_m2, ctx=emb.context)
            return super().forward(emb, label, mx.nd.take(table, label))
        return super().forward(emb, label)

    def hybrid_forward(self, F, emb, label, m2=None, fc7_weight=None):
        if m2 is None:
            return super().hybrid_forward(F, emb, label, fc7_weight)
        s = self.s
        fc7 = _scaled_cosine(F, emb, fc7_weight, self.num_classes, s)
        zy = F.pick(fc7, label, axis=1)
        cos_t = F.clip(zy / s, -_COS_LIMIT, _COS_LIMIT)
        new_zy = (F.cos(F.arccos(cos_t) * self.m1 + m2) - self.m3) * s
        if self.m1 == 1.0 and self.m3 == 0.0:
            if self.easy_margin:
                cond, zy_keep = cos_t > 0.0, zy
            else:
                cond = cos_t > F.cos(math.pi - m2)
                zy_keep = zy - s * F.sin(math.pi - m2) * m2
            new_zy = F.where(cond, new_zy, zy_keep)
        diff = F.expand_dims(new_zy - zy, 1)
        return fc7 + F.broadcast_mul(F.one_hot(label, depth=self.num_classes), diff)


def build_group_margin_head(loss_name, num_classes, emb_size, identity_m2, **cfg):
    """The ``--loss`` preset's margin head with m2 per identity: ``identity_m2`` {identity: m2}; the other
    identities keep the preset's (or ``--loss-m2``'s) m2. Only margin-softmax heads (with a scale) have m2."""
    cls, kwargs = head_preset(loss_name)
    kwargs.update({HEAD_ARGS.get(k, k): v for k, v in cfg.items()})
    if cls is not MarginHead or not kwargs.get('s'):
        raise UserError(f'--group-margin sets the additive angular margin m2 of a margin-softmax head '
                        f'(--loss arcface, combined, cosface, nsoftmax), not --loss {loss_name}')
    class_m2 = np.full(num_classes, float(kwargs.get('m2') or 0.0), np.float32)
    for identity, m2 in identity_m2.items():
        class_m2[int(identity)] = m2
    arc = float(kwargs.get('m1', 1.0)) == 1.0 and not float(kwargs.get('m3') or 0.0)
    bad = [m for m in set(identity_m2.values()) if m < 0 or (arc and m >= math.pi / 2)]
    if bad:
        raise UserError(f'--group-margin: m2 {min(bad)} outside [0, pi/2) (the ArcFace margin range)'
                        if arc else f'--group-margin: m2 {min(bad)} is negative')
    return GroupMarginHead(num_classes, emb_size, class_m2, **kwargs)


def fpr_penalty(cos, label, target_fpr=0.0):
    """The instance-FPR consistency penalty after Xu et al., "Consistent Instance False Positive Improves
    Fairness in Face Recognition" (CVPR 2021; docs/metrics.md): no demographic labels, only the batch.

    ``cos``: N x C cosines of the batch's embeddings to every class centre (fc7 rows), differentiable;
    ``label``: N identities. The threshold t is the k-th largest of the N(C-1) negative cosines, k =
    ceil(u N (C-1)) for the target FPR u (0: 1/(C-1), one false positive per instance on average, as the
    paper's code). Instance i's FPR counts its negatives at or above t, each weighted (1 + cos)/2 so that the
    count has a gradient (the indicator alone has none): F_i = sum_{j != y_i, cos_ij >= t} (1 + cos_ij)/2 / (C-1).
    Returns the relative mean absolute deviation mean_i |F_i - F| / F, F = mean_i F_i (a 1-element NDArray);
    t is a constant of the step (no gradient through the selection).
    """
    n, c = cos.shape
    u = float(target_fpr) or 1.0 / (c - 1)
    k = int(min(n * (c - 1), max(1, math.ceil(u * n * (c - 1)))))
    target = mx.nd.one_hot(label, c, dtype=cos.dtype)
    with autograd.pause():
        negatives = cos.detach() - 3.0 * target           # a target cosine (>= -1) lands below every negative
        t = mx.nd.topk(negatives.reshape(-1), k=k, ret_typ='value').min().reshape((1, 1))
        above = mx.nd.broadcast_greater_equal(negatives, t) * (1.0 - target)
    fpr = mx.nd.sum(above * (1.0 + cos) * 0.5, axis=1) / (c - 1)
    mean = fpr.mean()
    return mx.nd.abs(fpr - mean).mean() / mean
