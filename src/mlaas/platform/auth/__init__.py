"""Authentication of the multi-user platform: who is asking, proven how.

Layer: platform. Each module has one job and none decides access (that is
:mod:`mlaas.platform.authz`):

- :mod:`mlaas.platform.auth.oidc`           OIDC bearer JWTs: validation, claims to Principal
- :mod:`mlaas.platform.auth.proxy`          identity headers from a trusted reverse proxy
- :mod:`mlaas.platform.auth.tokens`         personal API tokens (hashed, scoped, expiring)
- :mod:`mlaas.platform.auth.ratelimit`      per-principal token buckets
- :mod:`mlaas.platform.auth.authenticator`  the request -> Principal entry point
- :mod:`mlaas.platform.auth.jobtoken`       the user's token handed to XRootD in a job

``tokens`` (and so ``authenticator``) import the SQL layer; import them from
their modules. This package itself imports nothing.
"""
