"""Five-point face alignment, in layers: `geometry` (the arcface template and the warps onto it),
`fallbacks` (detect the main face with the FairFace seed's retries), `landmarks_file` (given points),
`folder` (align a folder tree in worker processes, with its align_report.csv).

Submodules are imported explicitly, so that the data layer can use the geometry without loading
the detector.
"""
