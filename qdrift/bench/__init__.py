"""The library code of every benchmark (the runnable scripts in ``benchmarks/`` only call ``main()`` here).

- analytic Gaussian: ``gaussian`` (data with an exact denoiser, the planted-error model, its exact moments),
  ``analytic`` (``qdrift analytic``), ``baselines_gaussian`` (peer baselines), ``overhead`` (cost of Q-Drift);
- the model bench (``qdrift bench``): ``models``, ``data``, ``train``, ``guidance``, ``runner``, ``metrics``,
  ``report``, ``figures``, ``images``, ``quant_report``, ``cli``.

Submodules are imported on demand, so ``import qdrift.bench`` (and ``import qdrift.bench.gaussian``) stays cheap.
The core never imports this package.
"""
