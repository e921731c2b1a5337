"""Executors: where job processes run.

Layer: platform. :mod:`mlaas.platform.executors.base` defines the interface
(:class:`Launch`, :class:`Exited`, :class:`Executor`);
:mod:`mlaas.platform.executors.local` runs jobs as child processes of the
server (:class:`LocalExecutor`). A Ray executor will sit next to it behind the
same interface. Every executor runs the same job entry point,
``python -m mlaas.platform.jobrun JOB_DIR``.
"""

from mlaas.platform.executors.base import LIMIT_MEMORY, LIMIT_WALL_TIME, Executor, Exited, Launch
from mlaas.platform.executors.local import LocalExecutor

__all__ = ["Executor", "Exited", "Launch", "LocalExecutor", "LIMIT_MEMORY", "LIMIT_WALL_TIME"]
