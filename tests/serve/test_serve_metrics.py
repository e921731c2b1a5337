"""The server's metrics: what observing adds to the Prometheus text."""

from __future__ import annotations

from mlaas.serve.metrics import Metrics
from serve_support import samples


def _text(metrics: Metrics) -> str:
    return metrics.render()[0].decode()


def test_requests_errors_and_latency_buckets() -> None:
    m = Metrics()
    m.observe_request("/json", "higgs", 1, 200, 0.001)  # on a bound: counted in its bucket
    m.observe_request("/json", "higgs", "1", 200, 0.003)  # the version as text: same label
    m.observe_request("/json", "higgs", 1, 400, 20.0)  # above every bound
    m.observe_request("/json", "", None, 404, 0.0001)
    text = _text(m)
    requests = samples(text, "mlaas_requests_total")
    errors = samples(text, "mlaas_errors_total")
    ok = (("model", "higgs"), ("route", "/json"), ("status", "200"), ("version", "1"))
    bad = (("model", "higgs"), ("route", "/json"), ("status", "400"), ("version", "1"))
    unknown = (("model", ""), ("route", "/json"), ("status", "404"), ("version", ""))
    assert requests[ok] == 2 and ok not in errors
    assert requests[bad] == errors[bad] == 1 and errors[unknown] == 1
    latency = (("model", "higgs"), ("route", "/json"), ("version", "1"))
    buckets = samples(text, "mlaas_request_seconds_bucket")
    got = {le: buckets[(("le", le), *latency)]
           for le in ("0.0005", "0.001", "0.0025", "0.005", "10.0", "+Inf")}
    assert got == {"0.0005": 0, "0.001": 1, "0.0025": 1, "0.005": 2, "10.0": 2, "+Inf": 3}
    assert samples(text, "mlaas_request_seconds_count")[latency] == 3
    assert abs(samples(text, "mlaas_request_seconds_sum")[latency] - 20.004) < 1e-9


def test_batch_sizes() -> None:
    m = Metrics()
    for n in (1, 3, 3, 256):
        m.observe_batch("higgs", 2, n)
    text = _text(m)
    labels = (("model", "higgs"), ("version", "2"))
    assert samples(text, "mlaas_batch_size_count")[labels] == 4
    assert samples(text, "mlaas_batch_size_sum")[labels] == 263
    buckets = samples(text, "mlaas_batch_size_bucket")
    assert [buckets[(("le", le), *labels)] for le in ("1.0", "4.0", "128.0", "256.0")] == [
        1, 3, 3, 4]
