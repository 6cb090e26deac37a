"""Evaluation metrics, one job per module: FID/IS maths and reference statistics (fid.py), the
feature spaces they are computed in (features.py), the sklearn classifiers trained on real pixels
(pixel_classifiers.py), reconstruction metrics (reconstruction.py) and the class consistency of
conditional samples (class_consistency.py); bad inputs raise `inputs.MetricsInputError`. Images are
read by `unite.data.readers`. The package imports none of its modules, so that a stage depends only
on what it runs.
"""
