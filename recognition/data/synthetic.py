"""Synthetic FairFace-shaped faces: a procedural cv2 renderer and the demo dataset builder.

A fresh machine has no face data, so the demo and the tests run on faces drawn here. Each identity
has stable geometry, colours and marks; each image varies pose, expression, age, glasses, light,
blur and noise. The 5 landmarks (left eye, right eye, nose tip, left/right mouth corner) are known
exactly, so training crops are aligned with `recognition.align.norm_crop` from the true points and
the val/test "photos" ship the true points for the alignment step.

The imbalance mirrors the FairFace challenge: dark-skinned females have fewer identities, and their
identities are drawn from a narrower distribution (more alike), so a model trained on the data
shows a measurable bias for that group that later finetuning can reduce.

Every image has its own random stream, seeded by (seed, split, identity, image), so any subset
renders to the same bytes in any order or process.
"""
import csv
import functools
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np

from recognition.align import norm_crop, template
from recognition.data.bin import write_bin
from recognition.data.lst import dir_to_lst, write_lst
from recognition.data.packer import codes_path, pack, write_codes
from recognition.utils import UserError, atomic_open, write_json

# Attribute codes (the architecture's contract): GENDER 0 female, 1 male; SKIN_COLOUR 0 light, 1 dark.
GENDERS = ('female', 'male')
SKIN_COLOURS = ('light', 'dark')
AGE_GROUPS = ('18-34', '35-54', '55+')
HEAD_POSES = ('frontal', 'non-frontal')   # non-frontal: |yaw| >= 25 degrees
SOURCES = ('still', 'video-frame')        # video frames are blurrier and noisier
GLASSES = ('no', 'yes')
# What each attribute column's integer codes mean; written beside every attribute CSV (codes_path),
# from where the packer copies them into the rec's attributes sidecar.
ATTRIBUTE_CODES = {'GENDER': dict(enumerate(GENDERS)), 'SKIN_COLOUR': dict(enumerate(SKIN_COLOURS)),
                   'AGE': dict(enumerate(AGE_GROUPS)), 'GLASSES': dict(enumerate(GLASSES)),
                   'HEAD_POSE': dict(enumerate(HEAD_POSES)), 'SOURCE': dict(enumerate(SOURCES))}

# Protected groups as (gender, skin) in a fixed order; dark female is the planted minority.
GROUPS = ((1, 0), (0, 0), (1, 1), (0, 1))
GROUP_NAMES = {(1, 0): 'light male', (0, 0): 'light female', (1, 1): 'dark male', (0, 1): 'dark female'}
MINORITY = (0, 1)
# Shares of identities per group: MS1M is dominated by light-skinned males; the FairFace train split
# is less skewed; val/test are balanced so every group has pairs.
EMORE_SHARES = {(1, 0): 0.50, (0, 0): 0.25, (1, 1): 0.17, (0, 1): 0.08}
FAIRFACE_SHARES = {(1, 0): 0.36, (0, 0): 0.30, (1, 1): 0.22, (0, 1): 0.12}
BALANCED_SHARES = {g: 0.25 for g in GROUPS}
# Identity parameters of the minority are drawn with this fraction of the usual spread.
MINORITY_SPREAD = 0.5

IMAGE_SIZE = 112
CANVAS = 144          # training renders: drawn on a 144x144 canvas, then aligned to 112x112
CANVAS_SCALE = 40.0   # pixels per face unit on that canvas (face half-width is about 1 unit)
PHOTO_SIZE = 250
SPLIT_CODES = {'emore': 1, 'emore_ver': 2, 'train': 3, 'val': 4, 'test': 5}

_ARC = np.linspace(0.0, 1.0, 9)
_CIRCLES = {n: (np.cos(np.linspace(0, 2 * np.pi, n, endpoint=False)),
                np.sin(np.linspace(0, 2 * np.pi, n, endpoint=False))) for n in (8, 12, 16, 20, 48)}
_HALF = np.pi * _ARC                   # 0..pi
_SPAN = _ARC * 2 - 1                   # -1..1


@dataclass
class Identity:
    """The stable appearance of one synthetic person (face units: half face width ~ 1)."""
    subject_id: int
    gender: int
    skin: int
    age: float
    skin_bgr: np.ndarray
    face_w: float
    face_top: float
    face_bot: float
    jaw_p: float
    eye_x: float
    eye_y: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris_bgr: tuple
    brow_dy: float
    brow_thick: float
    brow_arch: float
    brow_len: float
    brow_tilt: float
    nose_y: float
    nose_w: float
    nose_z: float
    mouth_y: float
    mouth_w: float
    lip_up: float
    lip_low: float
    lip_bgr: np.ndarray
    ear_size: float
    hair_style: int
    hair_bgr: np.ndarray
    hairline: float
    hair_volume: float
    hair_strands: np.ndarray
    beard: float
    marks: np.ndarray
    blush: float
    glasses_rate: float
    glasses_round: bool
    glasses_bgr: tuple
    glasses_thick: float

    @property
    def group(self):
        return (self.gender, self.skin)

    @functools.cached_property
    def brows(self):
        """Both brow polygons (x, y) in face units at rest; an image only raises them."""
        t = _SPAN
        out = []
        for side in (-1, 1):
            x = side * (self.eye_x - 0.02 + t * self.brow_len * 0.5)
            y = (self.eye_y - self.brow_dy - self.brow_arch * (1 - t * t) + side * self.brow_tilt * t
                 + side * self.eye_tilt)
            thick = self.brow_thick * (1.1 - 0.5 * np.abs(t + 0.3 * side))
            out.append((np.concatenate([x, x[::-1]]), np.concatenate([y - thick * 0.5, (y + thick * 0.5)[::-1]])))
        return out

    @functools.cached_property
    def outline(self):
        """The face outline (x, y): an egg whose lower half is squarer or pointier with jaw_p."""
        c, s = _CIRCLES[48]
        lower = s > 0
        x = self.face_w * np.sign(c) * np.abs(c) ** np.where(lower, self.jaw_p, 1.0)
        y = np.where(lower, self.face_bot, self.face_top) * s
        return x, y


@dataclass
class Variation:
    """Everything that changes between two images of one identity."""
    yaw: float
    pitch: float
    smile: float
    mouth_open: float
    eye_open: float
    brow_raise: float
    gaze: tuple
    age: float
    glasses: bool
    sunglasses: bool
    light_dir: float
    light_k: float
    gain: float
    cast: tuple
    blur: float          # face units
    noise: float         # grey levels
    source: int
    occluder: Optional[tuple]
    clothes_bgr: tuple
    seed: int            # background clutter and pixel noise
    attributes: dict = field(default_factory=dict)


def age_group(age):
    """AGE code of an age in years (see AGE_GROUPS)."""
    return 0 if age < 35 else (1 if age < 55 else 2)


def _clamp(v, lo, hi):
    return min(hi, max(lo, float(v)))


def _mix(a, b, t):
    return np.asarray(a, np.float64) * (1 - t) + np.asarray(b, np.float64) * t


def _bgr(c):
    return tuple(min(255.0, max(0.0, float(v))) for v in c)


def sample_identity(rng, gender, skin, subject_id):
    """Draw a person of the given group; the minority group is drawn with a narrower spread."""
    minority = (gender, skin) == MINORITY
    spread = MINORITY_SPREAD if minority else 1.0
    male = gender == 1

    def n(mean, sd, lo=-2.5, hi=2.5):
        return mean + sd * spread * _clamp(rng.standard_normal(), lo, hi)

    tone = _clamp(0.5 + 0.3 * spread * rng.standard_normal(), 0, 1)
    if skin == 0:
        rgb = _mix((243, 212, 186), (196, 150, 116), tone)
        hair_choices = [(25, 22, 20), (60, 40, 28), (110, 75, 45), (190, 160, 105), (150, 70, 35)]
        iris_choices = [(40, 30, 25), (90, 60, 35), (70, 110, 150), (80, 120, 80)]
    else:
        rgb = _mix((150, 102, 72), (78, 52, 38), tone)
        hair_choices = [(18, 15, 14), (38, 28, 22)]
        iris_choices = [(30, 22, 18), (55, 38, 25)]
    if minority:
        hair_choices, iris_choices = hair_choices[:1], iris_choices[:1]
    rgb = rgb + rng.normal(0, 6 * spread, 3)
    skin_bgr = np.clip(rgb[::-1], 0, 255)
    hair_rgb = np.asarray(hair_choices[rng.integers(len(hair_choices))], np.float64) + rng.normal(0, 8 * spread, 3)
    iris_rgb = np.asarray(iris_choices[rng.integers(len(iris_choices))], np.float64)

    if male:
        styles = [0, 0, 1, 1, 4, 2]          # short, side part, bald, long
    elif minority:
        styles = [2, 3]                      # long, bun
    else:
        styles = [2, 2, 3, 5, 1]             # long, bun, bob, fringe
    hair_style = int(styles[rng.integers(len(styles))])
    lip_rgb = _mix(rgb, (200, 60, 70) if not male else (170, 90, 85), 0.45 if not male else 0.25)
    marks = np.column_stack([rng.uniform(-0.7, 0.7, 3), rng.uniform(-0.6, 1.0, 3),
                             rng.uniform(0.018, 0.04, 3)])[:rng.integers(0, 4)]
    glasses_rate = 0.85 if rng.random() < 0.2 else 0.05
    return Identity(
        subject_id=int(subject_id), gender=int(gender), skin=int(skin),
        age=float(rng.uniform(20, 68)),
        skin_bgr=skin_bgr,
        face_w=n(1.0 if male else 0.94, 0.06),
        face_top=n(1.32, 0.08), face_bot=n(1.42 if male else 1.33, 0.09),
        jaw_p=n(0.62 if male else 1.0, 0.22, -1.5, 1.5),
        eye_x=n(0.46, 0.035), eye_y=n(-0.2, 0.05),
        eye_w=n(0.15 if male else 0.165, 0.02), eye_h=n(0.055 if male else 0.068, 0.012),
        eye_tilt=n(0.0, 0.025),
        iris_bgr=_bgr(iris_rgb[::-1]),
        brow_dy=n(0.17, 0.035), brow_thick=n(0.06 if male else 0.035, 0.012),
        brow_arch=n(0.03 if male else 0.06, 0.025), brow_len=n(0.27, 0.035), brow_tilt=n(0.0, 0.03),
        nose_y=n(0.33, 0.05), nose_w=n(0.14 if male else 0.12, 0.025), nose_z=n(0.32, 0.08),
        mouth_y=n(0.88, 0.06), mouth_w=n(0.38 if male else 0.35, 0.045),
        lip_up=n(0.04 if male else 0.055, 0.012), lip_low=n(0.055 if male else 0.075, 0.015),
        lip_bgr=np.clip(lip_rgb[::-1], 0, 255),
        ear_size=n(0.2, 0.04),
        hair_style=hair_style, hair_bgr=np.clip(hair_rgb[::-1], 0, 255),
        hairline=n(-0.78, 0.1), hair_volume=n(0.18, 0.06, -2, 2),
        hair_strands=rng.uniform(-1, 1, (4, 2)),
        beard=float(rng.choice([0.0, 0.0, 0.3, 0.6])) if male else 0.0,
        marks=marks,
        blush=float(rng.uniform(0, 0.18)) if not male else 0.0,
        glasses_rate=glasses_rate, glasses_round=bool(rng.random() < 0.5),
        glasses_bgr=_bgr(rng.choice([(20, 20, 20), (40, 60, 120), (150, 150, 160), (30, 30, 90)])),
        glasses_thick=float(rng.uniform(0.025, 0.05)),
    )


def sample_variation(ident, rng, pose='any'):
    """Draw one image's pose, expression, age, accessories and capture conditions.

    pose: 'any' (mostly frontal, some profile-ish), 'frontal' (|yaw| < 15) or 'profile' (|yaw| 30-50).
    """
    if pose == 'frontal':
        yaw = _clamp(rng.normal(0, 6), -15, 15)
    elif pose == 'profile':
        yaw = float(rng.uniform(30, 50) * rng.choice([-1, 1]))
    elif rng.random() < 0.15:
        yaw = float(rng.uniform(25, 48) * rng.choice([-1, 1]))
    else:
        yaw = _clamp(rng.normal(0, 10), -24, 24)
    source = int(rng.random() < 0.3)
    age = ident.age + float(rng.uniform(-4, 6))
    glasses = bool(rng.random() < ident.glasses_rate)
    occluder = None
    if rng.random() < 0.06:
        occluder = (int(rng.integers(2)), float(rng.uniform(-0.6, 0.6)), float(rng.uniform(0.4, 1.2)),
                    _bgr(rng.uniform(30, 230, 3)))
    var = Variation(
        yaw=yaw, pitch=_clamp(rng.normal(0, 7), -18, 18),
        smile=float(rng.random() ** 2), mouth_open=float(rng.uniform(0.3, 1.0)) if rng.random() < 0.2 else 0.0,
        eye_open=0.12 if rng.random() < 0.04 else float(rng.uniform(0.75, 1.1)),
        brow_raise=float(rng.uniform(-0.02, 0.05)),
        gaze=(float(rng.uniform(-0.35, 0.35)), float(rng.uniform(-0.2, 0.2))),
        age=age, glasses=glasses, sunglasses=glasses and bool(rng.random() < 0.12),
        light_dir=float(rng.uniform(0, 2 * np.pi)), light_k=float(rng.uniform(0.0, 0.22)),
        gain=float(rng.uniform(0.7, 1.25)), cast=tuple(float(v) for v in rng.uniform(0.9, 1.1, 3)),
        blur=float(rng.uniform(0.0, 0.03)) + (0.02 if source else 0.0),
        noise=float(rng.uniform(0, 4)) + (3.0 if source else 0.0),
        source=source, occluder=occluder,
        clothes_bgr=_bgr(rng.uniform(20, 235, 3)),
        seed=int(rng.integers(2 ** 31)),
    )
    var.attributes = {'GENDER': ident.gender, 'SKIN_COLOUR': ident.skin, 'AGE': age_group(age),
                      'GLASSES': int(glasses), 'HEAD_POSE': int(abs(yaw) >= 25), 'SOURCE': source}
    return var




class _Sketch:
    """The shapes of one face in one pose, collected in face units and drawn in one numpy pass.

    A shape is either in the image plane (`dz=None`: outline, hair mass, things placed around a
    projected anchor) or on the head surface (`dz` = depth above the head ellipsoid), which turns
    with yaw and pitch. Batching the transform keeps the renderer at hundreds of images/s.
    """

    def __init__(self, ident, var):
        yaw, pitch = math.radians(var.yaw), math.radians(var.pitch)
        self.cy, self.sy, self.cp, self.sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
        self.inv_w = 1.0 / ident.face_w
        self.shapes = []    # (points, colour, line width or 0 for a filled polygon)
        self.xs, self.ys, self.dzs = [], [], []   # dzs: None (image plane), a float or an array

    def pt(self, x, y, dz=0.0):
        """Project one surface point to the image plane (face units)."""
        u, v = x * self.inv_w, y * (1 / 1.45)
        z = 0.9 * math.sqrt(max(1 - u * u - v * v, 0.0)) + dz
        return x * self.cy + z * self.sy, y * self.cp - z * self.sp

    def project(self, x, y, dz=0.0):
        """Project surface points (arrays); for shapes that mix plane and surface points."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        u, v = x * self.inv_w, y * (1 / 1.45)
        z = 0.9 * np.sqrt(np.maximum(1 - u * u - v * v, 0)) + dz
        return x * self.cy + z * self.sy, y * self.cp - z * self.sp

    def fill(self, x, y, colour, dz=None):
        self._add(x, y, colour, 0.0, dz)

    def line(self, x, y, colour, width, dz=None):
        self._add(x, y, colour, width, dz)

    def ellipse(self, cx, cy, ax, ay, colour, n=16):
        c, s = _CIRCLES[n]
        self._add(cx + ax * c, cy + ay * s, colour, 0.0, None)

    def _add(self, x, y, colour, width, dz):
        x = np.asarray(x, np.float64)
        self.xs.append(x)
        self.ys.append(np.asarray(y, np.float64))
        self.dzs.append(dz)
        # cv2 saturates colour values to 0..255 itself
        self.shapes.append((len(x), tuple(colour.tolist()) if isinstance(colour, np.ndarray) else colour, width))

    def draw(self, img, M):
        """Transform every point with the face-unit->pixel matrix M and draw in order."""
        counts = [n for n, _, _ in self.shapes]
        x, y = np.concatenate(self.xs), np.concatenate(self.ys)
        on = np.repeat(np.array([d is not None for d in self.dzs]), counts)
        dz = np.repeat(np.array([d if isinstance(d, float) else 0.0 for d in self.dzs]), counts)
        start = 0
        for n, d in zip(counts, self.dzs):     # the few shapes with a depth per point
            if isinstance(d, np.ndarray):
                dz[start:start + n] = d
            start += n
        u, v = x * self.inv_w, y * (1 / 1.45)
        z = np.where(on, 0.9 * np.sqrt(np.maximum(1 - u * u - v * v, 0)) + dz, 0.0)
        px = np.where(on, x * self.cy, x) + z * self.sy
        py = np.where(on, y * self.cp, y) - z * self.sp
        M16 = np.asarray(M, np.float64) * 16          # 4 fraction bits for sub-pixel drawing
        pts = np.rint(M16[:, :2] @ np.stack([px, py]) + M16[:, 2:]).T.astype(np.int32)
        scale = math.hypot(M[0][0], M[1][0])
        start = 0
        for n, colour, width in self.shapes:
            poly = pts[start:start + n]
            start += n
            if width:
                cv2.polylines(img, [poly], False, colour, max(1, int(round(width * scale))), cv2.LINE_AA, 4)
            else:
                cv2.fillPoly(img, [poly], colour, cv2.LINE_AA, 4)


def _mouth_corners(ident, var):
    return ident.mouth_w * (1 + 0.12 * var.smile), ident.mouth_y - 0.06 * var.smile


def landmarks_local(ident, var, sketch=None):
    """The 5 landmarks in the image plane, in face units (before the face-unit->pixel matrix)."""
    sk = sketch or _Sketch(ident, var)
    mx, my = _mouth_corners(ident, var)
    return np.array([sk.pt(-ident.eye_x, ident.eye_y - ident.eye_tilt, -0.08),
                     sk.pt(ident.eye_x, ident.eye_y + ident.eye_tilt, -0.08),
                     sk.pt(0.0, ident.nose_y, ident.nose_z),
                     sk.pt(-mx, my, -0.02),
                     sk.pt(mx, my, -0.02)])


_NECK = np.array([[-0.45, 0.45, 0.5, -0.5], [0.6, 0.6, 2.0, 2.0]])
_BODY = np.array([[-2.4, -0.5, 0, 0.5, 2.4, 2.6, -2.6], [2.0, 1.7, 1.95, 1.7, 2.0, 3.6, 3.6]])
_CROWN = np.cos(np.pi + _HALF), np.sin(np.pi + _HALF)   # left temple over the top to the right temple


def draw_face(img, ident, var, M):
    """Draw the head, hair, body and accessories of `ident` in pose `var` onto img (BGR uint8).

    M is the 2x3 matrix from face units to pixels; returns the 5 landmarks in pixels.
    """
    sk = _Sketch(ident, var)
    skin = ident.skin_bgr
    hair = _mix(ident.hair_bgr, (175, 175, 178), _clamp((var.age - 45) / 30, 0, 0.8))
    w, top, vol = ident.face_w, ident.face_top, ident.hair_volume
    shift = 0.18 * sk.sy   # neck and body slide a little with yaw

    # Behind the head: long hair, then neck and clothes.
    if ident.hair_style == 2:
        c, s = _CROWN
        sk.fill(np.concatenate([(w + vol) * c, [w + vol + 0.18, -(w + vol + 0.18)]]),
                np.concatenate([(top + vol) * s, [1.9, 1.9]]), hair * 0.9)
    sk.fill(_NECK[0] + shift, _NECK[1], skin * 0.8)
    sk.fill(_BODY[0] + shift, _BODY[1], var.clothes_bgr)
    # Ears stick out of the outline; the one turning away shrinks.
    for side in (-1, 1):
        width = 0.13 * _clamp(1 - 1.6 * side * sk.sy, 0.15, 1.5)
        sk.ellipse(side * (w - 0.02 + width * 0.5), 0.08, width, ident.ear_size, skin * 0.88)
    ox, oy = ident.outline
    sk.fill(ox, oy, skin)

    # Identity marks and age on the skin.
    if ident.blush > 0:
        for side in (-1, 1):
            cx, cy = sk.pt(side * 0.55, 0.45)
            sk.ellipse(cx, cy, 0.2 * max(0.3, 1 - side * sk.sy), 0.12, _mix(skin, (80, 80, 220), ident.blush))
    if ident.beard > 0:
        y0 = ident.nose_y + 0.12
        keep = oy > y0            # the lower outline, right to left, closed across under the nose
        ex, ey = sk.project(np.array([-0.6 * w, 0.6 * w]), np.array([y0, y0]))
        sk.fill(np.concatenate([ox[keep], ex]), np.concatenate([oy[keep], ey]), _mix(skin, hair * 0.6, ident.beard))
    for mx, my, r in ident.marks:
        cx, cy = sk.pt(mx, my)
        sk.ellipse(cx, cy, r, r, skin * 0.45, n=8)
    wrinkle = _clamp((var.age - 38) / 30, 0, 1)
    if wrinkle > 0:
        col = _mix(skin, skin * 0.55, wrinkle)
        for k in range(1 + int(wrinkle * 2.5)):
            sk.line(0.4 * _SPAN, ident.eye_y - 0.42 - 0.1 * k + 0.03 * np.cos(_SPAN), col, 0.018, dz=0.0)
        for side in (-1, 1):
            sk.line(side * np.array([ident.nose_w + 0.06, ident.nose_w + 0.12, ident.mouth_w + 0.03]),
                    np.array([ident.nose_y, ident.nose_y + 0.25, ident.mouth_y + 0.05]), col, 0.02, dz=0.0)

    _draw_eyes(sk, ident, var, skin)
    _draw_brows(sk, ident, var, hair)
    _draw_nose(sk, ident, var, skin)
    _draw_mouth(sk, ident, var)
    _draw_hair(sk, ident, var, hair)
    if var.glasses:
        _draw_glasses(sk, ident, var)
    if var.occluder is not None:
        _draw_occluder(sk, ident, var, skin)
    sk.draw(img, M)
    lmk = landmarks_local(ident, var, sk)
    M = np.asarray(M, np.float64)
    return lmk @ M[:, :2].T + M[:, 2]


# Eye polygons as fixed point patterns scaled per image: x = cx + half * X, y = cy + height * Y + offset.
_EYE_X = np.concatenate([-np.cos(_HALF), -np.cos(_HALF)[::-1]])
_SCLERA_Y = np.concatenate([-np.sin(_HALF), 0.75 * np.sin(_HALF)[::-1]])
_UPPER_LID_Y = np.concatenate([-np.sin(_HALF), -np.sin(_HALF)[::-1]])
_UPPER_LID_OFF = np.r_[np.zeros(len(_HALF)), np.full(len(_HALF), -0.09)]
_LOWER_LID_Y = np.concatenate([0.75 * np.sin(_HALF), 0.75 * np.sin(_HALF)[::-1]])
_LOWER_LID_OFF = np.r_[np.zeros(len(_HALF)), np.full(len(_HALF), 0.07)]


def _draw_eyes(sk, ident, var, skin):
    half = ident.eye_w * (0.55 + 0.45 * sk.cy)
    height = ident.eye_h * var.eye_open * (1 - 0.25 * var.smile)
    r = min(0.065, 0.9 * height + 0.01)
    xs = half * _EYE_X
    lid, lash = _bgr(skin * 0.95), _bgr(skin * 0.35)
    for side in (-1, 1):
        cx, cy = sk.pt(side * ident.eye_x, ident.eye_y + side * ident.eye_tilt, -0.08)
        x = cx + xs
        sk.fill(x, cy + height * _SCLERA_Y, (235, 238, 240))
        gx, gy = cx + var.gaze[0] * half * 0.5, cy + var.gaze[1] * height
        sk.ellipse(gx, gy, r, r, ident.iris_bgr, n=12)
        sk.ellipse(gx, gy, r * 0.45, r * 0.45, (10, 10, 10), n=8)
        # Lids cover whatever of the iris sticks out of the eye opening.
        upper = cy + height * _UPPER_LID_Y + _UPPER_LID_OFF
        sk.fill(x, upper, lid)
        sk.fill(x, cy + height * _LOWER_LID_Y + _LOWER_LID_OFF, skin)
        sk.line(x[:len(_HALF)], upper[:len(_HALF)], lash, 0.022)


def _draw_brows(sk, ident, var, hair):
    colour = _bgr(_mix(hair, ident.skin_bgr, 0.15) * 0.85)
    for x, y in ident.brows:
        sk.fill(x, y - var.brow_raise, colour, dz=0.0)


def _draw_nose(sk, ident, var, skin):
    nw, ny, nz = ident.nose_w, ident.nose_y, ident.nose_z
    side = 1 if math.cos(var.light_dir) < 0 else -1    # the bridge shadow falls away from the light
    sk.line(np.array([0.04, 0.05, 0.08]) * side, np.array([ident.eye_y + 0.05, ny - 0.2, ny - 0.05]),
            skin * 0.8, 0.03, dz=np.array([0.0, nz * 0.6, nz * 0.85]))
    sk.line(-nw * np.cos(_HALF), ny + 0.03 + 0.05 * np.sin(_HALF), skin * 0.7, 0.022, dz=nz * 0.8 * np.sin(_HALF))
    for s in (-1, 1):
        cx, cy = sk.pt(s * nw * 0.55, ny + 0.02, nz * 0.5)
        sk.ellipse(cx, cy, 0.045 * (0.5 + 0.5 * sk.cy), 0.025, skin * 0.4, n=8)


def _draw_mouth(sk, ident, var):
    mw, my = _mouth_corners(ident, var)
    t = _SPAN
    bulge = 1 - t * t
    x = mw * t
    line_y = my + 0.09 * var.smile * bulge
    open_ = var.mouth_open * 0.12
    inner_y = line_y + open_ * bulge
    up_y = line_y - ident.lip_up * (1 - t ** 4) - 0.012 * np.cos(t * np.pi * 2.5) * bulge
    low_y = inner_y + ident.lip_low * bulge
    xx = np.concatenate([x, x[::-1]])
    if open_ > 0:
        sk.fill(xx, np.concatenate([line_y, inner_y[::-1]]), (35, 25, 45), dz=-0.02)
        sk.fill(np.concatenate([x * 0.8, x[::-1] * 0.8]), np.concatenate([line_y, (line_y + 0.04 * bulge)[::-1]]),
                (225, 230, 232), dz=-0.02)
    sk.fill(xx, np.concatenate([up_y, line_y[::-1]]), ident.lip_bgr * 0.92, dz=-0.02)
    sk.fill(xx, np.concatenate([inner_y, low_y[::-1]]), ident.lip_bgr, dz=-0.02)
    sk.line(x, line_y, ident.lip_bgr * 0.45, 0.015, dz=-0.02)


def _draw_hair(sk, ident, var, hair):
    w, top, vol, hl = ident.face_w, ident.face_top, ident.hair_volume, ident.hairline
    style = ident.hair_style
    if style == 4 and var.age > 40:    # receding
        vol, hl = vol * 0.3, hl - 0.25
    cx, cy = (w + vol) * _CROWN[0], (top + vol) * _CROWN[1]
    s = -_SPAN                          # the hairline across the forehead, right to left
    line_y = hl + 0.18 * s ** 2
    if style == 5:                      # a fringe sweeping down to one side
        line_y = line_y + 0.25 - 0.175 * (s + 1)
    elif style == 1:                    # a side parting
        line_y = line_y - 0.12 * (s > 0.3)
    lx, ly = sk.project(s * w * 0.97, line_y)
    side_y = ident.eye_y - 0.12 + (0.45 if style in (3, 5) else 0.0)
    sk.fill(np.concatenate([cx, [w + 0.02], lx, [-w - 0.02]]), np.concatenate([cy, [side_y], ly, [side_y]]), hair)
    for a, b in ident.hair_strands:
        sk.line(np.array([a * 0.6, a * 0.6 + 0.2 * b, a * 0.4]), np.array([-top - vol * 0.5, -top + 0.2, hl - 0.05]),
                hair * 0.6 + 20, 0.02, dz=0.0)
    if style == 3:
        sk.ellipse(0.0, -top - vol - 0.18, 0.3, 0.2, hair * 0.85)


def _draw_glasses(sk, ident, var):
    hw = ident.eye_w * 1.45 * (0.6 + 0.4 * sk.cy)
    col, thick = ident.glasses_bgr, ident.glasses_thick
    if ident.glasses_round:
        c, s = _CIRCLES[16]
        rim_x, rim_y = np.append(hw * c, hw), np.append(0.14 * s, 0.0)
    else:
        rim_x, rim_y = hw * np.array([-1, 1, 1, -1, -1]), np.array([-0.12, -0.12, 0.12, 0.12, -0.12])
    centres = [sk.pt(side * ident.eye_x, ident.eye_y + side * ident.eye_tilt, 0.02) for side in (-1, 1)]
    for cx, cy in centres:
        if var.sunglasses:
            sk.fill(cx + rim_x, cy + rim_y, (30, 25, 25))
        sk.line(cx + rim_x, cy + rim_y, col, thick)
    (lx, ly), (rx, ry) = centres
    sk.line(np.array([lx + hw, (lx + rx) / 2, rx - hw]), np.array([ly - 0.05, ly - 0.08, ry - 0.05]), col, thick)
    for side, (cx, cy) in zip((-1, 1), centres):
        if side * sk.sy < 0.3:          # the temple arm on the side turning away is hidden
            sk.line(np.array([cx + side * hw, ident.face_w * side]), np.array([cy - 0.05, cy - 0.02]), col, thick)


def _draw_occluder(sk, ident, var, skin):
    kind, x, size, colour = var.occluder
    if kind == 0:        # a hand over part of the lower face
        hand = _mix(skin, (90, 110, 150), 0.15)
        sk.ellipse(x, ident.mouth_y + 0.3, 0.3 * size, 0.45 * size, hand)
        for k in range(4):
            fx = x - 0.2 * size + 0.13 * k * size
            sk.line(np.array([fx, fx]), np.array([ident.mouth_y + 0.1, ident.mouth_y - 0.35 * size]), hand * 0.97,
                    0.09 * size)
    else:                # a microphone in front of the chin
        sk.fill(np.array([x - 0.08, x + 0.08, x + 0.1, x - 0.1]),
                np.array([ident.mouth_y + 0.3, ident.mouth_y + 0.3, 3.0, 3.0]), (40, 40, 40))
        sk.ellipse(x, ident.mouth_y + 0.25, 0.16 * size, 0.16 * size, colour)


def _clutter(img, rng, count):
    """A random background of shapes: walls, objects and edges that a crop or a detector sees.

    Drawn without anti-aliasing (4x cheaper); the warp and blur soften the edges anyway.
    """
    h, w = img.shape[:2]
    r = rng.random((count + 1, 10))
    colours = (r[:, 9:10] * [255, 65536, 16777216] % 256).tolist()
    cv2.rectangle(img, (0, 0), (w, h), colours[-1], -1)   # much faster than a numpy broadcast fill
    shapes = np.column_stack([r[:, 0] * 4, (r[:, 1:7] * 1.5 - 0.25) * w, r[:, 7] * w / 2 + 4, r[:, 8] * 4])
    for (kind, x0, y0, x1, y1, x2, y2, size, line), colour in zip(shapes[:-1].astype(int).tolist(), colours):
        if kind == 0:
            cv2.rectangle(img, (x0, y0), (x0 + size, y0 + size // 2 + 4), colour, -1)
        elif kind == 1:
            cv2.circle(img, (x0, y0), size // 2, colour, -1)
        elif kind == 2:
            cv2.line(img, (x0, y0), (x1, y1), colour, 1 + line)
        else:
            cv2.fillPoly(img, [np.array([[x0, y0], [x1, y1], [x2, y2]], np.int32)], colour)


def _photometric(img, var, lmk, rng):
    """Light falling across the face, exposure, colour cast, blur and sensor noise.

    Light and blur are set in the face's own frame, taken from its landmarks (centre, eye-to-mouth
    size, eye-line angle), so one variation looks the same on an aligned crop and on a photo.
    """
    lmk = np.asarray(lmk, np.float64)
    centre = lmk.mean(0)
    unit = np.linalg.norm((lmk[3] + lmk[4] - lmk[0] - lmk[1]) / 2) / 1.07   # pixels per face unit
    roll = math.atan2(lmk[1, 1] - lmk[0, 1], lmk[1, 0] - lmk[0, 0])
    sigma = var.blur * unit
    if sigma > 0.3:
        k = 2 * math.ceil(2 * sigma) + 1
        img = cv2.GaussianBlur(img, (k, k), sigma)
    h, w = img.shape[:2]
    ang = var.light_dir + roll
    dx, dy = math.cos(ang) / unit, math.sin(ang) / unit
    ramp = np.add.outer(np.arange(h, dtype=np.float32) * np.float32(dy),
                        np.arange(w, dtype=np.float32) * np.float32(dx))
    ramp -= np.float32(centre[0] * dx + centre[1] * dy)
    if max(abs(ramp[0, 0]), abs(ramp[0, -1]), abs(ramp[-1, 0]), abs(ramp[-1, -1])) > 2.5:   # extremes: corners
        np.clip(ramp, -2.5, 2.5, out=ramp)
    ramp *= np.float32(var.light_k)
    ramp += 1
    gain = [np.float32(c * var.gain) for c in var.cast]
    out = cv2.multiply(img, cv2.merge([ramp * gain[0], ramp * gain[1], ramp * gain[2]]), dtype=cv2.CV_32F)
    if var.noise > 0:
        bank = _noise_bank()
        oy, ox = rng.integers(0, bank.shape[0] - h + 1), rng.integers(0, bank.shape[1] - w + 1)
        return cv2.addWeighted(out, 1.0, bank[oy:oy + h, ox:ox + w], var.noise, 0.0, dtype=cv2.CV_8U)  # saturates
    return cv2.convertScaleAbs(out)


@functools.lru_cache(maxsize=1)
def _noise_bank():
    """Unit Gaussian noise drawn once; images take random windows of it (drawing per image is slow)."""
    return np.random.default_rng(20200701).standard_normal((2 * PHOTO_SIZE, 2 * PHOTO_SIZE, 3), dtype=np.float32)


def render_aligned(ident, var, image_size=IMAGE_SIZE):
    """An aligned training crop: draw on a canvas, align with norm_crop from the true landmarks.

    Returns (BGR uint8 image_size x image_size, the landmarks on the canvas).
    """
    rng = np.random.default_rng(var.seed)
    canvas = np.empty((CANVAS, CANVAS, 3), np.uint8)
    _clutter(canvas, rng, 5)
    M = np.array([[CANVAS_SCALE, 0, CANVAS / 2], [0, CANVAS_SCALE, CANVAS / 2 - 4]])
    lmk = draw_face(canvas, ident, var, M)
    crop = norm_crop(canvas, lmk, image_size)
    return _photometric(crop, var, template(image_size), rng), lmk


def photo_matrix(rng, size=PHOTO_SIZE):
    """A random placement of a face in a photo: 18-44 px per face unit, roll, position."""
    s = float(rng.uniform(18, 44))
    roll = math.radians(_clamp(rng.normal(0, 10), -30, 30))
    cx, cy = rng.uniform(1.6 * s, size - 1.6 * s, 2)
    c, sn = math.cos(roll) * s, math.sin(roll) * s
    return np.array([[c, -sn, cx], [sn, c, cy]])


def render_photo(ident, var, size=PHOTO_SIZE):
    """An unaligned photo: the face at a random position, scale and roll on clutter.

    Returns (BGR uint8 size x size, 5x2 landmarks in pixels, face box size in pixels).
    """
    rng = np.random.default_rng(var.seed)
    img = np.empty((size, size, 3), np.uint8)
    _clutter(img, rng, 18)
    M = photo_matrix(rng, size)
    lmk = draw_face(img, ident, var, M)
    box = int(round(2 * ident.face_w * math.hypot(M[0, 0], M[1, 0])))
    return _photometric(img, var, lmk, rng), lmk, box


# ----------------------------------------------------------------------------------------------
# The demo datasets (layout: docs/architecture.md, "The demo datasets")

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

    def check(self):
        for name, value in vars(self).items():
            minimum = 4 if name.endswith('_ids') else 2
            if not isinstance(value, int) or value < minimum:
                raise UserError(f'--{name.replace("_", "-")}: must be an integer >= {minimum}, got {value!r}')


EMORE_FILES = ('train.rec', 'train.idx', 'property', 'train.attributes.json', 'lfw.bin', 'cfp_fp.bin')
EVAL_FILES = ('images', 'landmarks.txt', 'metadata.csv', 'predictions.csv', 'ground_truth.csv')
FAIRFACE_FILES = ('train', 'train_attributes.csv', 'train.lst', 'train.rec', 'train.idx', 'property',
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
    """Maps render jobs over a process pool (or in-process); results come back in job order.

    Workers are spawned, not forked: a fork of a process whose OpenCV (or MXNet) thread pool is
    already running can deadlock in the child.
    """

    def __init__(self, workers):
        self.pool = None
        if workers > 1:
            import multiprocessing
            self.pool = multiprocessing.get_context('spawn').Pool(workers, initializer=_worker_init)

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
        r = rows.setdefault(GROUP_NAMES[ident.group], [0, 0])
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


def _build_emore(folder, seed, sizes, renderer):
    idents = make_identities(seed, 'emore', sizes.emore_ids, EMORE_SHARES)
    counts = _images_per_identity(seed, 'emore', idents, sizes.emore_images)
    image_dir = os.path.join(folder, '_images')
    rows = []
    jobs = (('aligned', seed, 'emore', i, ident, ['any'] * n) for i, (ident, n) in enumerate(zip(idents, counts)))
    for ident, results in zip(idents, renderer.map(jobs)):
        sub = os.path.join(image_dir, '%06d' % ident.subject_id)
        os.makedirs(sub)
        for j, (data, attrs) in enumerate(results):
            name = os.path.join(sub, '%04d.jpg' % j)
            with open(name, 'wb') as f:
                f.write(data)
            rows.append((os.path.relpath(name, folder), ident.subject_id) + tuple(attrs[c] for c in TRAIN_COLUMNS[2:]))
    write_lst(os.path.join(folder, 'train.lst'), dir_to_lst(image_dir, root=folder))
    _write_csv(os.path.join(folder, '_attributes.csv'), TRAIN_COLUMNS, rows)
    pack(os.path.join(folder, 'train'), attributes=os.path.join(folder, '_attributes.csv'))
    for leftover in ('_images', 'train.lst', '_attributes.csv', codes_path('_attributes.csv')):
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
        write_bin(os.path.join(folder, name + '.bin'), [images[k] for a, b, _ in pairs for k in (a, b)],
                  [bool(same) for _, _, same in pairs])
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
    idents = make_identities(seed, 'train', sizes.train_ids, FAIRFACE_SHARES)
    counts = _images_per_identity(seed, 'train', idents, sizes.train_images)
    train_dir = os.path.join(folder, 'train')
    rows = []
    jobs = (('aligned', seed, 'train', i, ident, ['any'] * n) for i, (ident, n) in enumerate(zip(idents, counts)))
    for ident, results in zip(idents, renderer.map(jobs)):
        sub = '%05d' % ident.subject_id
        os.makedirs(os.path.join(train_dir, sub))
        for j, (data, attrs) in enumerate(results):
            rel = f'{sub}/{j:04d}.jpg'
            with open(os.path.join(train_dir, rel), 'wb') as f:
                f.write(data)
            rows.append((rel, ident.subject_id) + tuple(attrs[c] for c in TRAIN_COLUMNS[2:]))
    _write_csv(os.path.join(folder, 'train_attributes.csv'), TRAIN_COLUMNS, rows)
    write_lst(os.path.join(folder, 'train.lst'), dir_to_lst(train_dir, root=folder))
    pack(os.path.join(folder, 'train'), attributes=os.path.join(folder, 'train_attributes.csv'))
    summary = {'train': _group_table(idents, counts)}
    next_id = len(idents)
    for split in ('val', 'test'):
        members = make_identities(seed, split, sizes.eval_ids, BALANCED_SHARES, first_id=next_id)
        next_id += len(members)
        pairs, aligned, summary[split] = _build_eval(os.path.join(folder, split), split, seed, sizes, members,
                                                     renderer)
        if split == 'val':
            write_bin(os.path.join(folder, 'val.bin'), [aligned[t] for a, b, _ in pairs for t in (a, b)],
                      [bool(same) for _, _, same in pairs])
    return summary


def _complete(folder, files):
    return all(os.path.exists(os.path.join(folder, f)) for f in files)


def build_demo(out_dir='datasets', seed=0, only=None, force=False, sizes=None, workers=1, log=print):
    """Build datasets/demo_emore and/or datasets/demo_fairface (see docs/architecture.md).

    Deterministic from `seed` (the same bytes for any `workers`). Each set is built in a temporary
    folder and renamed into place at the end; an existing complete set is kept unless `force`.
    Returns {set name: summary dict}.
    """
    sizes = sizes or DemoSizes()
    sizes.check()
    if only not in (None, 'emore', 'fairface'):
        raise UserError(f'--only {only!r}: expected emore or fairface')
    builders = {'emore': (_build_emore, EMORE_FILES), 'fairface': (_build_fairface, FAIRFACE_FILES)}
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    renderer = None
    try:
        for name, (build, files) in builders.items():
            if only and name != only:
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
        if 'pairs' in value:
            if 'photos' in value:
                groups(f'{key} photos', value['photos'])
            lines.append(f'  {key} pairs: {value["pairs"]} ({value["positive"]} positive, '
                         f'{value["negative_same_group"]} same-group and {value["negative_cross_group"]} '
                         f'cross-group negative)')
        else:
            groups(key, value)
    return '\n'.join(lines)
