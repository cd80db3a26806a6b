"""The scoring maths (CHIPS_METHOD.md §1–§9): end-point model, sketch, features, target and
curvature statistics, scores, the slow references, and feature identity. Pure functions and small
classes over tensors and arrays; imports nothing from the platform, stages or flows."""
