"""Evaluation: insightface's verification protocol, pair-score ensembling and post-processing,
accuracy and bias metrics, identification, and the report writer."""
