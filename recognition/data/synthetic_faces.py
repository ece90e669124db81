"""Synthetic FairFace-shaped faces: a procedural cv2 renderer with exactly known landmarks.

A fresh machine has no face data, so the demo and the tests run on faces drawn here. Each identity
has stable geometry, colours and marks; each image varies pose, expression, age, glasses, light,
blur and noise. The 5 landmarks (left eye, right eye, nose tip, left/right mouth corner) are known
exactly, so training crops are aligned with `recognition.alignment.geometry.norm_crop` from the
true points and photos come with their true points for the alignment step.

Identities of the dark-skinned female group are drawn from a narrower distribution (more alike), so
a model trained on them shows a measurable bias for that group (the demo sets also give the group
fewer identities: `recognition.data.demo_sets`).
"""
import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np

from recognition.alignment.geometry import norm_crop, template
from recognition.groups import GENDER_COLUMN, GENDER_NAMES, SKIN_COLUMN, SKIN_NAMES

AGE_GROUPS = ('18-34', '35-54', '55+')
HEAD_POSES = ('frontal', 'non-frontal')   # non-frontal: |yaw| >= 25 degrees
SOURCES = ('still', 'video-frame')        # video frames are blurrier and noisier
GLASSES = ('no', 'yes')
# What each attribute column's integer codes mean; written beside every attribute CSV (codes_path),
# from where the packer copies them into the rec's attributes sidecar.
ATTRIBUTE_CODES = {GENDER_COLUMN: dict(enumerate(GENDER_NAMES)), SKIN_COLUMN: dict(enumerate(SKIN_NAMES)),
                   'AGE': dict(enumerate(AGE_GROUPS)), 'GLASSES': dict(enumerate(GLASSES)),
                   'HEAD_POSE': dict(enumerate(HEAD_POSES)), 'SOURCE': dict(enumerate(SOURCES))}

# Protected groups as (gender, skin) codes in the order the demo sets deal identities out (the demo's
# bits depend on it; the groups' index order is `recognition.groups.GROUPS`); dark female is the planted
# minority.
GROUPS = ((1, 0), (0, 0), (1, 1), (0, 1))
MINORITY = (0, 1)
# Identity parameters of the minority are drawn with this fraction of the usual spread.
MINORITY_SPREAD = 0.5

IMAGE_SIZE = 112
CANVAS = 144          # training renders: drawn on a 144x144 canvas, then aligned to 112x112
CANVAS_SCALE = 40.0   # pixels per face unit on that canvas (face half-width is about 1 unit)
PHOTO_SIZE = 250

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
    var.attributes = {GENDER_COLUMN: ident.gender, SKIN_COLUMN: ident.skin, 'AGE': age_group(age),
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
