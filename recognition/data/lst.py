"""insightface `.lst` lists: `aligned<TAB>path<TAB>label[<TAB>x1 y1 x2 y2<TAB>lx1..lx5 ly1..ly5]`.

Landmark columns are all x coordinates then all y coordinates, as insightface's `parse_lst_line`;
in memory landmarks are 5x2 (x, y) arrays like everywhere else in the project.
"""
import os
from typing import NamedTuple, Optional

import numpy as np

from recognition.utils import UserError, atomic_open

# Every image file type the project reads (OpenCV decodes them all): alignment, lists, extraction, prediction.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm')


def is_image(name):
    """Whether a file name has one of IMAGE_EXTENSIONS (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder, exclude=None, recursive=True):
    """Relative paths ('/' separated, sorted) of the images under `folder`, skipping the folder `exclude`;
    with recursive=False only the images directly inside it."""
    root = os.path.abspath(folder)
    if not os.path.isdir(root):
        raise UserError(f'{folder}: image folder not found')
    exclude = os.path.abspath(exclude) if exclude else None
    found = []
    for parent, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if recursive and os.path.join(parent, d) != exclude)
        rel = os.path.relpath(parent, root)
        found += [name if rel == '.' else f'{rel}/{name}'.replace(os.sep, '/') for name in files if is_image(name)]
    return sorted(found)


class LstItem(NamedTuple):
    aligned: int
    path: str
    label: int
    bbox: Optional[np.ndarray] = None        # 4 ints x1 y1 x2 y2
    landmarks: Optional[np.ndarray] = None   # 5x2 float (x, y)


def parse_lst_line(line, where='.lst'):
    """One `.lst` line to an LstItem; `where` names the file and line in errors."""
    cols = line.rstrip('\r\n').split('\t')
    if len(cols) < 3:
        raise UserError(f'{where}: expected "aligned<TAB>path<TAB>label", got {line.strip()!r}')
    try:
        aligned, label = int(cols[0]), int(float(cols[2]))
    except ValueError:
        raise UserError(f'{where}: aligned and label must be integers, got {line.strip()!r}') from None
    bbox = landmarks = None
    extra = cols[3:]
    if len(extra) not in (0, 4, 14):
        raise UserError(f'{where}: expected 3, 7 or 17 columns, got {len(cols)}')
    try:
        if len(extra) >= 4:
            bbox = np.array([int(float(v)) for v in extra[:4]], dtype=np.int64)
        if len(extra) >= 14:
            landmarks = np.array([float(v) for v in extra[4:14]], dtype=np.float32).reshape(2, 5).T.copy()
    except ValueError:
        raise UserError(f'{where}: bbox/landmark columns must be numbers') from None
    return LstItem(aligned, cols[1], label, bbox, landmarks)


def read_lst(path):
    """All items of a `.lst` file, in file order (blank lines ignored)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such .lst file')
    items = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                items.append(parse_lst_line(line, f'{path}:{n}'))
    return items


def format_lst_line(item):
    cols = [str(int(item.aligned)), str(item.path), str(int(item.label))]
    if item.bbox is not None or item.landmarks is not None:
        bbox = item.bbox if item.bbox is not None else np.zeros(4, dtype=np.int64)
        cols += [str(int(v)) for v in bbox]
    if item.landmarks is not None:
        lmk = np.asarray(item.landmarks, dtype=np.float64).reshape(5, 2)
        cols += ['%.4f' % v for v in lmk.T.reshape(-1)]
    return '\t'.join(cols)


def write_lst(path, items):
    """Write items as a `.lst` file (atomically)."""
    with atomic_open(path, 'w', encoding='utf-8') as f:
        for item in items:
            f.write(format_lst_line(LstItem(*item)) + '\n')


def dir_to_lst(image_dir, root=None):
    """Items for a folder of identity folders: labels 0..K-1 in sorted folder name order
    (folders without images get no label).

    Paths are `image_dir/<identity>/<file>` as given, or relative to `root` when set (e.g. the folder
    the `.lst` will live in, which is where the packer resolves relative paths first).
    Every image is marked aligned (1), as insightface's dir2lst.
    """
    image_dir = os.fspath(image_dir)
    if not os.path.isdir(image_dir):
        raise UserError(f'{image_dir}: not a directory')
    identities = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
    items = []
    label = 0
    for name in identities:
        folder = os.path.join(image_dir, name)
        files = list_images(folder, recursive=False)
        for fname in files:
            path = os.path.join(folder, fname)
            if root is not None:
                path = os.path.relpath(path, root)
            items.append(LstItem(1, path, label))
        label += bool(files)
    if not items:
        raise UserError(f'{image_dir}: no images found in identity sub-folders')
    return items


def resolve_lst_path(path, lst_dir):
    """Relative .lst paths are taken from the .lst's folder first, then from the working folder."""
    if os.path.isabs(path):
        return path
    candidate = os.path.join(lst_dir, path)
    return candidate if os.path.exists(candidate) or not os.path.exists(path) else path
