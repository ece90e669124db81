"""Which recs make up a training set: `PREFIX.rec`, or the shards `PREFIX_0.rec ...` of one packing run.

`face2rec2 --num-shards S` commits its shards as one generation with a manifest, `PREFIX.shards.json`:

    {"shards": [{"rec": "train_0.rec", "rec_bytes": ..., "idx_bytes": ..., "images": ..., "identities": ...,
                 "first_identity": ..., "max_identity": ...}, ...], "identities": K, "max_identity": M}

The packer writes it after every shard is complete under its temporary name and before renaming any
shard into place, so every interrupted state is either the previous generation untouched or shards
whose sizes the manifest refuses by name (a mixed or incomplete set); the next run replaces both.
A prefix's manifest takes precedence over its single `PREFIX.rec` (the packer removes the files
one kind of output supersedes). Shard sets without manifest, packed before it existed, are accepted
when they are numbered 0..S-1 and their identity ids follow on from shard to shard (shard s+1
starts at shard s's last id + 1, as a `.lst` labelled 0..K-1 packs); anything else is refused with
the advice to re-pack. Single recs without manifest (insightface's own `train.rec`) load as they are.
"""
import glob
import json
import logging
import os
import re

import numpy as np

from recognition.data.record import RecordFile, split_prefix
from recognition.utils import UserError, write_json

log = logging.getLogger(__name__)

_SHARD = re.compile(r'^(?P<prefix>.*)_(?P<index>\d+)\.rec$')


def manifest_path(prefix):
    return split_prefix(prefix) + '.shards.json'


def shard_prefixes(prefix, num_shards):
    """`PREFIX_0 ... PREFIX_{S-1}`, the names face2rec2 --num-shards writes."""
    return ['%s_%d' % (split_prefix(prefix), s) for s in range(num_shards)]


def parse_shard(path):
    """(PREFIX, n) of a shard rec `PREFIX_<n>.rec` (the names `shard_prefixes` gives), else None."""
    m = _SHARD.match(os.path.basename(path))
    if not m:
        return None
    return os.path.join(os.path.dirname(os.fspath(path)), m.group('prefix')), int(m.group('index'))


def rec_order(paths):
    """Rec paths sorted by prefix, each prefix's shards in numeric order (`train_2` before `train_10`)."""
    return sorted(paths, key=lambda p: parse_shard(p) or (split_prefix(os.fspath(p)), -1))


def write_manifest(prefix, summaries):
    """Write `PREFIX.shards.json` from the shard writers' summaries (`IdentityRecordWriter.finish()`)."""
    shards = [{'rec': os.path.basename(s['rec']), **{k: s[k] for k in (
        'rec_bytes', 'idx_bytes', 'images', 'identities', 'first_identity', 'max_identity')}} for s in summaries]
    ids = [s['max_identity'] for s in summaries if s['max_identity'] is not None]
    write_json(manifest_path(prefix), {'shards': shards, 'identities': sum(s['identities'] for s in summaries),
                                       'max_identity': max(ids) if ids else None})


def read_manifest(prefix):
    """The manifest dict of `prefix`, or None if it has none."""
    path = manifest_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
        valid = (isinstance(doc, dict) and isinstance(doc.get('shards'), list) and doc['shards']
                 and isinstance(doc.get('identities'), int)
                 and all(isinstance(s, dict) and isinstance(s.get('rec'), str) and isinstance(s.get('rec_bytes'), int)
                         and isinstance(s.get('idx_bytes'), int) for s in doc['shards']))
    except (OSError, ValueError) as e:
        raise UserError(f'{path}: not a readable shard manifest ({e}); re-run face2rec2') from None
    if not valid:
        raise UserError(f'{path}: not a shard manifest (expected {{"shards": [{{"rec", "rec_bytes", '
                        f'"idx_bytes", ...}}], "identities"}}); re-run face2rec2')
    return doc


def _check_shard(manifest, folder, shard):
    """The shard's rec and idx exist with the sizes the manifest recorded; else a one-line refusal."""
    rec = os.path.join(folder, shard['rec'])
    idx = split_prefix(rec) + '.idx'
    for path, want in ((rec, shard['rec_bytes']), (idx, shard['idx_bytes'])):
        if not os.path.isfile(path):
            raise UserError(f'{path}: missing, but {manifest} names it: the shard set is incomplete '
                            f'(interrupted packing?); re-run face2rec2')
        have = os.path.getsize(path)
        if have != want:
            raise UserError(f'{path}: {have} bytes, but {manifest} says {want}: this shard is from another '
                            f'packing run than the manifest (mixed shard set); re-run face2rec2')
    return rec


def _legacy_shards(prefix, shards):
    """Shards without manifest: accepted when numbered 0..S-1 with identity ids following on."""
    numbers = [parse_shard(p)[1] for p in shards]
    if numbers != list(range(len(shards))):
        missing = sorted(set(range(len(shards))) - set(numbers))
        names = ', '.join(map(os.path.basename, shards))
        raise UserError(f'{prefix}_{missing[0]}.rec: missing from the shard set {names} '
                        f'(no {os.path.basename(manifest_path(prefix))} manifest); re-pack with face2rec2')
    previous = None
    for path in shards:
        first, last = _identity_span(path)
        if previous is not None and first != previous[1] + 1:
            raise UserError(f'{path}: starts at identity {first}, but {previous[0]} ends at {previous[1]} '
                            f'(a mixed shard set without {os.path.basename(manifest_path(prefix))}); '
                            f're-pack with face2rec2')
        previous = (path, last)
    log.warning('%s: %d shards without manifest, identity ids consecutive: accepted as one set',
                prefix, len(shards))
    return shards


def _identity_span(path):
    """(first, last) identity id of an identity-indexed rec: header, two identity records, two labels."""
    record = RecordFile(path)
    try:
        flag, label, body = record.unpack(0) if 0 in record else (None, None, None)
        if flag != 2 or body:
            raise UserError(f'{path}: a shard without identity index cannot be checked as part of a set; '
                            f're-pack with face2rec2')
        first_key, stop = int(label[0]), int(label[1])
        if stop <= first_key:
            raise UserError(f'{path}: a shard without identities; re-pack with face2rec2')
        ends = [record.read_label(k)[1] for k in (first_key, stop - 1)]
        ids = []
        for start in (int(ends[0][0]), int(ends[1][0])):
            lab = record.read_label(start)[1]
            ids.append(int(lab if np.ndim(lab) == 0 else lab[0]))
        return ids[0], ids[1]
    finally:
        record.close()


def shard_set(prefix):
    """The rec paths of a training set `prefix`, checked as one generation (see the module docstring)."""
    prefix = split_prefix(prefix)
    folder = os.path.dirname(os.path.abspath(prefix))
    manifest = read_manifest(prefix)
    if manifest is not None:
        recs = [_check_shard(manifest_path(prefix), folder, s) for s in manifest['shards']]
        named = set(map(os.path.abspath, recs))
        extra = [p for p in _numbered_shards(prefix) if os.path.abspath(p) not in named]
        if extra:
            log.warning('%s: not in %s, ignored: %s', folder, os.path.basename(manifest_path(prefix)),
                        ', '.join(map(os.path.basename, extra)))
        return recs
    if os.path.isfile(prefix + '.rec'):
        return [prefix + '.rec']
    shards = _numbered_shards(prefix)
    return _legacy_shards(prefix, shards) if shards else []


def _numbered_shards(prefix):
    """`PREFIX_<n>.rec` files in numeric order (train_2 before train_10)."""
    return rec_order(p for p in glob.glob(glob.escape(prefix) + '_*.rec')
                     if (parse_shard(p) or ('',))[0] == prefix)


def set_totals(rec_paths):
    """(identities, max identity id) of the whole shard set the paths belong to, from its manifest;
    None when the paths are not shards named by one manifest (then the recs themselves are the set)."""
    prefixes = set()
    for path in rec_paths:
        shard = parse_shard(path)
        if not shard:
            return None
        prefixes.add(shard[0])
    if len(prefixes) != 1:
        return None
    manifest = read_manifest(prefixes.pop())
    if manifest is None or manifest.get('max_identity') is None:
        return None
    return int(manifest['identities']), int(manifest['max_identity'])


def check_against_manifest(rec_paths):
    """Refuse any shard among `rec_paths` whose prefix has a manifest that does not name it at its size."""
    for path in rec_paths:
        shard = parse_shard(path)
        if not shard or os.path.isfile(split_prefix(path) + '.lst'):
            continue   # not a shard name, or the output of a list of its own (`train_1.lst`)
        prefix = shard[0]
        manifest = read_manifest(prefix)
        if manifest is None:
            continue
        entry = [s for s in manifest['shards'] if s['rec'] == os.path.basename(path)]
        if not entry:
            raise UserError(f'{path}: not part of the shard set {manifest_path(prefix)} names '
                            f'(left from an earlier packing run)')
        _check_shard(manifest_path(prefix), os.path.dirname(os.fspath(path)) or '.', entry[0])


def training_recs(folder, dataset_name):
    """The training recs of a dataset folder: its `train` set (single rec or one shard generation)."""
    recs = shard_set(os.path.join(folder, 'train'))
    if not recs:
        raise UserError(f'{os.path.join(folder, "train.rec")}: training rec not found (dataset {dataset_name!r}; '
                        f'build it with data_process/face2rec2.py or give --data-dir)')
    return recs
