"""The course lab: offline data, small models and their checkpoints, one training loop, experiments, analysis, the tour."""
