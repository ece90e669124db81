"""The demo datasets built from synthetic faces: an MS1M-shaped pretraining set and a FairFace-shaped
train/val/test set (layout: docs/architecture.md, "The demo datasets").

The imbalance mirrors the FairFace challenge: dark-skinned females have fewer identities (and the
renderer draws them more alike, `synthetic_faces.MINORITY_SPREAD`), so a model trained on the data
shows a measurable bias for that group that later finetuning can reduce.

Every image has its own random stream, seeded by (seed, split, identity, image), so any subset
renders to the same bytes in any order or process.
"""
import csv
import os
import shutil
from dataclasses import dataclass

import cv2
import numpy as np

from recognition.alignment.geometry import norm_crop
from recognition.data.bin import write_bin
from recognition.data.lst import dir_to_lst, write_lst
from recognition.data.packer import codes_path, pack, write_codes
from recognition.data.synthetic_faces import (ATTRIBUTE_CODES, GROUPS, render_aligned, render_photo,
                                              sample_identity, sample_variation)
from recognition.groups import group_label, group_name
from recognition.utils import UserError, atomic_open, write_json
from recognition.worker_pool import spawn_pool

# Shares of identities per group: MS1M is dominated by light-skinned males; the FairFace train split
# is less skewed; val/test are balanced so every group has pairs.
EMORE_SHARES = {(1, 0): 0.50, (0, 0): 0.25, (1, 1): 0.17, (0, 1): 0.08}
FAIRFACE_SHARES = {(1, 0): 0.36, (0, 0): 0.30, (1, 1): 0.22, (0, 1): 0.12}
BALANCED_SHARES = {g: 0.25 for g in GROUPS}
# Each split's code in every random stream's seed.
SPLIT_CODES = {'emore': 1, 'emore_ver': 2, 'train': 3, 'val': 4, 'test': 5, 'ijbc': 6, 'rfw': 7, 'bfw': 8}
# The benchmark layouts' stand-in demography: RFW subsets and BFW ethnicities drawn as light or dark skin.
RFW_SUBSETS = {'African': 1, 'Asian': 0, 'Caucasian': 0, 'Indian': 1}
BFW_ETHNICITIES = {'asian': ('A', 0), 'black': ('B', 1), 'indian': ('I', 1), 'white': ('W', 0)}
BFW_GENDERS = {'females': ('F', 0), 'males': ('M', 1)}
BFW_CSV = 'bfw-datatable.csv'
BFW_COLUMNS = ('fold', 'p1', 'p2', 'label', 'id1', 'id2', 'att1', 'att2', 'a1', 'a2', 'g1', 'g2', 'e1', 'e2')


@dataclass
class DemoSizes:
    """How big the demo sets are; the defaults keep the whole demo chain within minutes on 2 cores."""
    emore_ids: int = 400        # MS1M-shaped pretraining identities (skewed to light-skinned males)
    emore_images: int = 20      # mean images per emore identity (each draws 0.75x..1.25x)
    emore_ver_ids: int = 60     # held-apart identities for lfw.bin and cfp_fp.bin
    ver_pairs: int = 1000       # pairs in each of lfw.bin and cfp_fp.bin
    train_ids: int = 150        # FairFace train identities
    train_images: int = 20      # mean images per train identity
    eval_ids: int = 40          # identities in each of val and test (balanced over the 4 groups)
    eval_images: int = 10       # photos per val/test identity
    eval_pairs: int = 3000      # pairs in each of val and test
    ijbc_ids: int = 24          # subjects of the IJB-C-shaped set (two templates each)
    rfw_ids: int = 8            # identities in each RFW-shaped subset
    bfw_ids: int = 8            # identities in each BFW-shaped subgroup
    bench_images: int = 4       # images per RFW / BFW identity

    def check(self):
        for name, value in vars(self).items():
            minimum = 4 if name.endswith('_ids') else 2
            if not isinstance(value, int) or value < minimum:
                raise UserError(f'--{name.replace("_", "-")}: must be an integer >= {minimum}, got {value!r}')


EMORE_FILES = ('train.rec', 'train.idx', 'property', 'train.attributes.json', 'lfw.bin', 'cfp_fp.bin')
EVAL_FILES = ('images', 'landmarks.txt', 'metadata.csv', 'predictions.csv', 'ground_truth.csv')
TRAIN_CSV = 'train_attributes.csv'   # the training images' attributes (beside it: codes_path)
IJBC_FILES = ('meta/ijbc_face_tid_mid.txt', 'meta/ijbc_template_pair_label.txt', 'meta/ijbc_name_5pts_score.txt',
              'loose_crop')
RFW_FILES = tuple(f'txts/{s}/{s}_pairs.txt' for s in RFW_SUBSETS)
BFW_FILES = (BFW_CSV,)
OPTIONAL_SETS = ('ijbc', 'rfw', 'bfw')  # built only when named (`--only`): the benchmarks' layouts for their tools
FAIRFACE_FILES = ('train', TRAIN_CSV, 'train.lst', 'train.rec', 'train.idx', 'property',
                  'train.attributes.json', 'val.bin') + tuple(f'{s}/{f}' for s in ('val', 'test') for f in EVAL_FILES)
SUMMARY_FILE = 'demo_summary.json'
TRAIN_COLUMNS = ('path', 'SUBJECT_ID', 'GENDER', 'SKIN_COLOUR', 'AGE', 'GLASSES', 'HEAD_POSE')
METADATA_COLUMNS = ('TEMPLATE_ID', 'SUBJECT_ID', 'AGE', 'SKIN_COLOUR', 'GENDER', 'HEAD_POSE', 'SOURCE', 'GLASSES',
                    'BOUNDING_BOX_SIZE')


def apportion(total, shares):
    """Identities per group for `total`, by largest remainder (every group gets at least one)."""
    raw = {g: total * shares[g] for g in GROUPS}
    counts = {g: max(1, int(raw[g])) for g in GROUPS}
    for g in sorted(GROUPS, key=lambda g: raw[g] - int(raw[g]), reverse=True):
        if sum(counts.values()) >= total:
            break
        counts[g] += 1
    while sum(counts.values()) > total:
        counts[max(counts, key=counts.get)] -= 1
    return counts


def make_identities(seed, split, total, shares, first_id=0):
    """The identities of a split: group counts by `shares`, in a seeded shuffled order."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split]])
    counts = apportion(total, shares)
    groups = [g for g in GROUPS for _ in range(counts[g])]
    order = rng.permutation(len(groups))
    return [sample_identity(np.random.default_rng([seed, SPLIT_CODES[split], i, 0]), *groups[j], first_id + i)
            for i, j in enumerate(order)]


def _encode(img, quality):
    return cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def _render_job(job):
    """Render the images of one identity (runs in worker processes; one random stream per image).

    kind 'aligned': (jpeg, attributes); kind 'photo': (jpeg, attributes, landmarks, box, aligned jpeg).
    """
    kind, seed, split, index, ident, poses = job
    out = []
    for j, pose in enumerate(poses):
        var = sample_variation(ident, np.random.default_rng([seed, SPLIT_CODES[split], index, 1, j]), pose)
        if kind == 'aligned':
            img, _ = render_aligned(ident, var)
            out.append((_encode(img, 95), var.attributes))
        else:
            img, lmk, box = render_photo(ident, var)
            out.append((_encode(img, 90), var.attributes, lmk, box, _encode(norm_crop(img, lmk), 95)))
    return out


def _worker_init():
    cv2.setNumThreads(1)


class _Renderer:
    """Maps render jobs over a pool of spawned processes (or in-process); results come back in job order."""

    def __init__(self, workers):
        self.pool = spawn_pool(workers, _worker_init) if workers > 1 else None

    def map(self, jobs):
        return self.pool.imap(_render_job, jobs, chunksize=4) if self.pool else map(_render_job, jobs)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def make_pairs(rng, first, second, group_of, num_pairs, same_group=0.8):
    """Balanced verification pairs, alternating positive and negative (every 10-fold split is balanced).

    first/second: {subject: [image keys]}; a pair takes one key from first and one from second
    (the same dict for ordinary pairs, frontal/profile dicts for cfp_fp). Positives are spread evenly
    over the protected groups; negatives pair subjects of the same group with probability
    `same_group` (hard pairs, as the challenge's) and of any other subject otherwise.
    Returns a list of (key1, key2, same).
    """
    subjects = sorted(set(first) & set(second))
    by_group = {}
    for s in subjects:
        by_group.setdefault(group_of[s], []).append(s)
    positives = {g: [(a, b) for s in members for a in first[s] for b in second[s] if a < b or first is not second]
                 for g, members in by_group.items()}
    want = num_pairs // 2
    chosen = []
    groups = sorted(positives, key=lambda g: len(positives[g]))
    for n, g in enumerate(groups):   # smallest first, leftovers go to the larger groups
        quota = (want - len(chosen)) // (len(groups) - n)
        pool = positives[g]
        take = rng.choice(len(pool), min(quota, len(pool)), replace=False)
        chosen += [pool[i] for i in sorted(take)]
    pos = [chosen[i] for i in rng.permutation(len(chosen))]
    neg, seen = [], set()
    attempts = 0
    while len(neg) < len(pos) and attempts < 100 * len(pos) + 1000:
        attempts += 1
        g = groups[len(neg) % len(groups)]
        s1 = by_group[g][rng.integers(len(by_group[g]))]
        others = by_group[g] if rng.random() < same_group and len(by_group[g]) > 1 else subjects
        s2 = others[rng.integers(len(others))]
        if s1 == s2:
            continue
        a = first[s1][rng.integers(len(first[s1]))]
        b = second[s2][rng.integers(len(second[s2]))]
        if (a, b) not in seen and (b, a) not in seen:
            seen.add((a, b))
            neg.append((a, b))
    pos = pos[:len(neg)]
    pairs = []
    for (a, b), (c, d) in zip(pos, neg):
        if rng.random() < 0.5:
            a, b = b, a
        pairs += [(a, b, 1), (c, d, 0)]
    return pairs


def _group_table(idents, counts=None):
    rows = {}
    for i, ident in enumerate(idents):
        r = rows.setdefault(group_label(group_name(*ident.group)), [0, 0])
        r[0] += 1
        r[1] += counts[i] if counts is not None else 0
    return {name: {'identities': r[0], 'images': r[1]} for name, r in sorted(rows.items())}


def _pair_stats(pairs, group_of_key):
    neg = [(a, b) for a, b, same in pairs if not same]
    same_group = sum(group_of_key[a] == group_of_key[b] for a, b in neg)
    return {'pairs': len(pairs), 'positive': len(pairs) - len(neg),
            'negative_same_group': same_group, 'negative_cross_group': len(neg) - same_group}


def _images_per_identity(seed, split, idents, mean):
    rng = np.random.default_rng([seed, SPLIT_CODES[split], 1 << 20])
    lo, hi = max(2, int(round(0.75 * mean))), max(2, int(round(1.25 * mean)))
    return [int(rng.integers(lo, hi + 1)) for _ in idents]


def _write_csv(path, header, rows):
    """The CSV, plus the meanings of its coded attribute columns in codes_path(path)."""
    with atomic_open(path, 'w', newline='') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(header)
        writer.writerows(rows)
    coded = {c: ATTRIBUTE_CODES[c] for c in header if c in ATTRIBUTE_CODES}
    if coded:
        write_codes(codes_path(path), coded)


def _write_summary(folder, summary):
    write_json(os.path.join(folder, SUMMARY_FILE), summary)



def _write_pairs_bin(path, pairs, image_of):
    """An insightface .bin of `pairs` (key1, key2, same), the images' JPEG bytes from image_of[key]."""
    write_bin(path, [image_of[k] for a, b, _ in pairs for k in (a, b)], [bool(same) for _, _, same in pairs])


def _build_train_set(folder, seed, split, num_ids, shares, mean_images, renderer):
    """The recipe of both training sets: render a split's identities as aligned crops into
    folder/train/<SUBJECT_ID>/<n>.jpg, write TRAIN_CSV (paths relative to train/) and train.lst,
    and pack them into folder/train.rec/.idx/property/.attributes.json.

    Returns (identities, images per identity).
    """
    idents = make_identities(seed, split, num_ids, shares)
    counts = _images_per_identity(seed, split, idents, mean_images)
    train_dir = os.path.join(folder, 'train')
    rows = []
    jobs = (('aligned', seed, split, i, ident, ['any'] * n) for i, (ident, n) in enumerate(zip(idents, counts)))
    for ident, results in zip(idents, renderer.map(jobs)):
        sub = '%05d' % ident.subject_id
        os.makedirs(os.path.join(train_dir, sub))
        for j, (data, attrs) in enumerate(results):
            rel = f'{sub}/{j:04d}.jpg'
            with open(os.path.join(train_dir, rel), 'wb') as f:
                f.write(data)
            rows.append((rel, ident.subject_id) + tuple(attrs[c] for c in TRAIN_COLUMNS[2:]))
    _write_csv(os.path.join(folder, TRAIN_CSV), TRAIN_COLUMNS, rows)
    write_lst(os.path.join(folder, 'train.lst'), dir_to_lst(train_dir, root=folder))
    pack(os.path.join(folder, 'train'), attributes=os.path.join(folder, TRAIN_CSV))
    return idents, counts


def _build_emore(folder, seed, sizes, renderer):
    idents, counts = _build_train_set(folder, seed, 'emore', sizes.emore_ids, EMORE_SHARES, sizes.emore_images,
                                      renderer)
    # Like faces_emore, the set is its rec: the images, list and CSV it was packed from go.
    for leftover in ('train', 'train.lst', TRAIN_CSV, codes_path(TRAIN_CSV)):
        path = os.path.join(folder, leftover)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    # Held-apart identities: half frontal and half profile-ish images each.
    ver = make_identities(seed, 'emore_ver', sizes.emore_ver_ids, BALANCED_SHARES, first_id=len(idents))
    half = max(2, sizes.emore_images // 4)
    jobs = (('aligned', seed, 'emore_ver', i, ident, ['frontal'] * half + ['profile'] * half)
            for i, ident in enumerate(ver))
    images, frontal, profile, group_of = [], {}, {}, {}
    for ident, results in zip(ver, renderer.map(jobs)):
        for j, (data, attrs) in enumerate(results):
            (frontal if j < half else profile).setdefault(ident.subject_id, []).append(len(images))
            group_of[len(images)] = ident.group
            images.append(data)
    groups = {ident.subject_id: ident.group for ident in ver}
    rng = np.random.default_rng([seed, SPLIT_CODES['emore_ver'], 1 << 21])
    summary = {'train': _group_table(idents, counts), 'held_apart': _group_table(ver, [2 * half] * len(ver))}
    for name, (first, second) in {'lfw': (frontal, frontal), 'cfp_fp': (frontal, profile)}.items():
        pairs = make_pairs(rng, first, second, groups, sizes.ver_pairs)
        _write_pairs_bin(os.path.join(folder, name + '.bin'), pairs, images)
        summary[name] = _pair_stats(pairs, group_of)
    return summary


def _build_eval(folder, split, seed, sizes, idents, renderer):
    """val/ or test/: photos, true landmarks, metadata, the pair template and ground truth.

    Returns (pairs as template id tuples, {template id: aligned jpeg}, summary).
    """
    os.makedirs(os.path.join(folder, 'images'))
    jobs = (('photo', seed, split, i, ident, ['any'] * sizes.eval_images) for i, ident in enumerate(idents))
    total = len(idents) * sizes.eval_images
    template_ids = np.random.default_rng([seed, SPLIT_CODES[split], 1 << 22]).permutation(total).tolist()
    meta, landmarks, aligned, by_subject, group_of = [], [], {}, {}, {}
    k = 0
    for ident, results in zip(idents, renderer.map(jobs)):
        for data, attrs, lmk, box, crop in results:
            tid = template_ids[k]
            k += 1
            with open(os.path.join(folder, 'images', f'{tid}.jpg'), 'wb') as f:
                f.write(data)
            meta.append((tid, ident.subject_id, attrs['AGE'], attrs['SKIN_COLOUR'], attrs['GENDER'],
                         attrs['HEAD_POSE'], attrs['SOURCE'], attrs['GLASSES'], box))
            landmarks.append((tid, ' '.join('%.2f' % v for v in np.asarray(lmk).reshape(-1))))
            aligned[tid] = crop
            by_subject.setdefault(ident.subject_id, []).append(tid)
            group_of[tid] = ident.group
    meta.sort()
    landmarks.sort()
    with atomic_open(os.path.join(folder, 'landmarks.txt')) as f:
        f.writelines(f'{tid}.jpg {points}\n' for tid, points in landmarks)
    _write_csv(os.path.join(folder, 'metadata.csv'), METADATA_COLUMNS, meta)
    rng = np.random.default_rng([seed, SPLIT_CODES[split], 1 << 21])
    pairs = make_pairs(rng, by_subject, by_subject, {i.subject_id: i.group for i in idents}, sizes.eval_pairs)
    _write_csv(os.path.join(folder, 'predictions.csv'), ('TEMPLATE_ID1', 'TEMPLATE_ID2', 'SCORE'),
               [(a, b, '') for a, b, _ in pairs])
    _write_csv(os.path.join(folder, 'ground_truth.csv'), ('TEMPLATE_ID1', 'TEMPLATE_ID2', 'LABEL'), pairs)
    summary = {'photos': _group_table(idents, [sizes.eval_images] * len(idents))}
    summary.update(_pair_stats(pairs, group_of))
    return pairs, aligned, summary




def _build_fairface(folder, seed, sizes, renderer):
    idents, counts = _build_train_set(folder, seed, 'train', sizes.train_ids, FAIRFACE_SHARES, sizes.train_images,
                                      renderer)
    summary = {'train': _group_table(idents, counts)}
    next_id = len(idents)
    for split in ('val', 'test'):
        members = make_identities(seed, split, sizes.eval_ids, BALANCED_SHARES, first_id=next_id)
        next_id += len(members)
        pairs, aligned, summary[split] = _build_eval(os.path.join(folder, split), split, seed, sizes, members,
                                                     renderer)
        if split == 'val':
            _write_pairs_bin(os.path.join(folder, 'val.bin'), pairs, aligned)
    return summary


def _build_ijbc(folder, seed, sizes, renderer):
    """insightface's IJB-C layout: loose crops, the three meta files. Each subject has two templates of one
    or two media of one or two frames; its templates make one genuine pair, and three impostor pairs
    join its first template to the second of the next three subjects."""
    idents = make_identities(seed, 'ijbc', sizes.ijbc_ids, BALANCED_SHARES)
    rng = np.random.default_rng([seed, SPLIT_CODES['ijbc'], 1 << 20])
    plan = [[[int(rng.integers(1, 3)) for _ in range(int(rng.integers(1, 3)))] for _ in range(2)] for _ in idents]
    jobs = (('photo', seed, 'ijbc', i, ident, ['any'] * sum(map(sum, plan[i]))) for i, ident in enumerate(idents))
    for sub in ('meta', 'loose_crop'):
        os.makedirs(os.path.join(folder, sub))
    faces, points, templates, n_templates, n_media = [], [], [], 0, 0
    for i, results in enumerate(renderer.map(jobs)):
        shots = iter(results)
        templates.append([])
        for template_media in plan[i]:
            n_templates += 1
            templates[-1].append(n_templates)
            for frames in template_media:
                n_media += 1
                for _ in range(frames):
                    data, _, lmk, _, _ = next(shots)
                    name = f'{len(faces) + 1}.jpg'
                    with open(os.path.join(folder, 'loose_crop', name), 'wb') as f:
                        f.write(data)
                    faces.append((name, n_templates, n_media))
                    points.append(f'{name} ' + ' '.join('%.3f' % v for v in np.ravel(lmk)) +
                                  f' {rng.uniform(0.5, 1.0):.4f}')
    n = len(idents)
    pairs = [(t[0], t[1], 1) for t in templates]
    pairs += [(templates[i][0], templates[(i + d) % n][1], 0) for i in range(n) for d in (1, 2, 3)]
    meta = os.path.join(folder, 'meta')
    for name, lines in (('ijbc_face_tid_mid.txt', [' '.join(map(str, f)) for f in faces]),
                        ('ijbc_name_5pts_score.txt', points),
                        ('ijbc_template_pair_label.txt', [' '.join(map(str, p)) for p in pairs])):
        with atomic_open(os.path.join(meta, name)) as f:
            f.writelines(line + '\n' for line in lines)
    return {'ijbc': {'subjects': n, 'templates': 2 * n, 'faces': len(faces), 'genuine': n, 'impostor': 3 * n}}


def _aligned_identities(split, seed, groups, images, renderer):
    """Render `images` aligned crops of each (gender, skin) in `groups` (one identity each, in order)."""
    idents = [sample_identity(np.random.default_rng([seed, SPLIT_CODES[split], i, 0]), g, k, i)
              for i, (g, k) in enumerate(groups)]
    jobs = (('aligned', seed, split, i, ident, ['any'] * images) for i, ident in enumerate(idents))
    return [[data for data, _ in results] for results in renderer.map(jobs)]


def _write_image(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def _build_rfw(folder, seed, sizes, renderer):
    """RFW's layout: data/<subset>/<id>/<id>_000N.jpg (aligned crops) and txts/<subset>/<subset>_pairs.txt,
    ten folds of k positive then k negative LFW-style lines."""
    k_ids, n_img = sizes.rfw_ids, sizes.bench_images
    groups = [(i % 2, skin) for skin in RFW_SUBSETS.values() for i in range(k_ids)]
    crops = _aligned_identities('rfw', seed, groups, n_img, renderer)
    rng = np.random.default_rng([seed, SPLIT_CODES['rfw'], 1 << 21])
    summary = {}
    for s, subset in enumerate(RFW_SUBSETS):
        names = [f'm.{subset[:2].lower()}{i:04d}' for i in range(k_ids)]
        for i, name in enumerate(names):
            for j, data in enumerate(crops[s * k_ids + i]):
                _write_image(os.path.join(folder, 'data', subset, name, f'{name}_{j + 1:04d}.jpg'), data)
        pool = [(i, a, b) for i in range(k_ids) for a in range(1, n_img + 1) for b in range(a + 1, n_img + 1)]
        k = min(30, max(1, len(pool) // 10))
        pos = [pool[j] for j in rng.choice(len(pool), 10 * k, replace=len(pool) < 10 * k)]
        lines = []
        for fold in range(10):
            lines += [f'{names[i]}\t{a}\t{b}' for i, a, b in pos[fold * k:(fold + 1) * k]]
            for _ in range(k):
                i, j = rng.choice(k_ids, 2, replace=False)
                lines.append(f'{names[i]}\t{rng.integers(1, n_img + 1)}\t{names[j]}\t{rng.integers(1, n_img + 1)}')
        path = os.path.join(folder, 'txts', subset, f'{subset}_pairs.txt')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_open(path) as f:
            f.writelines(line + '\n' for line in lines)
        summary[subset] = {'identities': k_ids, 'images': k_ids * n_img, 'pairs': 20 * k}
    return {'rfw': summary}


def _build_bfw(folder, seed, sizes, renderer):
    """BFW's layout: <subgroup>/<nNNNNNN>/<NNNN>_01.jpg (aligned crops) and its datatable CSV: every genuine
    pair of each identity and as many impostor pairs within its subgroup; the fold is the first
    subject's (1..5)."""
    subgroups = [(f'{e}_{g}', ea, ga, skin, gender) for e, (ea, skin) in BFW_ETHNICITIES.items()
                 for g, (ga, gender) in BFW_GENDERS.items()]
    k_ids, n_img = sizes.bfw_ids, sizes.bench_images
    crops = _aligned_identities('bfw', seed, [(gender, skin) for *_, skin, gender in subgroups for _ in range(k_ids)],
                                n_img, renderer)
    rng = np.random.default_rng([seed, SPLIT_CODES['bfw'], 1 << 21])
    rows = []
    for s, (att, ea, ga, _, _) in enumerate(subgroups):
        ids = list(range(s * k_ids, (s + 1) * k_ids))
        path = lambda i, j: f'{att}/n{i:06d}/{j + 1:04d}_01.jpg'
        for i in ids:
            for j, data in enumerate(crops[i]):
                _write_image(os.path.join(folder, path(i, j)), data)
        genuine = [(i, a, i, b) for i in ids for a in range(n_img) for b in range(a + 1, n_img)]
        impostor = [(i, a, j, b) for i in ids for j in ids if i < j for a in range(n_img) for b in range(n_img)]
        impostor = [impostor[t] for t in sorted(rng.choice(len(impostor), min(len(impostor), len(genuine)),
                                                           replace=False))]
        for label, pairs in ((1, genuine), (0, impostor)):
            rows += [(1 + i % 5, path(i, a), path(j, b), label, i, j, att, att, ea + ga, ea + ga, ga, ga, ea, ea)
                     for i, a, j, b in pairs]
    with atomic_open(os.path.join(folder, BFW_CSV), 'w', newline='') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(BFW_COLUMNS)
        writer.writerows(rows)
    return {'bfw': {'subgroups': len(subgroups), 'identities': len(crops), 'pairs': len(rows),
                    'genuine': sum(r[3] for r in rows)}}


def _complete(folder, files):
    return all(os.path.exists(os.path.join(folder, f)) for f in files)


def build_demo(out_dir='datasets', seed=0, only=None, force=False, sizes=None, workers=1, log=print):
    """Build datasets/demo_emore and/or datasets/demo_fairface (see docs/architecture.md), or, named by
    `only`, one of the benchmark layouts demo_ijbc, demo_rfw, demo_bfw.

    Deterministic from `seed` (the same bytes for any `workers`). Each set is built in a temporary
    folder and renamed into place at the end; an existing complete set is kept unless `force`.
    Returns {set name: summary dict}.
    """
    sizes = sizes or DemoSizes()
    sizes.check()
    builders = {'emore': (_build_emore, EMORE_FILES), 'fairface': (_build_fairface, FAIRFACE_FILES),
                'ijbc': (_build_ijbc, IJBC_FILES), 'rfw': (_build_rfw, RFW_FILES), 'bfw': (_build_bfw, BFW_FILES)}
    if only is not None and only not in builders:
        raise UserError(f'--only {only!r}: expected one of {", ".join(builders)}')
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    renderer = None
    try:
        for name, (build, files) in builders.items():
            if only != name and (only or name in OPTIONAL_SETS):
                continue
            final = os.path.join(out_dir, 'demo_' + name)
            if not force and _complete(final, files):
                log(f'{final}: complete, kept (use --force to rebuild)')
                continue
            renderer = renderer or _Renderer(workers)
            tmp = os.path.join(out_dir, f'.demo_{name}.{os.getpid()}.tmp')   # mkdtemp would make it 0700
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            try:
                summary = {'seed': seed, 'sizes': vars(sizes)}
                summary.update(build(tmp, seed, sizes, renderer))
                _write_summary(tmp, summary)
                if os.path.exists(final):
                    old = final + '.old'
                    shutil.rmtree(old, ignore_errors=True)
                    os.rename(final, old)
                    os.rename(tmp, final)
                    shutil.rmtree(old)
                else:
                    os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            results[name] = summary
            log(format_summary(final, summary))
    finally:
        if renderer is not None:
            renderer.close()
    return results


def format_summary(folder, summary):
    """A short human-readable account of one built set."""
    lines = [f'{folder}: seed {summary["seed"]}']

    def groups(title, table):
        lines.append(f'  {title}: ' + ', '.join(f'{g} {v["identities"]} ids/{v["images"]} images'
                                                for g, v in table.items()))

    for key, value in summary.items():
        if key in ('seed', 'sizes'):
            continue
        if key in OPTIONAL_SETS:
            flat = {f'{k} {n}' if isinstance(v, dict) else k: x for k, v in value.items()
                    for n, x in (v.items() if isinstance(v, dict) else [('', v)])}
            lines.append(f'  {key}: ' + ', '.join(f'{k.strip()} {v}' for k, v in flat.items()))
            continue
        if 'pairs' in value:
            if 'photos' in value:
                groups(f'{key} photos', value['photos'])
            lines.append(f'  {key} pairs: {value["pairs"]} ({value["positive"]} positive, '
                         f'{value["negative_same_group"]} same-group and {value["negative_cross_group"]} '
                         f'cross-group negative)')
        else:
            groups(key, value)
    return '\n'.join(lines)
