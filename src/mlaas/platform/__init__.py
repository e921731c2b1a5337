"""The platform: many users' pipelines as jobs, run on shared machines.

Layer: platform. The rooms, each its own module:

- :mod:`mlaas.platform.principal`  who is asking (user, groups, roles)
- :mod:`mlaas.platform.authz`      the one authorisation function
- :mod:`mlaas.platform.records`    the records the store hands out, and job states
- :mod:`mlaas.platform.db`, :mod:`mlaas.platform.store`   SQL (SQLite or PostgreSQL)
- :mod:`mlaas.platform.storage`    platform storage: workspaces, job directories
- :mod:`mlaas.platform.executors`  where job processes run (local, later Ray)
- :mod:`mlaas.platform.manager`    the loop that admits, watches and finishes jobs
- :mod:`mlaas.platform.app`        the HTTP API, with the inference app mounted

Nothing here is imported by the data, train or serve layers.
"""
