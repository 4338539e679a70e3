"""The sampler names, defined once: params.yaml's grid (config.py), the feature sources
(`sampling.feature_source`), the shortcut's validation, the paired comparisons and the report."""

VANILLA = "vanilla"  # the base at every step (B = N)
SHORTCUT = "shortcut"  # the learned shortcut predicts the feature between the B full steps
REUSE = "reuse"  # training-free: the last full step's feature, unchanged
EXTRAPOLATE = "extrapolate"  # training-free: first-order extrapolation of the last two full steps
BASELINES = (REUSE, EXTRAPOLATE)  # what a shortcut row is compared with at the same N and B
SAMPLERS = (VANILLA, SHORTCUT, *BASELINES)
