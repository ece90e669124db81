"""Which detectors align a photo (`--detector mtcnn|mmod|mtcnn+mmod`), in the order the alignment
fallbacks try them, built lazily so that runs whose photos all have given landmarks load none."""
import functools

from recognition.detection import mmod
from recognition.detection.mmod import MMODDetector
from recognition.detection.mtcnn import MTCNNDetector

DETECTORS = ('mtcnn', 'mmod', 'mtcnn+mmod')
_CLASSES = {'mtcnn': MTCNNDetector, 'mmod': MMODDetector}


def default_choice():
    """MTCNN then MMOD when dlib is installed, else MTCNN alone."""
    return 'mtcnn+mmod' if mmod.available() else 'mtcnn'


@functools.lru_cache(maxsize=8)
def _shared(name, items):
    return _CLASSES[name](**dict(items))


def shared_detector(name, **config):
    """One detector per process for each (name, config): MTCNN costs ~1 s to build, MMOD's
    landmark model 1.5 s to read."""
    return _shared(name, tuple(sorted(config.items())))


class LazyDetector:
    """A detector built on its first `detect()`; `name` and `config()` rebuild it in a worker process."""

    def __init__(self, name, config=None):
        if name not in _CLASSES:
            raise ValueError(f'unknown detector {name!r}; use one of {", ".join(_CLASSES)}')
        self.name = name
        self._config = dict(config or {})

    def config(self):
        return dict(self._config)

    def detect(self, img_bgr):
        return shared_detector(self.name, **self._config).detect(img_bgr)


def build_detectors(choice=None, mmod_upsample=1, mtcnn_config=None):
    """The detectors of a `--detector` choice (None: `default_choice()`), as LazyDetectors in their
    order. Asking for MMOD without dlib is the one-line install error here, before any work."""
    choice = choice or default_choice()
    if choice not in DETECTORS:
        raise ValueError(f'unknown --detector {choice!r}; use one of {", ".join(DETECTORS)}')
    names = choice.split('+')
    if 'mmod' in names:
        mmod.check_available()
    configs = {'mtcnn': dict(mtcnn_config or {}), 'mmod': dict(upsample=int(mmod_upsample))}
    return [LazyDetector(name, configs[name]) for name in names]


def add_detector_args(parser):
    """`--detector` and `--mmod-upsample`, shared by every CLI that aligns photos."""
    parser.add_argument('--detector', choices=DETECTORS, default=None,
                        help='face detector: MTCNN, dlib\'s MMOD CNN, or MTCNN with MMOD before the forced '
                             'centre crop (default: mtcnn+mmod when dlib is installed, else mtcnn)')
    parser.add_argument('--mmod-upsample', type=int, choices=mmod.UPSAMPLES, default=1,
                        help='MMOD upsampling: 1 finds faces down to ~40 px, 0 only from ~80 px but 4x faster')


def detectors_from_args(args, mtcnn_config=None):
    """build_detectors from the parsed `add_detector_args` flags."""
    return build_detectors(args.detector, args.mmod_upsample, mtcnn_config)
