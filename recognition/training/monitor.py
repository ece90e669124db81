"""Training logs: insightface's Speedometer lines, a tqdm bar on a terminal, mxboard scalars, a log file.

Only the chief process (rank 0) writes mxboard events and the log file; every process prints.
"""
import logging
import os
import sys
import time

LOGGER_NAME = 'recognition.train'


class _TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        from tqdm import tqdm
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


class Monitor:
    """Window averages of loss/accuracy every `frequent` batches, like insightface's Speedometer."""

    def __init__(self, log, batch_size, frequent, logdir=None, total_steps=0, start_step=0, show_bar=None):
        self.log = log
        self.batch_size = batch_size
        self.frequent = max(1, int(frequent))
        self.writer = None
        if logdir:
            from mxboard import SummaryWriter
            self.writer = SummaryWriter(logdir=logdir, flush_secs=10)
        if show_bar is None:
            show_bar = sys.stdout.isatty()
        self.bar = None
        if show_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps or None, initial=start_step, unit='batch', dynamic_ncols=True)
        self._reset()

    def _reset(self):
        self.tic = time.time()
        self.n = 0
        self.loss_sum = 0.0
        self.correct = 0
        self.seen = 0

    def batch(self, step, epoch, nbatch, loss, correct, count, lr):
        """Account one batch; every `frequent` batches log the window's speed, loss, accuracy and lr."""
        self.n += 1
        self.loss_sum += loss
        self.correct += correct
        self.seen += count
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss='%.4f' % loss, lr='%g' % lr, refresh=False)
        if nbatch % self.frequent:
            return None
        speed = self.n * self.batch_size / max(1e-9, time.time() - self.tic)
        mean_loss = self.loss_sum / self.n
        acc = self.correct / max(1, self.seen)
        self.log.info('Epoch[%d] Batch[%d] Speed: %.2f samples/sec loss=%f acc=%f lr=%g',
                      epoch, nbatch, speed, mean_loss, acc, lr)
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
        """Leave `seconds` (verification, checkpointing) out of the speed window."""
        self.tic += seconds

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
