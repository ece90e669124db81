"""The one reader of the harness's `metadata.csv`: TEMPLATE_ID and one column per attribute of each image.

Used by the bias evaluation (`fairness.load_pairs`: protected and legitimate attributes) and the attribute
heads' scores (`attributes.metadata_codes`). Errors name the file and, for a bad row, its number.
"""
import csv

import numpy as np

from recognition.utils import UserError


def read_metadata(path, required=('TEMPLATE_ID',)):
    """({column: (N,) object array of stripped strings}, {template id: row}) of a metadata CSV.

    `required` columns are found case-insensitively and keyed by the names given here (`gender` finds a
    `GENDER` column); the other columns keep the header's names. Blank lines are skipped; an empty file, no
    rows, a missing column, a row of another width or a template id listed twice is a one-line error.
    """
    required = ['TEMPLATE_ID'] + [c for c in required if c.upper() != 'TEMPLATE_ID']
    try:
        with open(path, newline='') as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except OSError as e:
        raise UserError(f'{path}: cannot read ({e.strerror})') from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise UserError(f'{path}: not a CSV text file ({e})') from None
    if not rows:
        raise UserError(f'{path}: empty file')
    header = [h.strip() for h in rows[0]]
    names = list(header)
    for col in required:
        found = [i for i, h in enumerate(header) if h.upper() == col.upper()]
        if not found:
            raise UserError(f'{path}: header lacks {col} (got {",".join(header)})')
        names[found[0]] = col
    rows = [[v.strip() for v in r] for r in rows[1:]]
    if not rows:
        raise UserError(f'{path}: no rows')
    bad = next((n for n, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise UserError(f'{path}: row {bad + 2} has {len(rows[bad])} fields, the header has {len(header)}')
    cols = {name: np.array(values, dtype=object) for name, values in zip(names, zip(*rows))}
    index = {}
    for n, template in enumerate(cols['TEMPLATE_ID']):
        if template in index:
            raise UserError(f'{path}: row {n + 2}: TEMPLATE_ID {template} listed twice (first in row '
                            f'{index[template] + 2})')
        index[template] = n
    return cols, index
