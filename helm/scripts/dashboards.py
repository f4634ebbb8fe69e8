"""selma's Grafana dashboards, as data: each panel is a title, a unit and its PromQL queries.

``helm/scripts/generate.py`` writes them as Grafana JSON to ``helm/selma/files/dashboards/`` (the
chart ships them as sidecar ConfigMaps) and ``manifests/grafana/``. Every expression uses only
metrics the services export; CI sends each one to a real Prometheus that scrapes a live selma
server. Queries are filtered by the ``$namespace`` variable and use ``$__rate_interval``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NS = 'namespace="$namespace"'
RI = "$__rate_interval"


@dataclass(frozen=True)
class Q:
    """One query: PromQL and its legend (Grafana ``{{label}}`` syntax)."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A time series (or stat) panel."""

    title: str
    queries: tuple[Q, ...]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 12


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    tags: tuple[str, ...] = field(default=("selma",))


def _quantiles(metric: str, by: str, selector: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> tuple[Q, ...]:
    """p50/p95/p99 of a histogram, one series per ``by`` label set."""
    legend_by = " ".join("{{" + b.strip() + "}}" for b in by.split(",") if b.strip())
    return tuple(
        Q(
            f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket{{{selector}}}[{RI}])))",
            f"p{int(q * 100)} {legend_by}".strip(),
        )
        for q in qs
    )


OVERVIEW = Dashboard(
    uid="selma-overview",
    title="selma / services and jobs",
    description="Health, RPC traffic, errors and latency of the selma services (prompts, render, training, serving; the EvaluationService "
    "in the training Deployment, or its own with evaluation.separate), and their long-running jobs by state.",
    rows=(
        Row(
            "Services",
            (
                Panel(
                    "Services SERVING",
                    (Q(f"max by (service) (selma_service_ready{{{NS}}})", "{{service}}"),),
                    kind="stat",
                    description="1 once a service reports SERVING on its gRPC health check (model loaded), 0 while loading or draining.",
                    width=8,
                ),
                Panel(
                    "Scrape targets up",
                    (Q(f'sum by (job) (up{{{NS}, job=~".*selma.*"}})', "{{job}}"),),
                    kind="stat",
                    width=8,
                ),
                Panel(
                    "RPCs in flight",
                    (Q(f"sum by (grpc_service) (selma_grpc_server_in_flight_requests{{{NS}}})", "{{grpc_service}}"),),
                    width=8,
                ),
            ),
        ),
        Row(
            "RPC traffic, errors and latency",
            (
                Panel(
                    "RPCs/s by service",
                    (Q(f"sum by (grpc_service) (rate(selma_grpc_server_handled_total{{{NS}}}[{RI}]))", "{{grpc_service}}"),),
                    unit="reqps",
                ),
                Panel(
                    "Errors/s by service and code",
                    (
                        Q(
                            f'sum by (grpc_service, grpc_code) (rate(selma_grpc_server_handled_total{{{NS}, grpc_code!="OK"}}[{RI}]))',
                            "{{grpc_service}} {{grpc_code}}",
                        ),
                    ),
                    unit="reqps",
                    description="Client-side codes (INVALID_ARGUMENT, NOT_FOUND) are bad requests; INTERNAL/UNAVAILABLE point at the service or storage.",
                ),
                Panel(
                    "Unary RPC latency by service",
                    _quantiles("selma_grpc_server_handling_seconds", "grpc_service", f'{NS}, grpc_type="unary"', (0.5, 0.95)),
                    unit="s",
                ),
                Panel(
                    "RPCs started/s by method",
                    (
                        Q(
                            f"topk(10, sum by (grpc_service, grpc_method) (rate(selma_grpc_server_started_total{{{NS}}}[{RI}])))",
                            "{{grpc_service}}/{{grpc_method}}",
                        ),
                    ),
                    unit="reqps",
                ),
            ),
        ),
        Row(
            "Storage",
            (
                Panel(
                    "Storage errors/s by service, backend and code",
                    (
                        Q(
                            f"sum by (job, backend, code) (rate(selma_storage_errors_total{{{NS}}}[{RI}]))",
                            "{{job}} {{backend}} {{code}}",
                        ),
                    ),
                    unit="ops",
                    width=24,
                    description="Storage calls that failed after the client's retries (NOT_FOUND is not counted). "
                    "UNAVAILABLE: S3/MinIO endpoint down or unreachable; PERMISSION_DENIED: credentials or bucket policy (never heals by itself).",
                ),
            ),
        ),
        Row(
            "Jobs",
            (
                Panel(
                    "Jobs running by kind",
                    (Q(f"sum by (kind) (selma_jobs_active{{{NS}}})", "{{kind}}"),),
                    width=8,
                ),
                Panel(
                    "Jobs finished by kind and state (1h)",
                    (Q(f"sum by (kind, phase) (increase(selma_jobs_finished_total{{{NS}}}[1h]))", "{{kind}} {{phase}}"),),
                    width=8,
                    description="SUCCEEDED, FAILED or CANCELLED in the last hour.",
                ),
                Panel(
                    "Job duration by kind",
                    _quantiles("selma_job_duration_seconds", "kind", NS, (0.5, 0.95)),
                    unit="s",
                    width=8,
                ),
            ),
        ),
    ),
)

PIPELINE = Dashboard(
    uid="selma-pipeline",
    title="selma / pipeline stages",
    description="The SELMA pipeline stage by stage: prompt generation, rendering, expert training and serving.",
    rows=(
        Row(
            "Stage 1: prompts",
            (
                Panel(
                    "Prompts accepted per skill (total)",
                    (Q(f"sum by (skill) (selma_prompts_accepted_total{{{NS}}})", "{{skill}}"),),
                    kind="bargauge",
                    description="Pipeline progress of stage 1: accepted prompts so far, per skill.",
                    width=8,
                ),
                Panel(
                    "Accepted and rejected prompts/s",
                    (
                        Q(f"sum by (skill) (rate(selma_prompts_accepted_total{{{NS}}}[{RI}]))", "accepted {{skill}}"),
                        Q(f"sum by (reason) (rate(selma_prompts_rejected_total{{{NS}}}[{RI}]))", "rejected: {{reason}}"),
                    ),
                    unit="ops",
                    width=8,
                ),
                Panel(
                    "LLM request latency",
                    _quantiles("selma_prompts_llm_request_seconds", "backend", NS, (0.5, 0.95)),
                    unit="s",
                    width=8,
                ),
                Panel(
                    "LLM errors/s by class",
                    (Q(f"sum by (backend, error) (rate(selma_prompts_llm_errors_total{{{NS}}}[{RI}]))", "{{backend}} {{error}}"),),
                    unit="ops",
                    width=8,
                ),
                Panel(
                    "LLM tokens/s",
                    (Q(f"sum by (backend, type) (rate(selma_prompts_llm_tokens_total{{{NS}}}[{RI}]))", "{{backend}} {{type}}"),),
                    width=8,
                ),
                Panel(
                    "Diversity filter time",
                    _quantiles("selma_prompts_filter_seconds", "filter", NS, (0.5, 0.95)),
                    unit="s",
                    width=8,
                ),
            ),
        ),
        Row(
            "Stage 2: render",
            (
                Panel(
                    "Images rendered/s",
                    (Q(f"sum by (source) (rate(selma_render_images_total{{{NS}}}[{RI}]))", "{{source}}"),),
                    unit="ops",
                    width=8,
                ),
                Panel(
                    "Seconds per image",
                    _quantiles("selma_render_image_seconds", "source", NS, (0.5, 0.95)),
                    unit="s",
                    width=8,
                ),
                Panel(
                    "Render queue and OOM retries",
                    (
                        Q(f"sum(selma_render_queue_length{{{NS}}})", "queued datasets"),
                        Q(f"sum(increase(selma_render_oom_retries_total{{{NS}}}[{RI}]))", "OOM retries"),
                    ),
                    width=8,
                ),
                Panel(
                    "Gate: candidates scored (kept, rejected) and read from the journal/s",
                    (
                        Q(f"sum by (verdict) (rate(selma_gate_images_total{{{NS}}}[{RI}]))", "{{verdict}}"),
                        Q(f"sum(rate(selma_gate_images_journaled_total{{{NS}}}[{RI}]))", "read from the journal"),
                    ),
                    unit="ops",
                    description="The gate stage (spec.gate) between render and training: each best-of-K candidate scored against "
                    "its prompt's questions; kept at a DSG score at or above the threshold.",
                    width=8,
                ),
                Panel(
                    "Gate pass rate",
                    (
                        Q(
                            f"sum(rate(selma_gate_images_total{{verdict=\"kept\",{NS}}}[{RI}])) / "
                            f"sum(rate(selma_gate_images_total{{{NS}}}[{RI}]))",
                            "kept / candidates",
                        ),
                    ),
                    unit="percentunit",
                    width=8,
                ),
                Panel(
                    "Gate: seconds per candidate (VQA)",
                    _quantiles("selma_gate_image_seconds", "", NS, (0.5, 0.95)),
                    unit="s",
                    width=8,
                ),
            ),
        ),
        Row(
            "Stage 3: expert training",
            (
                Panel(
                    "Training progress per skill",
                    (Q(f"max by (skill) (selma_training_step{{{NS}}}) / max by (skill) (selma_training_max_steps{{{NS}}})", "{{skill}}"),),
                    unit="percentunit",
                    kind="bargauge",
                    description="Pipeline progress of stage 3: optimizer steps done / planned for each skill's latest expert.",
                    width=8,
                ),
                Panel(
                    "Training loss per skill",
                    (Q(f"max by (skill) (selma_training_loss{{{NS}}})", "{{skill}}"),),
                    width=8,
                ),
                Panel(
                    "Steps/s per skill",
                    (Q(f"max by (skill) (selma_training_steps_per_second{{{NS}}})", "{{skill}}"),),
                    width=8,
                ),
                Panel(
                    "Time to completion per skill",
                    (Q(f"max by (skill) (selma_training_eta_seconds{{{NS}}})", "{{skill}}"),),
                    unit="s",
                    width=8,
                ),
                Panel(
                    "Trainers launched and finished (1h)",
                    (
                        Q(f"sum by (task, launcher) (increase(selma_batch_launches_total{{{NS}}}[1h]))", "launched ({{task}}, {{launcher}})"),
                        Q(f"sum by (task, launcher) (increase(selma_batch_adoptions_total{{{NS}}}[1h]))", "adopted ({{task}}, {{launcher}})"),
                        Q(f"sum by (task, outcome) (increase(selma_batch_outcomes_total{{{NS}}}[1h]))", "{{task}} {{outcome}}"),
                    ),
                    width=8,
                    description="task=train: trainers of the TrainingService; task=eval: evaluation workers of the EvaluationService "
                    "(in the training Deployment, or its own with evaluation.separate).",
                ),
                Panel(
                    "Kubernetes API errors and checkpoint fallbacks",
                    (
                        Q(f"sum by (verb, code) (increase(selma_batch_kubernetes_api_errors_total{{{NS}}}[{RI}]))", "{{verb}} {{code}}"),
                        Q(f"sum(increase(selma_training_checkpoint_fallbacks_total{{{NS}}}[{RI}]))", "checkpoint fallbacks"),
                    ),
                    width=8,
                ),
            ),
        ),
        Row(
            "Stage 4: serving",
            (
                Panel(
                    "Generate latency (arrival to last image)",
                    _quantiles("selma_serving_request_seconds", "", NS),
                    unit="s",
                    width=8,
                ),
                Panel(
                    "Queue depth and in-flight generations",
                    (
                        Q(f"sum(selma_serving_queue_depth{{{NS}}})", "queued"),
                        Q(f"sum(selma_serving_in_flight_requests{{{NS}}})", "generating"),
                        Q(f"sum(rate(selma_serving_rejected_requests_total{{{NS}}}[{RI}]))", "rejected/s"),
                    ),
                    width=8,
                ),
                Panel(
                    "Images generated/s by model kind",
                    (Q(f"sum by (model) (rate(selma_serving_images_generated_total{{{NS}}}[{RI}]))", "{{model}}"),),
                    unit="ops",
                    width=8,
                ),
                Panel(
                    "Merge cache hit ratio",
                    (
                        Q(
                            f"sum(rate(selma_serving_merge_cache_hits_total{{{NS}}}[{RI}])) / "
                            f"(sum(rate(selma_serving_merge_cache_hits_total{{{NS}}}[{RI}])) + sum(rate(selma_serving_merge_cache_misses_total{{{NS}}}[{RI}])))",
                            "hit ratio",
                        ),
                    ),
                    unit="percentunit",
                    width=8,
                ),
                Panel(
                    "Merge time",
                    _quantiles("selma_serving_merge_seconds", "source", NS, (0.5, 0.95)),
                    unit="s",
                    width=8,
                ),
                Panel(
                    "Model load time",
                    _quantiles("selma_serving_model_load_seconds", "kind", NS, (0.5, 0.95)),
                    unit="s",
                    width=8,
                ),
            ),
        ),
        Row(
            "Stage 4: serving, batching and admission",
            (
                Panel(
                    "Batch size (images per pipeline call) by model kind",
                    (
                        *_quantiles("selma_serving_batch_size", "model", NS, (0.5, 0.95)),
                        Q(
                            f"sum by (model) (rate(selma_serving_batch_size_sum{{{NS}}}[{RI}])) / "
                            f"sum by (model) (rate(selma_serving_batch_size_count{{{NS}}}[{RI}]))",
                            "mean {{model}}",
                        ),
                    ),
                    description="Requests for the same model and settings share one batched call (SELMA_SERVING_MAX_BATCH_SIZE).",
                    width=8,
                ),
                Panel(
                    "Queue wait (arrival to a slot or a batch)",
                    _quantiles("selma_serving_queue_wait_seconds", "", NS),
                    unit="s",
                    width=8,
                ),
                Panel(
                    "Time to first denoising step by model kind",
                    _quantiles("selma_serving_time_to_first_step_seconds", "model", NS, (0.5, 0.95)),
                    unit="s",
                    width=8,
                ),
                Panel(
                    "Images/s per replica and model kind",
                    (Q(f"sum by (pod, model) (rate(selma_serving_images_generated_total{{{NS}}}[{RI}]))", "{{pod}} {{model}}"),),
                    unit="ops",
                    width=12,
                ),
                Panel(
                    "Merge cache hit ratio per replica",
                    (
                        Q(
                            f"sum by (pod) (rate(selma_serving_merge_cache_hits_total{{{NS}}}[{RI}])) / "
                            f"(sum by (pod) (rate(selma_serving_merge_cache_hits_total{{{NS}}}[{RI}])) + "
                            f"sum by (pod) (rate(selma_serving_merge_cache_misses_total{{{NS}}}[{RI}])))",
                            "{{pod}}",
                        ),
                    ),
                    unit="percentunit",
                    width=12,
                ),
            ),
        ),
    ),
)

DASHBOARDS = (OVERVIEW, PIPELINE)


def _target(q: Q, ref: str) -> dict[str, Any]:
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": q.expr, "legendFormat": q.legend, "refId": ref, "range": True}


def to_grafana(d: Dashboard) -> dict[str, Any]:
    """Grafana dashboard JSON (schemaVersion 39) with datasource and namespace variables."""
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in d.rows:
        panels.append({"type": "row", "id": pid, "title": row.title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y = 0, y + 8
            panels.append(
                {
                    "type": p.kind,
                    "id": pid,
                    "title": p.title,
                    "description": p.description,
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
                    "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}} if p.kind == "timeseries" else {},
                    "targets": [_target(q, chr(ord("A") + i)) for i, q in enumerate(p.queries)],
                }
            )
            pid, x = pid + 1, x + p.width
        y += 8
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": list(d.tags),
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "graphTooltip": 1,
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": "label_values(selma_service_ready, namespace)", "refId": "namespace"},
                    "definition": "label_values(selma_service_ready, namespace)",
                    "refresh": 2,
                    "current": {},
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }
