"""Training progress lines: insightface's Speed line plus step/total and the time left, often enough for
short runs (a 100-step finetune over 11-batch epochs logs ten times, not never)."""
import logging

from recognition.training.monitor import Monitor, format_duration, log_interval


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_short_runs_log_about_ten_times_with_progress_and_eta():
    log = logging.getLogger('test_monitor')
    log.handlers, log.propagate = [], False
    log.setLevel(logging.INFO)
    handler = Lines()
    log.addHandler(handler)
    monitor = Monitor(log, 32, frequent=50, total_steps=100, show_bar=False)
    for step in range(1, 101):
        epoch, batch = divmod(step - 1, 11)
        monitor.batch(step, epoch, batch + 1, 1.0, 3, 32, 0.01)
    assert len(handler.lines) == 10
    assert handler.lines[0].startswith('Epoch[0] Batch[10] Speed: ') and ' step 10/100 eta ' in handler.lines[0]
    assert handler.lines[-1].startswith('Epoch[9] Batch[1] Speed: ') and handler.lines[-1].endswith('step 100/100 eta 0s')


def test_log_interval_and_durations():
    assert log_interval(2000, 0) == 2000 and log_interval(20, 400) == 20 and log_interval(50, 100) == 10
    assert log_interval(20, 4) == 1
    assert [format_duration(s) for s in (4.4, 75, 3720)] == ['4s', '1m15s', '1h02m']
