"""The face2rec2 engine: `.lst` (+ attribute CSV) -> identity-indexed rec shards.

Images are read, checked and, for `aligned=0` rows, aligned to the 112x112 arcface template from
their landmarks, or without landmarks cropped as insightface's face_preprocess (the .lst bbox
widened by 44 px, else a centre box), in worker processes; results come back in list order, so the output is the same for any
number of processes. Already aligned images keep their original bytes, as insightface.
"""
import concurrent.futures
import contextlib
import csv
import ctypes
import glob
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import time

import cv2
import numpy as np

from recognition.alignment.geometry import bbox_crop, norm_crop
from recognition.data.lst import read_lst, resolve_lst_path
from recognition.data.record import (KNOWN_CODES, IdentityRecordWriter, check_classes, property_path,
                                     read_property, split_prefix, write_property)
from recognition.data.shards import manifest_path, parse_shard, read_manifest, shard_prefixes, write_manifest
from recognition.locking import folder_lock
from recognition.utils import (UserError, atomic_open, check_terminated, is_disk_full, no_space_error,
                               signals_deferred)

log = logging.getLogger(__name__)

MISSING = -1.0   # stored for an empty attribute cell


def codes_path(csv_path):
    """Where the code meanings of an attribute CSV live: `train_attributes.csv` -> `train_attributes.codes.json`."""
    return os.path.splitext(os.fspath(csv_path))[0] + '.codes.json'


def write_codes(path, codes):
    """Write code meanings {column: {code: meaning}} as JSON (what `codes_path` / `pack(codes=)` read)."""
    with atomic_open(path) as f:
        json.dump({name: {str(int(k)): str(v) for k, v in table.items()} for name, table in codes.items()},
                  f, indent=1)
        f.write('\n')


def read_codes(path):
    """{lowercased column: {int code: meaning}} from a codes JSON file."""
    try:
        with open(path, encoding='utf-8') as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or not all(isinstance(t, dict) for t in doc.values()):
            raise ValueError('expected {"COLUMN": {"code": "meaning"}}')
        return {str(name).lower(): {int(k): str(v) for k, v in table.items()} for name, table in doc.items()}
    except OSError as e:
        raise UserError(f'{path}: cannot read attribute codes ({e.strerror})') from None
    except (ValueError, TypeError) as e:
        raise UserError(f'{path}: not an attribute codes file ({e})') from None


class AttributeTable:
    """Per-image attributes from a CSV keyed by image path.

    Columns: `path`, an optional `SUBJECT_ID` (not an attribute), then the attributes in column
    order (names lowercased). Integer columns keep their codes; text columns get sorted codes. What
    an integer code means comes from `codes` ({column: {code: meaning}} or a JSON file of it),
    else from `codes_path(csv_path)` beside the CSV if present; gender and skin colour always have
    the challenge's meanings (KNOWN_CODES), which a codes file may repeat but not contradict. All
    meanings go to the rec's sidecar. Paths may be absolute, relative to the CSV or the `.lst`
    folder, or a trailing part of the `.lst` path (`id/1.jpg` for `train/id/1.jpg`).
    """

    def __init__(self, csv_path, codes=None):
        self.csv_path = os.fspath(csv_path)
        if not os.path.isfile(self.csv_path):
            raise UserError(f'{self.csv_path}: no such attribute CSV')
        with open(self.csv_path, newline='', encoding='utf-8') as f:
            rows = [r for r in csv.reader(f) if r]
        if not rows:
            raise UserError(f'{self.csv_path}: empty attribute CSV')
        header = [c.strip() for c in rows[0]]
        lower = [c.lower() for c in header]
        if 'path' not in lower:
            raise UserError(f'{self.csv_path}: no "path" column (header: {",".join(header)})')
        path_col = lower.index('path')
        attr_cols = [i for i, c in enumerate(lower) if c not in ('path', 'subject_id')]
        self.names = [lower[i] for i in attr_cols]
        body = rows[1:]
        for n, r in enumerate(body, 2):
            if len(r) != len(header):
                raise UserError(f'{self.csv_path}:{n}: {len(r)} columns, header has {len(header)}')
        self.codes = {}
        self._given, self._codes_source = self._load_codes(codes)
        columns = [self._encode_column(name, [r[i].strip() for r in body])
                   for name, i in zip(self.names, attr_cols)]
        values = np.stack(columns, axis=1) if columns else np.zeros((len(body), 0), np.float32)
        self._by_text, self._by_abs = {}, {}
        folder = os.path.dirname(os.path.abspath(self.csv_path))
        for n, (r, v) in enumerate(zip(body, values), 2):
            text = os.path.normpath(r[path_col].strip())
            if text in self._by_text:
                raise UserError(f'{self.csv_path}:{n}: duplicate path {r[path_col]!r}')
            self._by_text[text] = v
            self._by_abs[os.path.normpath(os.path.join(folder, text))] = v

    def _load_codes(self, codes):
        """(given meanings by lowercased column, where they came from) from `codes` or the file beside the CSV."""
        if codes is None:
            path = codes_path(self.csv_path)
            if not os.path.isfile(path):
                return {}, None
            codes = path
        if isinstance(codes, (str, os.PathLike)):
            source = os.fspath(codes)
            given = read_codes(source)
        else:
            source = 'codes argument'
            given = {str(n).lower(): {int(k): str(v) for k, v in t.items()} for n, t in codes.items()}
        unknown = sorted(set(given) - set(self.names))
        if unknown:
            raise UserError(f'{source}: codes for {", ".join(unknown)}, which {self.csv_path} has no column for '
                            f'(columns: {", ".join(self.names)})')
        for name, known in KNOWN_CODES.items():
            clash = {k: v for k, v in given.get(name, {}).items() if known.get(k, v) != v}
            if clash:
                raise UserError(f'{source}: {name} codes {clash} contradict the challenge\'s {known}')
        return given, source

    def _encode_column(self, name, cells):
        filled = [c for c in cells if c != '']
        try:
            numbers = [float(c) for c in filled]
        except ValueError:
            numbers = None
        integers = numbers is not None and all(x.is_integer() for x in numbers)
        if name in self._given and not integers:
            raise UserError(f'{self._codes_source}: codes for {name}, but {self.csv_path} holds '
                            f'non-integer values there')
        if numbers is not None:
            if integers and (name in KNOWN_CODES or name in self._given):
                meanings = dict(KNOWN_CODES.get(name, {}))
                meanings.update(self._given.get(name, {}))
                undefined = sorted({int(x) for x in numbers} - set(meanings))
                if undefined and name in self._given:
                    raise UserError(f'{self._codes_source}: {name} has no meaning for code(s) '
                                    f'{", ".join(map(str, undefined))} used in {self.csv_path}')
                self.codes[name] = meanings
            return np.array([float(c) if c != '' else MISSING for c in cells], dtype=np.float32)
        labels = sorted(set(filled))
        self.codes[name] = dict(enumerate(labels))
        code = {v: i for i, v in enumerate(labels)}
        return np.array([code.get(c, MISSING) for c in cells], dtype=np.float32)

    def lookup(self, lst_path, resolved):
        """The attribute vector of a `.lst` entry, or None if the CSV has no row for it."""
        v = self._by_abs.get(os.path.normpath(resolved))
        if v is None:
            parts = os.path.normpath(lst_path).split(os.sep)
            for i in range(len(parts)):
                v = self._by_text.get(os.path.join(*parts[i:]))
                if v is not None:
                    break
        return v


def _group_by_label(items, lst_path):
    """Identities are contiguous runs in the rec: regroup an unsorted list stably, with a warning."""
    first_seen, grouped, previous = {}, True, None
    for i, item in enumerate(items):
        if item.label != previous and item.label in first_seen:
            grouped = False
        first_seen.setdefault(item.label, i)
        previous = item.label
    if not grouped:
        log.warning('%s: not grouped by label; grouping it stably (identities keep their first position)',
                    lst_path)
        items = sorted(items, key=lambda it: first_seen[it.label])
    return items


def _encode_params(encoding, quality):
    if encoding in ('.jpg', '.jpeg'):
        return [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    if encoding == '.png':
        return [cv2.IMWRITE_PNG_COMPRESSION, min(9, int(quality) // 10)]
    return []


def encode_image(job):
    """(encoded bytes, None) or (None, reason) for one .lst entry; runs in a worker process."""
    path, lst_dir, aligned, bbox, landmarks, image_size, encoding, params = job
    path = resolve_lst_path(path, lst_dir)
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        return None, f'cannot read ({e.strerror})'
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        return None, 'cannot decode'
    if data[:2] == b'\xff\xd8' and not data.rstrip(b'\0\r\n ').endswith(b'\xff\xd9'):
        return None, 'truncated JPEG'
    h, w = image_size
    if aligned:
        if img.shape[:2] == (h, w):
            return data, None
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    else:
        try:
            img = bbox_crop(img, bbox, h, w) if landmarks is None else norm_crop(img, landmarks, h, w)
        except ValueError as e:
            return None, str(e)
    ok, buf = cv2.imencode(encoding, img, params)
    return (buf.tobytes(), None) if ok else (None, f'cannot encode as {encoding}')


_worker_jobs = None   # the job list, inherited by forked pool workers (tasks carry only index ranges)


def _init_worker(jobs, parent):
    """Pool worker set-up: default signal handling (the parent stops its workers) and, on Linux, death
    with the parent, so a SIGKILLed packer leaves no orphan workers blocked on the task queue."""
    global _worker_jobs
    _worker_jobs = jobs
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    if os.getppid() != parent:   # the parent died before prctl took effect
        os._exit(1)


def _encode_range(bounds):
    """encode_image over jobs[start:stop] in a worker: one small task message, one result message."""
    start, stop = bounds
    return [encode_image(job) for job in _worker_jobs[start:stop]]


def encoded_images(jobs, num_threads):
    """encode_image results in job order, over `num_threads` processes when more than one.

    Work goes out in chunks of consecutive jobs named by index range; the forked workers already
    hold the job list (fork start: no pickling), so only the encoded bytes come back. Stopping early
    (an error, SIGTERM) cancels the queued chunks and waits for the running ones: the executor keeps
    reading results until its workers exit, where `Pool.terminate()` can deadlock on a worker blocked
    writing a large result.
    """
    if num_threads <= 1:
        yield from map(encode_image, jobs)
        return
    chunk = max(4, min(64, len(jobs) // (8 * num_threads)))
    ranges = [(a, min(a + chunk, len(jobs))) for a in range(0, len(jobs), chunk)]
    # No cv2.setNumThreads in the children: reconfiguring OpenCV's inherited pool after a fork
    # deadlocks; its parallel loops themselves are fork-safe.
    with concurrent.futures.ProcessPoolExecutor(num_threads, mp_context=multiprocessing.get_context('fork'),
                                                initializer=_init_worker, initargs=(jobs, os.getpid())) as pool:
        try:
            with signals_deferred():   # the workers are forked here: no signal handler runs in fork hooks
                chunks = pool.map(_encode_range, ranges)
            for results in chunks:
                yield from results
        finally:
            pool.shutdown(cancel_futures=True)


def _shard_bounds(group_sizes, num_shards):
    """Shard index of each identity: contiguous identities, about N/S images per shard."""
    cumulative = np.cumsum(group_sizes) - np.asarray(group_sizes) / 2.0
    total = float(np.sum(group_sizes))
    return np.minimum((cumulative * num_shards / total).astype(int), num_shards - 1)


class _Plan:
    """One `.lst` read and checked before any image is encoded: items in rec order, attributes, groups."""

    def __init__(self, lst_path, table, num_shards):
        self.lst_path = os.fspath(lst_path)
        self.out_prefix = os.path.splitext(self.lst_path)[0]
        self.items = _group_by_label(read_lst(self.lst_path), self.lst_path)
        if not self.items:
            raise UserError(f'{self.lst_path}: empty .lst')
        self.lst_dir = os.path.dirname(os.path.abspath(self.lst_path))
        self.attrs = [()] * len(self.items)
        if table is not None:
            self.attrs = [table.lookup(it.path, resolve_lst_path(it.path, self.lst_dir)) for it in self.items]
            missing = [it.path for it, a in zip(self.items, self.attrs) if a is None]
            if missing:
                raise UserError(f'{table.csv_path}: no row for {len(missing)} of {len(self.items)} images '
                                f'of {self.lst_path} (first: {missing[0]})')
        labels = np.array([it.label for it in self.items])
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        self.sizes = np.diff(np.r_[starts, len(self.items)])
        if num_shards > len(self.sizes):
            raise UserError(f'{self.lst_path}: {num_shards} shards but only {len(self.sizes)} identities')
        self.shard_of = _shard_bounds(self.sizes, num_shards)
        self.num_identities = len(self.sizes)
        self.num_classes = int(labels.max()) + 1

    def input_bytes(self):
        """Bytes of the input images: about what the rec will take (aligned images are copied)."""
        total = 0
        for it in self.items:
            with contextlib.suppress(OSError):
                total += os.path.getsize(resolve_lst_path(it.path, self.lst_dir))
        return total


def _write_plan(plan, num_threads, quality, encoding, num_shards, table, image_size):
    """Pack one planned `.lst` into `PREFIX.rec` or the shards `PREFIX_s.rec` + manifest; a summary."""
    start = time.time()
    items, out_prefix = plan.items, plan.out_prefix
    names = table.names if table is not None else None
    codes = table.codes if table is not None else None
    prefixes = [out_prefix] if num_shards == 1 else shard_prefixes(out_prefix, num_shards)
    params = _encode_params(encoding, quality)
    # Paths are resolved in the workers (a stat each): the main process only writes.
    jobs = [(it.path, plan.lst_dir, it.aligned, it.bbox, it.landmarks, tuple(image_size), encoding, params)
            for it in items]
    writers, skipped = [], []
    results = encoded_images(jobs, num_threads)
    try:
        writers = [IdentityRecordWriter(p, image_size, names, codes, write_property=False) for p in prefixes]
        position = 0
        for group, size in enumerate(plan.sizes):
            images = []
            for i in range(position, position + size):
                data, reason = next(results)
                if data is None:
                    skipped.append((items[i].path, reason))
                else:
                    images.append((data, items[i].aligned, plan.attrs[i]))
            writers[plan.shard_of[group]].add_identity(items[position].label, images)
            position += size
            check_terminated()
        results.close()   # every result is in: stop the worker processes before committing
        num_images = sum(w.num_images for w in writers)
        _write_skipped(out_prefix + '.skipped.txt', skipped)
        if num_images == 0:
            raise UserError(f'{plan.lst_path}: no usable images ({len(skipped)} skipped, '
                            f'see {out_prefix}.skipped.txt)')
        summaries = [w.finish() for w in writers]
        previous = _previous_shards(out_prefix)
        check_terminated()
        with signals_deferred():   # one generation: all shards renamed, or none
            if num_shards > 1:
                write_manifest(out_prefix, summaries)
            for w in writers:
                w.commit()
            _remove_superseded(out_prefix, prefixes, previous)
    except BaseException as e:
        for w in writers:
            w.abort()
        results.close()   # the forked workers hold the temporaries open: their space is free once they exit
        if is_disk_full(e):
            raise no_space_error(out_prefix + ('.rec' if num_shards == 1 else '_*.rec'), plan.input_bytes()) from None
        raise
    finally:
        results.close()   # stops the worker processes, if any
    if skipped:
        log.warning('%s: skipped %d images, listed in %s.skipped.txt', plan.lst_path, len(skipped), out_prefix)
    return {'images': sum(s['images'] for s in summaries),
            'identities': sum(s['identities'] for s in summaries),
            'skipped': len(skipped), 'shards': len(summaries),
            'seconds': time.time() - start,
            'outputs': [s['rec'] for s in summaries],
            'num_classes': max(s['max_identity'] for s in summaries if s['max_identity'] is not None) + 1}


_OUTPUT_SUFFIXES = ('.rec', '.idx', '.attributes.json')


def _previous_shards(out_prefix):
    """The shard prefixes the prefix's current manifest names: what a new generation supersedes."""
    folder = os.path.dirname(os.path.abspath(out_prefix))
    try:
        manifest = read_manifest(out_prefix)
    except UserError:   # unreadable: its shards cannot be told apart from anything else
        return []
    return [os.path.join(folder, os.path.basename(s['rec'])[:-len('.rec')]) for s in (manifest or {}).get('shards', [])]


def _remove_superseded(out_prefix, written, previous):
    """After a commit, drop the prefix's outputs the new generation replaces: the single rec after shards
    were written, the manifest after a single rec was, and `previous` shards that were not rewritten.
    Numbered recs no manifest names are left alone: they may be another list's output, and the reader
    ignores them beside a manifest or a single rec."""
    keep = {os.path.abspath(p) for p in written}
    if len(written) == 1:
        with contextlib.suppress(FileNotFoundError):
            os.remove(manifest_path(out_prefix))   # the reader now takes the single rec
    for prefix in dict.fromkeys([os.path.abspath(out_prefix)] + previous):
        if prefix in keep:
            continue
        for suffix in _OUTPUT_SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(prefix + suffix)


def _remove_stale_temps(out_prefix):
    """Temporary files a killed run on this prefix left (`.train.rec.XXXX.tmp`, `.train_3.idx.XXXX.tmp`).

    Only called under the folder's lock, so no live packer owns them.
    """
    folder = os.path.dirname(os.path.abspath(out_prefix))
    pattern = re.compile(r'^\.%s(_\d+)?(\.rec|\.idx|\.attributes\.json|\.skipped\.txt|\.shards\.json)\.\w+\.tmp$'
                         % re.escape(os.path.basename(out_prefix)))
    stale = [f for f in os.listdir(folder) if pattern.match(f)]
    for f in stale:
        os.remove(os.path.join(folder, f))
    if stale:
        log.warning('%s: removed %d temporary files of an interrupted run (%s)', folder, len(stale),
                    ', '.join(stale[:3]) + (', ...' if len(stale) > 3 else ''))


def _write_skipped(path, skipped):
    if skipped:
        with atomic_open(path) as f:
            f.writelines(f'{p}\t{reason}\n' for p, reason in skipped)
    elif os.path.exists(path):
        os.remove(path)


def _check_properties(plans, image_size):
    """Refuse, before any image is encoded, a `property` this run could not write consistently.

    `property` is per folder (insightface): one class count and image size for every rec in it. Lists
    packed together into one folder get the largest count, which must still fit each of them
    (`check_classes`). An existing `property` that differs may be replaced only when the folder holds
    no rec besides this run's own outputs; otherwise it serves another rec and the run is refused.
    """
    for path, group in _by_property(plans).items():
        want = (max(p.num_classes for p in group), int(image_size[0]), int(image_size[1]))
        for plan in group:
            check_classes(path, want[0], plan.num_identities, plan.num_classes - 1, plan.lst_path)
        have = read_property(path)
        if have is not None and tuple(have) != want:
            ours = {os.path.basename(p.out_prefix) for p in group}
            others = sorted(f for f in os.listdir(os.path.dirname(path)) if f.endswith('.rec')
                            and split_prefix(f) not in ours and (parse_shard(f) or ('',))[0] not in ours)
            if others:
                raise UserError(f'{path}: says {",".join(map(str, have))} for {", ".join(others)}; '
                                f'{group[0].lst_path} needs {",".join(map(str, want))}: pack it into a folder '
                                f'of its own (property is per folder)')


def _by_property(plans):
    """{property path: the plans whose recs it describes}."""
    out = {}
    for plan in plans:
        out.setdefault(property_path(plan.out_prefix), []).append(plan)
    return out


def pack(prefix, num_threads=1, quality=95, encoding='.jpg', num_shards=1, attributes=None,
         image_size=(112, 112), codes=None):
    """Pack every `PREFIX*.lst` (as insightface's face2rec2); write `property`; return a summary dict.

    `attributes`: a CSV path (see AttributeTable) whose columns become label[2:]. `codes`: what the
    CSV's integer codes mean, {column: {code: meaning}} or a JSON file of it (default: the CSV's
    `codes_path` file if present); recorded in `PREFIX.attributes.json`. Each output folder is locked
    (`recognition.locking.folder_lock`, `.lock`) for the run; temporary files a killed earlier run on
    these prefixes left are removed first.
    """
    if codes is not None and not attributes:
        raise UserError(f'{prefix}: attribute codes given without an attribute CSV')
    prefix = os.fspath(prefix)
    lsts = sorted(glob.glob(glob.escape(prefix) + '*.lst'))
    if not lsts:
        raise UserError(f'{prefix}*.lst: no .lst file found')
    if num_shards < 1 or num_threads < 1:
        raise UserError(f'{prefix}: --num-shards and --num-thread must be at least 1')
    encoding = encoding if encoding.startswith('.') else '.' + encoding
    if encoding not in ('.jpg', '.jpeg', '.png'):
        raise UserError(f'{prefix}: unsupported --encoding {encoding} (use .jpg or .png)')
    table = AttributeTable(attributes, codes) if attributes else None
    start = time.time()
    with contextlib.ExitStack() as locks:
        # One packer per output folder: its recs share the folder's `property`.
        for folder in sorted({os.path.dirname(os.path.abspath(lst)) for lst in lsts}):
            locks.enter_context(folder_lock(folder, 'face2rec2'))
        for lst in lsts:
            _remove_stale_temps(os.path.splitext(lst)[0])
        plans = [_Plan(lst, table, num_shards) for lst in lsts]
        _check_properties(plans, image_size)
        results = {plan.lst_path: _write_plan(plan, num_threads, quality, encoding, num_shards, table, image_size)
                   for plan in plans}
        for path, group in _by_property(plans).items():
            # The classes of the identities written (a list's last identities may have lost every image).
            k = max(results[plan.lst_path]['num_classes'] for plan in group)
            have = read_property(path)
            if have is not None and tuple(have) != (k, *image_size):
                log.info('%s: %s replaced by %d,%d,%d', path, ','.join(map(str, have)), k, *image_size)
            write_property(path, k, image_size)   # a full disk: atomic_open's one-line error
    results = list(results.values())
    return {'images': sum(r['images'] for r in results),
            'identities': sum(r['identities'] for r in results),
            'skipped': sum(r['skipped'] for r in results),
            'shards': sum(r['shards'] for r in results),
            'seconds': time.time() - start,
            'outputs': [o for r in results for o in r['outputs']]}
