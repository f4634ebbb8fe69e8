"""The chart's admission values: concurrent-Job limits reach the services, a Kueue queue reaches their Jobs."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate as kv
import pytest
import yaml
from _chart_tools import CHART, KUBERNETES_VERSION, by_kind, objects, render, run_helm

pytestmark = pytest.mark.integration


def _settings(data: dict[str, str], cls):
    return cls.model_validate({k.removeprefix("SELMA_").lower(): v for k, v in data.items()})


def test_concurrent_job_limits_and_the_kueue_queue_reach_the_services_and_their_jobs(tmp_path: Path) -> None:
    from selma.batch.kube import KUEUE_LABEL, build_job
    from selma.batch.launchers import LaunchRequest
    from selma_evaluation.settings import EvaluationSettings
    from selma_training.settings import TrainingSettings

    values = {"training": {"jobs": {"maxConcurrent": 2}}, "evaluation": {"separate": True, "maxConcurrentJobs": 1},
              "placementPolicy": {"defaultQueue": "team-gpus"}}
    config_maps = by_kind(objects(render(values=values)), "ConfigMap")
    shared = config_maps["selma-config"]["data"]
    training = _settings({**shared, **config_maps["selma-training"]["data"]}, TrainingSettings)
    evaluation = _settings({**shared, **config_maps["selma-evaluation"]["data"]}, EvaluationSettings)
    assert training.training_max_concurrent_jobs == 2 and evaluation.eval_max_concurrent_jobs == 1
    assert "SELMA_EVAL_MAX_CONCURRENT_JOBS" not in config_maps["selma-training"]["data"], "each service has its own limit"

    # its Jobs carry the queue and are created suspended, for Kueue to admit whole
    job = build_job(LaunchRequest(job_id="j0123456789", idempotency_key="k", run="quickstart", skill="counting",
                                  config_uri="s3://selma/x/config.json", expert_id="expert-x", placement={"gpus": 1}), training)
    assert job["metadata"]["labels"][KUEUE_LABEL] == "team-gpus" and job["spec"]["suspend"] is True
    kv.validate(job, KUBERNETES_VERSION, strict=True)

    default = by_kind(objects(render()), "ConfigMap")["selma-training"]["data"]
    assert default["SELMA_TRAINING_MAX_CONCURRENT_JOBS"] == "0" and default["SELMA_EVAL_MAX_CONCURRENT_JOBS"] == "0"

    for bad, where in (({"training": {"jobs": {"maxConcurrent": -1}}}, "/training/jobs/maxConcurrent"),
                       ({"evaluation": {"maxConcurrentJobs": "two"}}, "/evaluation/maxConcurrentJobs")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        proc = run_helm("template", "selma", str(CHART), "-f", str(path), check=False)
        assert proc.returncode != 0 and where in proc.stderr, (bad, proc.stderr)
