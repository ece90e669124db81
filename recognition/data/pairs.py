"""Verification pair lists: LFW's pairs.txt or simple `path1 path2 0|1` lines.

A library module so the `.bin` builder and anything else that evaluates on pairs read them one way.
"""
from recognition.utils import UserError


def _is_int(token):
    return token.lstrip('-').isdigit()


def lfw_path(name, number):
    """Where LFW keeps image `number` of `name`: `name/name_0001.jpg`."""
    return f'{name}/{name}_{int(number):04d}.jpg'


def parse_pairs(path):
    """[(path1, path2, issame)] from an LFW pairs.txt or a `path1 path2 0|1` list.

    LFW: an optional header `folds pairs_per_fold` (or `pairs` for View 1) whose count is checked,
    then `name n1 n2` (same person) and `name1 n1 name2 n2` (different people) lines; their paths
    are LFW's `name/name_%04d.jpg`. Simple lines keep their paths as written.
    """
    try:
        with open(path, encoding='utf-8') as f:
            lines = [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'{path}: cannot read pairs file ({e})') from e
    expected = None
    if lines and 1 <= len(lines[0][1]) <= 2 and all(_is_int(t) for t in lines[0][1]):
        header = [int(t) for t in lines.pop(0)[1]]
        # LFW: `folds n` means folds x (n same + n different); View-1 files give just n.
        expected = header[0] * header[1] * 2 if len(header) == 2 else header[0] * 2
    pairs = []
    for lineno, tokens in lines:
        if len(tokens) == 3 and _is_int(tokens[1]) and _is_int(tokens[2]):
            pairs.append((lfw_path(tokens[0], tokens[1]), lfw_path(tokens[0], tokens[2]), True))
        elif len(tokens) == 4 and _is_int(tokens[1]) and _is_int(tokens[3]):
            pairs.append((lfw_path(tokens[0], tokens[1]), lfw_path(tokens[2], tokens[3]), False))
        elif len(tokens) == 3 and tokens[2] in ('0', '1'):
            pairs.append((tokens[0], tokens[1], tokens[2] == '1'))
        else:
            raise UserError(f'{path}:{lineno}: expected "name n1 n2", "name1 n1 name2 n2" '
                            f'or "path1 path2 0|1", got {" ".join(tokens)[:80]!r}')
    if expected is not None and expected != len(pairs):
        raise UserError(f'{path}: header promises {expected} pairs, found {len(pairs)}')
    if not pairs:
        raise UserError(f'{path}: no pairs')
    return pairs
