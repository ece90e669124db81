"""Training logs: insightface's Speedometer lines, a tqdm bar on a terminal, mxboard scalars, a log file.

Only the chief process (rank 0) writes mxboard events and the log file; every process prints.
"""
import logging
import os
import sys
import time

from tqdm import tqdm

LOGGER_NAME = 'recognition.train'


class _TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stdout)


def get_logger(log_file=None, use_tqdm=False):
    """The trainer's logger: plain lines on stdout (through tqdm when a bar is shown) and a log file."""
    log = logging.getLogger(LOGGER_NAME)
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    console = _TqdmHandler() if use_tqdm else logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter('%(message)s'))
    log.addHandler(console)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
        log.addHandler(handler)
    return log


def log_interval(frequent, total_steps):
    """`--frequent`, lowered for short runs so that a run of known length logs about ten times."""
    frequent = max(1, int(frequent))
    return min(frequent, max(1, total_steps // 10)) if total_steps else frequent


def format_duration(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return '%dh%02dm' % (seconds // 3600, seconds % 3600 // 60)
    return '%dm%02ds' % (seconds // 60, seconds % 60) if seconds >= 60 else '%ds' % seconds


class Monitor:
    """Window averages of loss/accuracy every `frequent` steps, like insightface's Speedometer, with the
    step count out of the total and the time left when the total is known."""

    def __init__(self, log, batch_size, frequent, logdir=None, total_steps=0, start_step=0, show_bar=None):
        self.log = log
        self.batch_size = batch_size
        self.total_steps = int(total_steps or 0)
        self.frequent = log_interval(frequent, self.total_steps)
        self.start_step = start_step
        self.started = time.time()
        self.writer = None
        if logdir:
            from mxboard import SummaryWriter   # here: ~3 s to import, and only the chief writes events
            self.writer = SummaryWriter(logdir=logdir, flush_secs=10)
        if show_bar is None:
            show_bar = sys.stdout.isatty()
        self.bar = None
        if show_bar:
            self.bar = tqdm(total=total_steps or None, initial=start_step, unit='batch', dynamic_ncols=True)
        self._reset()

    def _reset(self):
        self.tic = time.time()
        self.n = 0
        self.loss_sum = 0.0
        self.correct = 0
        self.seen = 0

    def batch(self, step, epoch, nbatch, loss, correct, count, lr):
        """Account one batch; every `frequent` steps log the window's speed, loss, accuracy and lr."""
        self.n += 1
        self.loss_sum += loss
        self.correct += correct
        self.seen += count
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss='%.4f' % loss, lr='%g' % lr, refresh=False)
        if step % self.frequent and step != self.total_steps:
            return None
        now = time.time()
        speed = self.n * self.batch_size / max(1e-9, now - self.tic)
        mean_loss = self.loss_sum / self.n
        acc = self.correct / max(1, self.seen)
        progress = ''
        if self.total_steps:
            done = step - self.start_step
            left = (now - self.started) / max(done, 1) * (self.total_steps - step)
            progress = ' step %d/%d eta %s' % (step, self.total_steps, format_duration(left))
        self.log.info('Epoch[%d] Batch[%d] Speed: %.2f samples/sec loss=%f acc=%f lr=%g%s',
                      epoch, nbatch, speed, mean_loss, acc, lr, progress)
        self.scalars(step, {'train/loss': mean_loss, 'train/acc': acc, 'train/lr': lr,
                            'train/samples_per_sec': speed})
        self._reset()
        return speed

    def scalars(self, step, values):
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), global_step=step)

    def exclude(self, seconds):
        """Leave `seconds` (verification, checkpointing) out of the speed window and the time left."""
        self.tic += seconds
        self.started += seconds

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
