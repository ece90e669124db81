"""fairface-recognition: an MXNet Gluon face-recognition library faithful to insightface."""
__version__ = "0.1.0"
