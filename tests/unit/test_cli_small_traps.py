"""#23 item 10, the smaller traps: a run whose merge is refused shows as failed (not running) in
`selma runs`; a file:// store that does not exist is an error naming it, not an empty table; and
`selma eval dsg-score --template` prints the answers file to fill in."""

from __future__ import annotations

import csv
import io
import json
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from selma.app.cli import main
from selma.app.runner import Reporter, RunDriver, RunState
from selma.app.skillset import load_skillset
from selma.client import Endpoints, SelmaClient
from selma.errors import RunFailed
from selma.v1 import serving_service_pb2_grpc as spb_grpc

REPO = Path(__file__).resolve().parents[2]


class RefusingServing(spb_grpc.ServingServiceServicer):
    """Answers StartMerge as the service does when a run's merge settings changed under the same key."""

    def StartMerge(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.ALREADY_EXISTS, f"idempotency key {request.idempotency_key!r} was already used with different parameters")


class ExpertsReady(RunDriver):
    """The per-skill stages are done (their experts exist); only the merge is driven for real."""

    def skill_chain(self, skill):  # noqa: ANN001
        return f"expert-{skill.name}-1"


def test_a_run_refused_for_a_merge_change_shows_failed_in_selma_runs(tmp_path, capsys):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    spb_grpc.add_ServingServiceServicer_to_server(RefusingServing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        skillset = load_skillset(str(REPO / "examples" / "quickstart.yaml"))
        state = RunState.open(tmp_path / "runs", skillset)
        reporter = Reporter.__new__(Reporter)
        reporter.note = lambda text: None  # type: ignore[method-assign]
        with SelmaClient(Endpoints(serving=f"127.0.0.1:{port}"), timeout=10) as client:
            with pytest.raises(RunFailed, match="different settings"):
                ExpertsReady(client, skillset, state, reporter).run()
    finally:
        server.stop(0)
    capsys.readouterr()
    assert main(["runs", "--dir", str(tmp_path), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert run["name"] == skillset.name and run["phase"] == "failed" and "different settings" in run["message"]


def test_a_file_store_that_does_not_exist_is_an_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "storage"
    assert main(["artifacts", "list", "--storage", missing.as_uri()]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and "--storage" in err and len(err.strip().splitlines()) == 1
    assert main(["artifacts", "list", "--dir", str(tmp_path / "nodir")]) == 2
    assert str(tmp_path / "nodir" / "storage") in capsys.readouterr().err


def test_dsg_score_template_is_the_answers_file_to_fill_in(tmp_path, capsys):
    from selma_evaluation.dsg import load_dsg1k

    assert main(["eval", "dsg-score", "--template", "--categories", "countbench"]) == 0
    text = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(text)))
    items = load_dsg1k(["countbench"])
    assert len(rows) == sum(len(i.questions) for i in items) and all(r["answer"] == "" for r in rows)
    assert {r["item_id"] for r in rows} == {i.id for i in items}
    # filled in, it scores as it is: every answer yes is 100 %
    filled = tmp_path / "answers.csv"
    with filled.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r | {"answer": "yes"} for r in rows)
    assert main(["eval", "dsg-score", "--answers", str(filled), "--categories", "countbench", "--json"]) == 0
    assert "100" in capsys.readouterr().out
    assert main(["eval", "dsg-score"]) == 2
    assert "--template" in capsys.readouterr().err
