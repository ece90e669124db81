"""Learning-rate schedules by global step: step decay, linear warmup, cosine, and plateau decay.

`StepSchedule` is a pure function of the step (so `--resume` needs only the step counter); `PlateauDecay`
is Face_Recognition's automatic decay (dlib's `count_steps_without_decrease`) and carries the loss history,
which `state_dict()` hands to the resume file.
"""
import math

import numpy as np
from scipy.special import ndtr


class StepSchedule:
    """insightface's lr: `lr * factor**(milestones passed)`; optional linear warmup and cosine decay.

    Warmup ramps linearly from lr/warmup to lr over the first `warmup` steps. Cosine (when `max_steps`
    is known) replaces the milestones: lr * 0.5 * (1 + cos(pi * t)), t going 0 -> 1 after the warmup.
    """

    def __init__(self, base_lr, lr_steps=(), factor=0.1, warmup=0, cosine=False, max_steps=0):
        if cosine and max_steps <= 0:
            raise ValueError('cosine decay needs max_steps > 0')
        self.base_lr = float(base_lr)
        self.lr_steps = sorted(int(s) for s in lr_steps)
        self.factor = factor
        self.warmup = int(warmup)
        self.cosine = cosine
        self.max_steps = int(max_steps)

    def __call__(self, step):
        """Learning rate used for the update that follows `step` completed updates."""
        if self.warmup and step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.cosine:
            t = (step - self.warmup) / max(1, self.max_steps - self.warmup)
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        passed = sum(1 for s in self.lr_steps if step >= s)
        return self.base_lr * self.factor ** passed


class ServerSchedule:
    """A StepSchedule in MXNet's LRScheduler form, to ship inside the optimizer to the kvstore servers.

    dist_async updates on the servers, which the workers' `set_learning_rate` does not reach; the
    optimizer (and its lr_scheduler) is pickled to them, so the schedule must travel with it. MXNet counts
    the update being made (1 for the first); StepSchedule counts completed updates.
    """

    def __init__(self, schedule):
        self.schedule = schedule
        self.base_lr = schedule.base_lr

    def __call__(self, num_update):
        return self.schedule(max(int(num_update) - 1, 0))


def _not_decreasing(values, keep, probability_of_decrease):
    y_rev = np.asarray(values, dtype=np.float64)[::-1]
    keep_rev = np.asarray(keep, dtype=bool)[::-1]
    y = y_rev[keep_rev]
    m = len(y)
    if m < 3:
        return 0
    k = np.arange(1, m + 1, dtype=np.float64)
    x = np.arange(m, dtype=np.float64)
    sx, sy = np.cumsum(x), np.cumsum(y)
    vxx = np.cumsum(x * x) - sx * sx / k
    vxy = np.cumsum(x * y) - sx * sy / k
    vyy = np.cumsum(y * y) - sy * sy / k
    with np.errstate(divide='ignore', invalid='ignore'):
        slope = vxy / vxx
        sse = np.maximum(vyy - slope * vxy, 0.0)
        stderr = np.sqrt(sse / (k - 2) / vxx)
        # Reversed in time, a decreasing loss has a positive slope.
        prob = ndtr(slope / stderr)
    prob = np.where(np.isnan(prob), 0.5, prob)
    # For every position j of the full history: how many kept values the backwards window holds.
    kept_in_window = np.cumsum(keep_rev)
    valid = kept_in_window >= 3
    prob_at_j = np.where(valid, prob[np.maximum(kept_in_window - 1, 0)], 1.0)
    hits = np.nonzero(valid & (prob_at_j < probability_of_decrease))[0]
    return int(hits[-1]) + 1 if len(hits) else 0


def count_steps_without_decrease(values, probability_of_decrease=0.51):
    """dlib's `count_steps_without_decrease` over a loss history (oldest first).

    Walking back from the newest value, a least-squares line is fitted to the values seen so far; the
    result is the longest such backwards window over which the loss is *not* confidently decreasing
    (P(slope < 0) < `probability_of_decrease`, normal approximation of the slope estimate).
    """
    return _not_decreasing(values, np.ones(len(values), bool), probability_of_decrease)


def count_steps_without_decrease_robust(values, probability_of_decrease=0.51, quantile_discard=0.10):
    """dlib's robust variant: values above the upper `quantile_discard` quantile are ignored (bad batches)."""
    y = np.asarray(values, dtype=np.float64)
    if len(y) == 0:
        return 0
    cut = np.quantile(y, 1.0 - quantile_discard)
    return _not_decreasing(y, y <= cut, probability_of_decrease)


class PlateauDecay:
    """lr x `factor` once the loss has shown no decrease for `patience` steps (plain and robust test).

    The Face_Recognition seed's automatic decay (dlib's dnn_trainer rule): the history holds the last
    `patience` losses. dlib drops only part of the history after a decay, which with small patience lets
    decays cascade every few steps; here the history is cleared, so decays are at least `patience` apart.
    """

    def __init__(self, patience, factor=0.1, probability_of_decrease=0.51):
        self.patience = int(patience)
        self.factor = factor
        self.probability_of_decrease = probability_of_decrease
        self.history = []
        self.scale = 1.0
        self.decays = 0

    def observe(self, loss):
        """Record one step's loss; return True when this step triggered a decay."""
        if self.patience <= 0:
            return False
        self.history.append(float(loss))
        if len(self.history) > self.patience:
            del self.history[:len(self.history) - self.patience]
        if len(self.history) < self.patience:
            return False
        if count_steps_without_decrease(self.history, self.probability_of_decrease) < self.patience:
            return False
        if count_steps_without_decrease_robust(self.history, self.probability_of_decrease) < self.patience:
            return False
        self.scale *= self.factor
        self.decays += 1
        self.history = []
        return True

    def state_dict(self):
        return {'history': list(self.history), 'scale': self.scale, 'decays': self.decays}

    def load_state_dict(self, state):
        self.history = [float(v) for v in state['history']]
        self.scale = float(state['scale'])
        self.decays = int(state['decays'])
