"""The Prometheus rendering: counters exist from the start, labels are rendered and summed right."""

from daemon.metrics import Metrics


def test_unlabelled_counters_are_rendered_before_the_first_event() -> None:
    text = Metrics().render()
    assert "kelips_gossip_bytes_out_total 0" in text.splitlines()
    assert "# TYPE kelips_gossip_bytes_out_total counter" in text


def test_labelled_counters_and_gauges() -> None:
    metrics = Metrics()
    metrics.inc("kelips_rejected_packets_total", reason="auth")
    metrics.inc("kelips_rejected_packets_total", 2, reason="auth")
    metrics.gauge("kelips_members", lambda: {(("state", "alive"),): 3.0})
    lines = metrics.render().splitlines()
    assert 'kelips_rejected_packets_total{reason="auth"} 3' in lines
    assert 'kelips_members{state="alive"} 3' in lines
    assert "# TYPE kelips_members gauge" in lines
    assert metrics.value("kelips_rejected_packets_total", reason="auth") == 3
