"""The server's metrics: what observing adds to the Prometheus text."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from mlaas.serve.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_requests_errors_and_latency_buckets() -> None:
    m = Metrics()
    m.observe_request("/json", "higgs", 1, 200, 0.001)  # on a bound: counted in its bucket
    m.observe_request("/json", "higgs", "1", 200, 0.003)  # the version as text: same label
    m.observe_request("/json", "higgs", 1, 400, 20.0)  # above every bound
    m.observe_request("/json", "", None, 404, 0.0001)
    got = _samples(m)
    ok = (("model", "higgs"), ("route", "/json"), ("status", "200"), ("version", "1"))
    bad = (("model", "higgs"), ("route", "/json"), ("status", "400"), ("version", "1"))
    unknown = (("model", ""), ("route", "/json"), ("status", "404"), ("version", ""))
    assert got["mlaas_requests_total", ok] == 2 and ("mlaas_errors_total", ok) not in got
    assert got["mlaas_requests_total", bad] == got["mlaas_errors_total", bad] == 1
    assert got["mlaas_errors_total", unknown] == 1
    latency = (("model", "higgs"), ("route", "/json"), ("version", "1"))
    bucket = {le: got["mlaas_request_seconds_bucket", (("le", le), *latency)]
              for le in ("0.0005", "0.001", "0.0025", "0.005", "10.0", "+Inf")}
    assert bucket == {"0.0005": 0, "0.001": 1, "0.0025": 1, "0.005": 2, "10.0": 2, "+Inf": 3}
    assert got["mlaas_request_seconds_count", latency] == 3
    assert abs(got["mlaas_request_seconds_sum", latency] - 20.004) < 1e-9


def test_batch_sizes() -> None:
    m = Metrics()
    for n in (1, 3, 3, 256):
        m.observe_batch("higgs", 2, n)
    got = _samples(m)
    labels = (("model", "higgs"), ("version", "2"))
    assert got["mlaas_batch_size_count", labels] == 4
    assert got["mlaas_batch_size_sum", labels] == 263
    assert got["mlaas_batch_size_bucket", (("le", "1.0"), *labels)] == 1
    assert got["mlaas_batch_size_bucket", (("le", "4.0"), *labels)] == 3
    assert got["mlaas_batch_size_bucket", (("le", "128.0"), *labels)] == 3
    assert got["mlaas_batch_size_bucket", (("le", "256.0"), *labels)] == 4
