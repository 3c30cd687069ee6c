"""The benchmark: every method side by side under one protocol (``da3 bench``).

:func:`da3.bench.run.run_bench` runs a preset (:data:`da3.bench.run.PRESETS`); the stages live
in ``accuracy``, ``gating`` and ``da3.profile``; ``report`` writes ``docs/benchmark.md``.
"""
