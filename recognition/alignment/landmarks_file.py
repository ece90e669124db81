"""Given landmarks: the `relative/path x1 y1 ... x5 y5` file (LFW layout) and its path keys."""
import os
import posixpath

import numpy as np

from recognition.utils import UserError


def relative_key(path):
    """Canonical relative path: '/' separators, no './'."""
    return posixpath.normpath(str(path).replace(os.sep, '/')).lstrip('/')


def read_landmarks_file(path):
    """{relative path: 5x2 array} from lines `relative/path x1 y1 x2 y2 ... x5 y5` (LFW layout).

    Blank lines and lines starting with '#' are skipped; paths may contain spaces.
    """
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'{path}: cannot read landmarks file ({e})') from e
    points = {}
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        parts = line.rsplit(None, 10)
        try:
            values = np.array([float(v) for v in parts[1:]], dtype=np.float64)
        except ValueError:
            values = np.zeros(0)
        if len(parts) != 11 or not np.all(np.isfinite(values)):
            raise UserError(f'{path}:{lineno}: expected "relative/path x1 y1 ... x5 y5", got {line[:80]!r}')
        key = relative_key(parts[0])
        if key in points:
            raise UserError(f'{path}:{lineno}: {key} listed twice')
        points[key] = values.reshape(5, 2)
    return points
