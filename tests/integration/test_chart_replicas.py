"""The chart's serving replicas: N pods, a headless Service over them that in-cluster clients route
over (and that the certificate names), and an HPA on the pods' queue depth."""

from __future__ import annotations

from typing import Any

import pytest
from _chart_tools import CHART, by_kind, objects, render

from selma.routing import parse_serving_endpoint

pytestmark = pytest.mark.integration


def _docs(scenario: str = "", values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    files = (CHART / "ci" / f"{scenario}-values.yaml",) if scenario else ()
    return objects(render(files, values=values))


def _eval_endpoint(docs: list[dict[str, Any]]) -> str:
    return next(cm["data"]["SELMA_EVAL_SERVING_ENDPOINT"] for cm in by_kind(docs, "ConfigMap").values()
                if "SELMA_EVAL_SERVING_ENDPOINT" in (cm.get("data") or {}))


def test_replicas_get_a_headless_service_that_evaluation_routes_over_and_the_certificate_names() -> None:
    docs = _docs("serving-replicas")
    deployment = by_kind(docs, "Deployment")["selma-serving"]
    assert deployment["spec"]["replicas"] == 3
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    services = by_kind(docs, "Service")
    headless, normal = services["selma-serving-replicas"], services["selma-serving"]
    assert headless["spec"]["clusterIP"] == "None" and normal["spec"].get("clusterIP") != "None"
    # the same pods, the gRPC port only (metrics are scraped once, through the normal Service)
    assert headless["spec"]["selector"] == normal["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert headless["metadata"]["labels"]["app.kubernetes.io/component"] == "serving-replicas"
    endpoint = _eval_endpoint(docs)
    assert endpoint == "dns:///selma-serving-replicas:50051" and parse_serving_endpoint(endpoint) == [endpoint]
    (cert,) = by_kind(docs, "Certificate").values()
    assert {"selma-serving-replicas", "selma-serving-replicas.selma.svc.cluster.local"} <= set(cert["spec"]["dnsNames"])


def test_the_monitoring_scrape_does_not_select_the_headless_service() -> None:
    docs = _docs("monitoring")
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    components = next(e["values"] for e in monitor["spec"]["selector"]["matchExpressions"] if e["key"] == "app.kubernetes.io/component")
    assert "serving" in components and "serving-replicas" not in components


def test_routing_off_keeps_the_normal_service_only() -> None:
    docs = _docs(values={"serving": {"routing": {"enabled": False}}})
    assert "selma-serving-replicas" not in by_kind(docs, "Service")
    assert _eval_endpoint(docs) == "selma-serving:50051"


def test_the_hpa_scales_serving_on_the_pods_queue_depth() -> None:
    docs = _docs(values={"serving": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0,
                                                     "queueDepth": {"enabled": True, "averageValue": "3"}}}})
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": "selma_serving_queue_depth"},
                                                                "target": {"type": "AverageValue", "averageValue": "3"}}}]
    assert "selma-serving-replicas" in by_kind(docs, "Service")
