"""PyTorch references of the models fedfms_jax ports, with random weights: the official SAM
(PyPI `segment-anything`, `sam.py`) and FedFMS's model on top of it (Medical SAM Adapters,
LoRA, the class head: `fedfms.py`). The parity tests and the benchmarks both build their
PyTorch side from here; it needs the `test` extra (torch, segment-anything):

    pip install -e '.[test]'
"""
