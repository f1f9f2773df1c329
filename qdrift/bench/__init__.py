"""Reference benchmark pieces: Fashion-MNIST data, the built-in U-Net / DiT / classifier, training, metrics.

Submodules are imported on demand (``qdrift.bench.models``, ``.data``, ``.metrics``, ``.train``, ``.images``,
``.quant_report``) so that ``import qdrift.bench`` stays cheap.
"""
