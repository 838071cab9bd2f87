"""Evaluation: batched generation, text metrics, perplexity, before-vs-after reports.

``tunesmith.evaluate`` is both this package and the library function ``evaluate(...)``: importing
any submodule (``tunesmith.evaluate.metrics``) binds the package to that name on ``tunesmith``,
so the package itself is made callable and forwards to ``pipeline.evaluate``. Either way,
``tunesmith.evaluate(model, data, ...)`` and ``from tunesmith import evaluate`` work.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from tunesmith.evaluate.pipeline import evaluate  # deferred: torch, which metrics do not need

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
