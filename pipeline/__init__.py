"""Data: DALI video pipelines (GPU and CPU), dataset adapters, the synthetic set and prepared-dataset I/O.
Knows DALI, files and datasets; nothing of the model."""
