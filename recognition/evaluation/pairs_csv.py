"""The pair files of the FairFace harness: `TEMPLATE_ID1,TEMPLATE_ID2[,SCORE|LABEL]` CSVs.

One reader for the pair template, predictions and ground truth. The evaluator's readers (`read_scores`,
`read_labels`) also refuse what would silently change the numbers: non-finite scores, a pair listed twice
(in either id order), a pair labelled both 1 and 0. Errors name the file and its line.
"""
import numpy as np

from recognition.utils import UserError


def _read_rows(path, value_column):
    """(id1, id2, values or None, header, line numbers) of the file's non-blank rows."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f'{path}: cannot read ({e.strerror})') from None
    if not lines:
        raise UserError(f'{path}: empty file')
    header = [h.strip() for h in lines[0].split(',')]
    need = ['TEMPLATE_ID1', 'TEMPLATE_ID2'] + ([value_column] if value_column else [])
    missing = [c for c in need if c not in header]
    if missing:
        raise UserError(f'{path}: header lacks {",".join(missing)} (got {lines[0]!r})')
    numbered = [(n + 1, line.split(',')) for n, line in enumerate(lines) if n and line.strip()]
    bad = next(((n, r) for n, r in numbered if len(r) != len(header)), None)
    if bad is not None:
        raise UserError(f'{path}: line {bad[0]} has {len(bad[1])} fields, the header has {len(header)}')
    line_numbers = np.array([n for n, _ in numbered], dtype=np.int64)
    cols = list(zip(*(r for _, r in numbered))) if numbered else [()] * len(header)
    id1 = np.array([v.strip() for v in cols[header.index('TEMPLATE_ID1')]], dtype=object)
    id2 = np.array([v.strip() for v in cols[header.index('TEMPLATE_ID2')]], dtype=object)
    values = None
    if value_column:
        raw = cols[header.index(value_column)]
        try:
            values = np.array(raw, dtype=np.float64)
        except ValueError:
            at = next(i for i, v in enumerate(raw) if not _is_number(v))
            raise UserError(f'{path}: line {line_numbers[at]}: {value_column} {raw[at].strip()!r} is not a '
                            f'number') from None
    return id1, id2, values, header, line_numbers


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_pairs_csv(path, value_column=None):
    """(id1, id2, values or None, header) of a TEMPLATE_ID1,TEMPLATE_ID2[,...] CSV, ids as strings."""
    return _read_rows(path, value_column)[:4]


def _first_repeat(id1, id2):
    """(index of the first pair listed again in either id order, index of its earlier listing) or None."""
    seen = {}
    for i, key in enumerate(zip(id1, id2)):
        unordered = key if key[0] <= key[1] else key[::-1]
        if unordered in seen:
            return i, seen[unordered]
        seen[unordered] = i
    return None


def read_scores(path):
    """(id1, id2, scores) of a predictions CSV: every score finite, no pair twice."""
    id1, id2, scores, _, lines = _read_rows(path, 'SCORE')
    bad = np.nonzero(~np.isfinite(scores))[0]
    if bad.size:
        raise UserError(f'{path}: line {lines[bad[0]]}: SCORE {scores[bad[0]]} is not a finite number '
                        f'({bad.size} such scores)')
    repeat = _first_repeat(id1, id2)
    if repeat is not None:
        i, j = repeat
        raise UserError(f'{path}: line {lines[i]}: pair {id1[i]},{id2[i]} already scored on line {lines[j]}')
    return id1, id2, scores


def read_labels(path):
    """(id1, id2, labels as bool) of a ground-truth CSV: LABEL 0 or 1, no pair twice."""
    id1, id2, labels, _, lines = _read_rows(path, 'LABEL')
    bad = np.nonzero(~np.isin(labels, (0, 1)))[0]
    if bad.size:
        raise UserError(f'{path}: line {lines[bad[0]]}: LABEL must be 0 or 1 (got {labels[bad[0]]:g})')
    repeat = _first_repeat(id1, id2)
    if repeat is not None:
        i, j = repeat
        what = (f'labelled {labels[j]:g} on line {lines[j]} and {labels[i]:g} on line {lines[i]}'
                if labels[i] != labels[j] else f'listed on lines {lines[j]} and {lines[i]}')
        raise UserError(f'{path}: pair {id1[i]},{id2[i]} {what}')
    return id1, id2, labels.astype(bool)
