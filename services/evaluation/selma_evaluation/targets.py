"""Do an evaluation's targets exist? Asked of ServingService (ListModels, ListExperts) before a job starts.

Evaluations render every target through ServingService, so that service is the authority on what
exists: a registered model name, an expert id, a ``<run>/<skill>`` reference.  Checking through its
API (never its storage or code) keeps the services apart, and turns a typo into NOT_FOUND naming the
target instead of a job that fails minutes later.  An unreachable serving service is not an answer:
the check is skipped with a warning and the job's renderer waits for the service, bounded, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from selma.errors import NotFound

log = logging.getLogger(__name__)


def check_targets_exist(endpoint: str, targets: Sequence[dict[str, Any]], search_expert_ids: Sequence[str] = (), *,
                        timeout: float = 15.0) -> None:
    """NOT_FOUND, naming the target's field, for a model or expert the serving service at ``endpoint`` does not have."""
    wanted_models = [(i, t["model_name"]) for i, t in enumerate(targets) if t.get("model_name")]
    wanted_experts = [(f"spec.targets[{i}].experts.experts[{j}].expert_id", e.get("expert_id", ""))
                      for i, t in enumerate(targets) for j, e in enumerate((t.get("experts") or {}).get("experts") or [])]
    wanted_experts += [(f"spec.merge_search.expert_ids[{k}]", eid) for k, eid in enumerate(search_expert_ids)]
    if not wanted_models and not wanted_experts:
        return
    import grpc

    from selma.client import Endpoints, SelmaClient
    from selma.routing import RetryPolicy
    from selma.v1 import serving_service_pb2 as spb

    # TLS and the service's own token when configured (SELMA_TLS_CA, SELMA_TOKEN); every replica of a
    # replicated endpoint in turn while one is UNAVAILABLE, no back-off (an unanswered check is skipped)
    client = SelmaClient(Endpoints(serving=endpoint), retry=RetryPolicy.off())
    try:
        if wanted_models:
            names = {m.model_name for m in _pages(lambda token: client.serving_call(
                "ListModels", spb.ListModelsRequest(page_size=1000, page_token=token), timeout=timeout), "models")}
            for i, name in wanted_models:
                if name not in names:
                    label = targets[i].get("label", "")
                    known = ", ".join(sorted(names)) or "none"
                    raise NotFound(f"target {label!r}: the serving service at {endpoint} has no model named {name!r} "
                                   f"(it serves: {known}); `selma models list` shows them", field=f"spec.targets[{i}].model_name")
        if wanted_experts:
            ids = {e.expert_id: (e.run, e.skill) for e in _pages(lambda token: client.serving_call(
                "ListExperts", spb.ListExpertsRequest(page_size=1000, page_token=token), timeout=timeout), "experts")}
            refs = {f"{run}/{skill}" for run, skill in ids.values()}
            for fld, eid in wanted_experts:
                if eid not in ids and eid not in refs:
                    raise NotFound(f"the serving service at {endpoint} has no expert {eid!r} (an expert id or <run>/<skill>); "
                                   "`selma experts list` shows them", field=fld)
    except grpc.RpcError as e:  # no answer is not a "no": the job may start, its renderer waits for serving
        code = e.code().name if callable(getattr(e, "code", None)) else "an error"
        log.warning("could not check the evaluation targets: the serving service at %s answered %s; the job starts and waits for it",
                    endpoint, code)
    finally:
        client.close()


def _pages(call: Any, field: str) -> list[Any]:
    out: list[Any] = []
    token = ""
    while True:
        resp = call(token)
        out += list(getattr(resp, field))
        token = resp.next_page_token
        if not token:
            return out
