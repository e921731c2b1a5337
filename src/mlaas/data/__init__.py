"""Reading ROOT data into ML-ready batches.

Modules, from bytes to batches: ``sources`` (URLs, retries, uproot errors),
``layout`` (the spec bound to a tree), ``chunks`` (the reading plan),
``stats`` (pass 1), ``transform`` (cut, derive, pad, scale), ``cache``,
``loader`` (``RootDataset``), ``synth`` (the generator behind ``mlaas datagen``)
and ``inspect`` (``mlaas inspect``).
"""

from mlaas.data.loader import RootDataset

__all__ = ["RootDataset"]
