"""``selma eval run | status | list | cancel | report`` in-process against real servers.

A module-scoped stack: a ServingService on the tiny SD model (two seeded experts published, and
their merge registered as ``quickstart`` like the quickstart run does) and a TrainingService whose
evaluation jobs run ``selma eval execute`` as local subprocesses.  The CLI finds both through an
endpoints file (``--endpoints``).  The example specs under ``examples/evaluation/`` are checked
to parse and validate, and are run adapted to the tiny models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

from selma.api import dict_to_message, message_to_dict
from selma.app.cli import main
from selma.artifacts import ArtifactKind, new_artifact_id
from selma.v1 import common_pb2
from selma.v1 import evaluation_service_pb2 as pb
from selma.v1 import serving_service_pb2 as spb
from selma.v1 import serving_service_pb2_grpc as spb_grpc

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "evaluation"
EXAMPLE_FILES = ("dsg1k-countbench.yaml", "heldout-search.yaml")
TINY_RENDER = ["--steps", "2", "--width", "64", "--height", "64"]


def _register_merge(stub: spb_grpc.ServingServiceStub, name: str, expert_ids: list[str]) -> None:
    """Merge the experts and register the result under ``name`` (what `selma run` ends with)."""
    spec = spb.MergeJobSpec(model_name=name, register=True, replace=True,
                            merge=common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id=e) for e in expert_ids]))
    job = stub.StartMerge(spb.StartMergeRequest(idempotency_key=f"cli-test/{name}", spec=spec), timeout=60).job
    for update in stub.WatchMerge(spb.WatchMergeRequest(job_id=job.status.job_id), timeout=120):
        job = update.job
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message


@pytest.fixture(scope="module")
def stack(eval_stack):
    _register_merge(eval_stack["serving"], "quickstart", [e.id for e in eval_stack["experts"]])
    return eval_stack


def selma(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``selma ARGV`` in this process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["--log-level", "WARNING", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _job_id(stderr: str) -> str:
    m = re.search(r"^evaluation (\S+) \((started|attached), key ", stderr, re.M)
    assert m, stderr
    return m.group(1)


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """The score table: first cell → the other cells (header row under 'slice')."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and not set(line.strip()) <= {"-", " "}:
            rows.setdefault(cells[0], cells[1:])
    return rows


# ------------------------------------------------------------------------------------------ run


def test_run_from_flags_prints_scores_downloads_the_report_and_a_rerun_attaches(stack, capsys, tmp_path):
    e1, e2 = (e.id for e in stack["experts"])
    out = tmp_path / "report"
    argv = ["eval", "run", "--endpoints", stack["endpoints"], "--benchmark", "dsg-1k", "--categories", "countbench",
            "--max-prompts", "2", "--target", "base", "--target", f"mix=experts:{e1}=0.5,{e2}=0.5", "--vqa", "tiny:1",
            *TINY_RENDER, "--out", str(out)]
    code, stdout, stderr = selma(capsys, *argv)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    job_id = _job_id(stderr)
    assert "(started," in stderr

    rows = _table_rows(stdout)
    assert rows["slice"] == ["base", "DSG", "mix", "DSG"]
    # the tiny VQA's numbers are plumbing, and the output says so under the table and in the report
    assert "warning: the tiny_test VQA answers pseudo-randomly" in stdout
    for name in ("countbench", "overall"):
        assert len(rows[name]) == 2 and all(0 <= float(x) <= 100 for x in rows[name])
    m = re.search(r"^report: (\S+)\n  (\S+)$", stdout, re.M)
    assert m, stdout
    report_id, html_uri = m.groups()
    manifest = stack["store"].get(report_id)
    assert manifest.kind == ArtifactKind.EVAL_REPORT.value
    assert html_uri == manifest.file_uri("index.html") and html_uri.endswith("/index.html")

    for path in ("index.html", "report.json", "tables.md", "charts/overall.png", "charts/dsg_by_category.png"):
        assert (out / path).is_file(), path
    assert len(list((out / "images" / "base").iterdir())) == len(list((out / "images" / "mix").iterdir())) == 2
    assert "mix" in json.dumps(json.loads((out / "report.json").read_text()))
    assert json.loads((out / "report.json").read_text())["vqa_plumbing_only"] is True

    # The same command again: the same job (key = digest of the spec), nothing rendered again.
    code, stdout2, stderr2 = selma(capsys, *argv)
    assert code == 0, stderr2
    assert "(attached," in stderr2 and _job_id(stderr2) == job_id
    assert f"report: {report_id}" in stdout2
    again = stack["store"].get(report_id)
    assert again.created_at == manifest.created_at and again.digest == manifest.digest

    # --json prints the job alone on stdout (the progress display goes to stderr).
    code, stdout3, stderr3 = selma(capsys, *argv[:-2], "--json")
    assert code == 0, stderr3
    job = json.loads(stdout3)
    assert job["status"]["job_id"] == job_id and job["status"]["phase"] == "JOB_PHASE_SUCCEEDED"
    assert {s["target_label"] for s in job["stats"]["scores"]} == {"base", "mix"}
    assert int(job["stats"]["images_rendered"]) == 4  # int64: a string in proto-JSON

    # status / list / report, as text and JSON.
    code, stdout, _ = selma(capsys, "eval", "status", job_id, "--endpoints", stack["endpoints"])
    assert code == 0 and stdout.startswith(f"{job_id}  SUCCEEDED")
    assert "overall" in stdout
    code, stdout, _ = selma(capsys, "eval", "status", job_id, "--endpoints", stack["endpoints"], "--json")
    status = json.loads(stdout)
    assert code == 0 and status["status"]["output"]["id"] == report_id
    assert status["spec"]["categories"] == ["countbench"]

    code, stdout, _ = selma(capsys, "eval", "list", "--endpoints", stack["endpoints"], "--plain")
    assert code == 0 and stdout.startswith("job\tphase\t")
    line = next(ln for ln in stdout.splitlines() if ln.startswith(job_id + "\t"))
    assert "SUCCEEDED" in line and report_id in line
    code, stdout, _ = selma(capsys, "eval", "list", "--endpoints", stack["endpoints"], "--json")
    listed = {j["status"]["job_id"]: j for j in json.loads(stdout)}
    assert code == 0 and listed[job_id]["status"]["output"]["id"] == report_id

    code, stdout, stderr = selma(capsys, "eval", "report", report_id, "--storage", stack["storage_uri"])
    assert code == 0, stderr
    assert stdout == (out / "tables.md").read_text()
    assert "base" in stdout and "mix" in stdout
    out2 = tmp_path / "again"
    code, stdout, _ = selma(capsys, "eval", "report", report_id, "--storage", stack["storage_uri"], "--out", str(out2))
    assert code == 0 and (out2 / "index.html").read_bytes() == (out / "index.html").read_bytes()

    # unknown ids are clean errors
    code, _, stderr = selma(capsys, "eval", "status", "evaluation-doesnotexist", "--endpoints", stack["endpoints"])
    assert code == 2 and stderr.startswith("selma: error:") and "NOT_FOUND" in stderr
    code, _, stderr = selma(capsys, "eval", "report", "eval-report-doesnotexist", "--storage", stack["storage_uri"])
    assert code == 2 and stderr.startswith("selma: error:") and "Traceback" not in stderr


def _tiny_countbench_spec() -> dict:
    """examples/evaluation/dsg1k-countbench.yaml with the tiny VQA model, tiny renders and the local launcher."""
    spec = yaml.safe_load((EXAMPLES / "dsg1k-countbench.yaml").read_text())
    spec.update(vqa={"tinyTest": {"seed": 2}}, diffusion={"steps": 2, "width": 64, "height": 64}, maxPrompts=2, imagesPerPrompt=1,
                placement={"launcher": "LAUNCHER_KIND_LOCAL"})
    return spec


def test_run_from_the_example_spec_on_tiny_models(stack, capsys, tmp_path):
    spec_file = tmp_path / "countbench.yaml"
    spec_file.write_text(yaml.safe_dump(_tiny_countbench_spec()))
    code, stdout, stderr = selma(capsys, "eval", "run", "--endpoints", stack["endpoints"], "--spec", str(spec_file))
    assert code == 0, stderr
    rows = _table_rows(stdout)
    assert rows["slice"] == ["base", "DSG", "selma", "DSG"]  # `selma` is the registered model `quickstart`
    assert set(rows) >= {"countbench", "overall"}
    report_id = re.search(r"^report: (\S+)$", stdout, re.M).group(1)
    manifest = stack["store"].get(report_id)
    assert manifest.labels.get("selma.dev/run") == "quickstart"
    assert "DSG-1k CountBench" in manifest.name
    assert sorted(p.path for p in manifest.files if p.path.startswith("images/selma/"))


def test_run_from_the_search_example_on_tiny_models_registers_the_winner(stack, capsys, tmp_path):
    store, experts = stack["store"], stack["experts"]

    def prompt_set(key: str, prompts: list[str]) -> str:
        lines = []
        for i, text in enumerate(prompts):
            noun = text.split()[-1]
            lines.append(json.dumps({"id": f"p{i:06d}", "index": i, "text": text, "skill": "counting", "questions": [
                {"id": "1", "text": f"Is there a {noun}?", "category": "entity"},
                {"id": "2", "text": f"Are there two {noun}s?", "parents": ["1"], "category": "count"},
                {"id": "3", "text": f"How many {noun}s are there?", "choices": ["one", "two", "three"], "answer": "two", "category": "count"},
            ]}))
        pid = new_artifact_id(ArtifactKind.PROMPT_SET, key)
        with store.writer(ArtifactKind.PROMPT_SET, id=pid, parameters={"skill": "counting", "count": len(prompts)},
                          labels={"selma.dev/skill": "counting"}) as w:
            w.put_bytes("prompts.jsonl", ("\n".join(lines) + "\n").encode())
        return pid

    spec = yaml.safe_load((EXAMPLES / "heldout-search.yaml").read_text())
    spec["promptSet"] = {"id": prompt_set("cli/heldout/test", ["two red apples", "two blue cups"])}
    spec["promptSets"] = []
    spec.pop("questionBackend")  # the prompts carry their questions
    search = spec["mergeSearch"]
    search.update(expertIds=[e.id for e in experts], methods=["MERGE_METHOD_MEAN_DELTA"], weightValues=[0.5, 1.0], maxTrials=2,
                  validationPromptSet={"id": prompt_set("cli/heldout/val", ["two green kites"])}, validationPromptSets=[],
                  registerModelName="cli-searched")
    spec.update(vqa={"tinyTest": {"seed": 4}}, diffusion={"steps": 2, "width": 64, "height": 64}, placement={"launcher": "LAUNCHER_KIND_LOCAL"})
    spec_file = tmp_path / "search.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    code, stdout, stderr = selma(capsys, "eval", "run", "--endpoints", stack["endpoints"], "--spec", str(spec_file))
    assert code == 0, stderr
    rows = _table_rows(stdout)
    assert rows["slice"] == ["base", "DSG", "base", "TIFA", "selma", "DSG", "selma", "TIFA", "search-best", "DSG", "search-best", "TIFA"]
    assert "counting" in rows and "overall" in rows
    assert "best merge registered as cli-searched" in stdout
    models = {m.model_name for m in stack["serving"].ListModels(spb.ListModelsRequest()).models}
    assert "cli-searched" in models


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--target", "=model:"], "--target"),
        (["--target", "a=model:"], "--target"),
        (["--target", "mix=experts:"], "--target"),
        (["--vqa", "nonsense"], "--vqa"),
        (["--vqa", "tiny:x"], "--vqa"),
        (["--search-weights", "a,b"], "--search-weights"),
        (["--search-experts", "e1,e2", "--search-weights", "a,b"], "--search-weights"),
        (["--method", "ties", "--target", "m=experts:e1=x,e2"], "--target"),
    ],
)
def test_bad_flags_exit_2_with_a_message_and_no_traceback(capsys, tmp_path, flags, needle):
    # no servers needed: flags are checked before anything is contacted
    code, stdout, stderr = selma(capsys, "eval", "run", "--endpoints", str(tmp_path / "none.json"), *flags)
    assert code == 2
    assert stderr.startswith("selma: error:"), stderr
    assert needle in stderr
    assert "Traceback" not in stderr and stdout == ""


def test_flags_build_a_spec_that_parses_strictly():
    from selma.app.cli import build_parser
    from selma_evaluation.commands import spec_from_args

    args = build_parser().parse_args([
        "eval", "run", "--benchmark", "prompt-set", "--prompt-set", "ps-a", "--prompt-set", "ps-b", "--metric", "dsg", "--metric", "tifa",
        "--target", "base", "--target", "best=model:quickstart", "--vqa", "openai:Qwen/Qwen2-VL-7B-Instruct@http://vllm:8000/v1",
        "--question-backend", "embedded", "--search-experts", "run/a,run/b", "--search-methods", "ties,mean_delta",
        "--search-densities", "0.3", "--search-weights", "0.5,1", "--search-strategy", "random", "--max-trials", "3",
        "--validation-prompt-set", "ps-val", "--register", "searched", "--launcher", "kubernetes", "--gpus", "1", "--guidance", "5",
    ])
    spec = message_to_dict(json_format.ParseDict(spec_from_args(args), pb.EvaluationSpec()))
    assert spec["vqa"]["openai_compatible"] == {"base_url": "http://vllm:8000/v1", "model": "Qwen/Qwen2-VL-7B-Instruct",
                                                "api": "OPEN_AI_API_CHAT_COMPLETIONS"}
    assert spec["prompt_set"] == {"id": "ps-a"} and spec["prompt_sets"] == [{"id": "ps-b"}]
    assert spec["targets"] == [{"label": "base"}, {"label": "best", "model_name": "quickstart"}]
    search = spec["merge_search"]
    assert search["methods"] == ["MERGE_METHOD_TIES", "MERGE_METHOD_MEAN_DELTA"] and search["weight_values"] == [0.5, 1.0]
    assert search["strategy"] == "MERGE_SEARCH_STRATEGY_RANDOM" and search["register_model_name"] == "searched"
    assert spec["placement"] == {"launcher": "LAUNCHER_KIND_KUBERNETES", "gpus": 1}


def test_a_spec_with_an_unknown_field_is_refused_with_the_field_named(capsys, tmp_path):
    spec = _tiny_countbench_spec()
    spec["targetz"] = [{"label": "base"}]
    spec_file = tmp_path / "typo.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    code, stdout, stderr = selma(capsys, "eval", "run", "--endpoints", str(tmp_path / "none.json"), "--spec", str(spec_file))
    assert code == 2
    assert stderr.startswith("selma: error:") and "targetz" in stderr
    assert "Traceback" not in stderr and stdout == ""

    # a bad enum value is no silent default either, nor is a missing file or a list
    spec = _tiny_countbench_spec()
    spec["metrics"] = ["EVALUATION_METRIC_DSG2"]
    spec_file.write_text(yaml.safe_dump(spec))
    code, _, stderr = selma(capsys, "eval", "run", "--endpoints", str(tmp_path / "none.json"), "--spec", str(spec_file))
    assert code == 2 and "EVALUATION_METRIC_DSG2" in stderr and "Traceback" not in stderr
    for text in (None, "- a\n- b\n"):
        path = tmp_path / ("missing.yaml" if text is None else "list.yaml")
        if text is not None:
            path.write_text(text)
        code, _, stderr = selma(capsys, "eval", "run", "--endpoints", str(tmp_path / "none.json"), "--spec", str(path))
        assert code == 2 and stderr.startswith("selma: error:") and "Traceback" not in stderr


def test_missing_endpoints_file_is_a_clean_error(capsys, tmp_path):
    code, _, stderr = selma(capsys, "eval", "list", "--endpoints", str(tmp_path / "none.json"))
    assert code == 2 and stderr.startswith("selma: error:") and "endpoints" in stderr


# ------------------------------------------------------------------------------------------ cheap checks


def test_eval_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("dsg-score", "run", "status", "list", "cancel", "report", "execute"):
        assert re.search(rf"^\s+{re.escape(name)}\s", out, re.M), name


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_specs_parse_and_validate(name):
    from selma.batch.kube import validate_placement
    from selma_evaluation.dsg import load_dsg1k
    from selma_evaluation.runner import search_grid
    from selma_evaluation.settings import EvaluationSettings
    from selma_evaluation.vqa import resolve_backend

    raw = yaml.safe_load((EXAMPLES / name).read_text())
    msg = dict_to_message(raw, pb.EvaluationSpec)
    # strictly too: dict_to_message ignores unknown fields and enum values, a typo must not hide
    assert json_format.ParseDict(raw, pb.EvaluationSpec()) == msg
    spec = message_to_dict(msg)
    assert spec["benchmark"] in ("EVALUATION_BENCHMARK_DSG_1K", "EVALUATION_BENCHMARK_PROMPT_SET")
    assert spec["targets"][0] == {"label": "base"} and spec["targets"][1]["model_name"] == "quickstart"
    assert spec["vqa"]["transformers"]["model"]["source"] == "Salesforce/blip-vqa-base"
    settings = EvaluationSettings(hf_offline=True)
    resolved = resolve_backend(spec["vqa"], settings)
    assert resolved["transformers"]["device"] == {"device": "cuda", "precision": "PRECISION_FP16"}
    validate_placement(spec["placement"])
    assert spec["placement"]["launcher"] == "LAUNCHER_KIND_KUBERNETES" and spec["placement"]["gpus"] == 1
    if spec["benchmark"] == "EVALUATION_BENCHMARK_DSG_1K":
        assert len(load_dsg1k(spec["categories"], spec.get("max_prompts", 0))) == 100
    else:
        assert set(spec["metrics"]) == {"EVALUATION_METRIC_DSG", "EVALUATION_METRIC_TIFA"}
        search = spec["merge_search"]
        assert search["register_model_name"] and search["validation_prompt_set"]["id"]
        test_ids = {spec["prompt_set"]["id"], *(r["id"] for r in spec.get("prompt_sets", []))}
        val_ids = {search["validation_prompt_set"]["id"], *(r["id"] for r in search.get("validation_prompt_sets", []))}
        assert not test_ids & val_ids
        # the ids are what `selma prompts generate --key heldout/<skill>/<split>` publishes (see the file's comments)
        text = (EXAMPLES / name).read_text()
        for key in re.findall(r"--key (heldout/\S+)", text):
            assert new_artifact_id(ArtifactKind.PROMPT_SET, key) in text, key
        assert len(search_grid(search, settings.eval_max_trials)) == search["max_trials"]
