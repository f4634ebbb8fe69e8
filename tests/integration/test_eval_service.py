"""Evaluation end to end through real servers: TrainingService launches `selma eval execute`
(a local subprocess), which renders through a real ServingService on the tiny SD model, answers
with the tiny VQA model, scores and publishes the eval_report artifact."""

from __future__ import annotations

import io
import json

import grpc
import pytest
from PIL import Image

from selma.artifacts import ArtifactKind, ArtifactStore, new_artifact_id
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import evaluation_service_pb2 as pb
from selma.v1 import serving_service_pb2 as spb
from selma_evaluation.runner import item_seed

pytestmark = pytest.mark.slow

DIFFUSION = common_pb2.DiffusionSettings(steps=2, width=64, height=64)


@pytest.fixture(scope="module")
def stack(eval_stack):
    return eval_stack


def publish_prompt_set(store: ArtifactStore, name: str, skill: str, prompts: list[str], *, questions: bool = True) -> str:
    lines = []
    for i, text in enumerate(prompts):
        rec = {"id": f"p{i:06d}", "index": i, "text": text, "skill": skill}
        if questions:
            noun = text.split()[-1]
            rec["questions"] = [
                {"id": "1", "text": f"Is there a {noun}?", "category": "entity"},
                {"id": "2", "text": f"Is the {noun} red?", "parents": ["1"], "category": "attribute"},
                {"id": "3", "text": f"What colour is the {noun}?", "choices": ["red", "blue", "green"], "answer": "red", "category": "attribute"},
            ]
        lines.append(json.dumps(rec))
    pid = new_artifact_id(ArtifactKind.PROMPT_SET, name)
    with store.writer(ArtifactKind.PROMPT_SET, id=pid, parameters={"skill": skill, "count": len(prompts)},
                      labels={"selma.dev/skill": skill}) as w:
        w.put_bytes("prompts.jsonl", ("\n".join(lines) + "\n").encode())
    return pid


def watch(stub, job_id: str, timeout: float = 300):
    req = pb.WatchEvaluationRequest(job_id=job_id)
    req.min_interval.FromMilliseconds(200)
    last = None
    for update in stub.WatchEvaluation(req, timeout=timeout):
        last = update.job
    return last


def start(stub, key: str, spec: pb.EvaluationSpec, **kw):
    return stub.StartEvaluation(pb.StartEvaluationRequest(idempotency_key=key, spec=spec, **kw))


def test_dsg1k_subset_base_vs_expert_mix_publishes_a_report_with_identical_seeds(stack):
    stub, store, experts = stack["stub"], stack["store"], stack["experts"]
    mix = common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id=e.id, weight=0.5) for e in experts])
    spec = pb.EvaluationSpec(
        benchmark=pb.EVALUATION_BENCHMARK_DSG_1K, categories=["countbench"], max_prompts=3, diffusion=DIFFUSION, base_seed=7,
        targets=[pb.EvaluationTarget(label="base"), pb.EvaluationTarget(label="mix", experts=mix)],
        vqa=pb.VqaBackend(tiny_test=pb.TinyTestVqaBackend(seed=1)),
    )
    resp = start(stub, "t/dsg", spec)
    assert resp.created
    assert not start(stub, "t/dsg", spec).created  # same key: the same job
    job = watch(stub, resp.job.status.job_id)
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    st = job.stats
    assert st.images_rendered == st.images_total == 6
    assert st.questions_answered == st.questions_total > 0
    assert st.launcher == common_pb2.LAUNCHER_KIND_LOCAL
    overall = {(s.target_label, s.metric): s for s in st.scores if not s.category}
    assert set(overall) == {("base", pb.EVALUATION_METRIC_DSG), ("mix", pb.EVALUATION_METRIC_DSG)}
    assert all(s.prompt_count == 3 and 0 <= s.score_percent <= 100 for s in overall.values())
    assert {s.category for s in st.scores if s.category} == {"countbench"}

    report = store.get(job.status.output.id)
    assert report.kind == ArtifactKind.EVAL_REPORT.value
    paths = {f.path for f in report.files}
    assert {"report.json", "tables.md", "index.html", "charts/overall.png", "charts/dsg_by_category.png", "charts/dsg_delta.png"} <= paths
    assert st.report_html_uri == report.file_uri("index.html")
    data = json.loads(store.read_bytes(report, "report.json"))
    assert "base" in json.dumps(data) and "mix" in json.dumps(data)
    html = store.read_bytes(report, "index.html").decode()
    base_imgs = sorted(p for p in paths if p.startswith("images/base/"))
    mix_imgs = sorted(p for p in paths if p.startswith("images/mix/"))
    assert len(base_imgs) == len(mix_imgs) == 3
    assert all(p in html for p in base_imgs + mix_imgs)
    Image.open(io.BytesIO(store.read_bytes(report, "charts/overall.png"))).verify()

    # The base image of an item is exactly what ServingService renders with the item's seed.
    item_id = "countbench_" + base_imgs[0].split("countbench_")[1].split("-")[0]
    from selma_evaluation.dsg import load_dsg1k

    prompt = next(i.prompt for i in load_dsg1k(["countbench"], 3) if i.id == item_id)
    direct = list(stack["serving"].Generate(spb.GenerateRequest(prompts=[prompt], diffusion=DIFFUSION, seed=item_seed(7, item_id),
                                                                seed_policy=common_pb2.SEED_POLICY_SEQUENTIAL)))
    assert direct[0].image.png == store.read_bytes(report, base_imgs[0])
    mix_png = store.read_bytes(report, f"images/mix/{base_imgs[0].split('/')[-1]}")
    assert mix_png != direct[0].image.png  # the experts change the picture

    # Listing finds it; a second start of the finished job returns it unchanged.
    listed = stub.ListEvaluations(pb.ListEvaluationsRequest()).jobs
    assert job.status.job_id in {j.status.job_id for j in listed}


def test_prompt_set_with_tifa_and_merge_search_registers_the_best_merge(stack):
    stub, store, experts = stack["stub"], stack["store"], stack["experts"]
    test_set = publish_prompt_set(store, "test-set", "colour", ["a red apple", "a red car", "a red ball"])
    val_set = publish_prompt_set(store, "val-set", "colour", ["a red kite", "a red boat"])
    search = pb.MergeSearchSettings(expert_ids=[e.id for e in experts], weight_values=[0.5, 1.0], register_model_name="eval-best",
                                    validation_prompt_set=common_pb2.ArtifactRef(id=val_set))
    spec = pb.EvaluationSpec(
        benchmark=pb.EVALUATION_BENCHMARK_PROMPT_SET, prompt_set=common_pb2.ArtifactRef(id=test_set), diffusion=DIFFUSION,
        targets=[pb.EvaluationTarget(label="base")], metrics=[pb.EVALUATION_METRIC_DSG, pb.EVALUATION_METRIC_TIFA],
        vqa=pb.VqaBackend(tiny_test=pb.TinyTestVqaBackend(seed=3)), merge_search=search,
    )
    job = watch(stub, start(stub, "t/search", spec).job.status.job_id)
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    st = job.stats
    assert len(st.trials) == 4  # weights {0.5, 1.0}² over two experts
    scores = [t.validation_score_percent for t in st.trials]
    best = max(range(4), key=lambda i: (scores[i], -i))
    assert st.best_merge == st.trials[best].merge
    assert st.registered_model_name == "eval-best"
    models = {m.model_name for m in stack["serving"].ListModels(spb.ListModelsRequest()).models}
    assert "eval-best" in models
    labels = {s.target_label for s in st.scores}
    assert labels == {"base", "search-best"}
    metrics = {s.metric for s in st.scores}
    assert metrics == {pb.EVALUATION_METRIC_DSG, pb.EVALUATION_METRIC_TIFA}
    per_skill = [s for s in st.scores if s.skill]
    assert per_skill and {s.skill for s in per_skill} == {"colour"}
    report = store.get(job.status.output.id)
    paths = {f.path for f in report.files}
    assert "charts/search.png" in paths and "charts/tifa_by_category.png" in paths
    assert "search" in store.read_bytes(report, "tables.md").decode().lower()
    assert set(report.parents) == {test_set, val_set}


@pytest.mark.parametrize(
    "mutate, code, needle",
    [
        (lambda s, _: s.ClearField("benchmark"), grpc.StatusCode.INVALID_ARGUMENT, "benchmark"),
        (lambda s, _: s.categories.append("nosuchcategory"), grpc.StatusCode.INVALID_ARGUMENT, "nosuchcategory"),
        (lambda s, _: s.metrics.append(pb.EVALUATION_METRIC_TIFA), grpc.StatusCode.INVALID_ARGUMENT, "TIFA"),
        (lambda s, _: s.targets.add(label="base"), grpc.StatusCode.INVALID_ARGUMENT, "twice"),
        # a path the service may read (its own file:// storage root) that holds no model; any other path is not the client's to name
        (lambda s, st: s.vqa.transformers.model.CopyFrom(common_pb2.ModelRef(source=str(st["root"] / "storage" / "no-vqa-model"))),
         grpc.StatusCode.NOT_FOUND, "vqa"),
        (lambda s, _: s.vqa.transformers.model.CopyFrom(common_pb2.ModelRef(source="/nonexistent/vqa-model")), grpc.StatusCode.PERMISSION_DENIED,
         "SELMA_MODEL_ALLOWED_DIRS"),
        (lambda s, _: s.vqa.transformers.model.CopyFrom(common_pb2.ModelRef(source="nobody/not-a-cached-model")), grpc.StatusCode.NOT_FOUND, "cache"),
        (lambda s, _: setattr(s, "images_per_prompt", 99), grpc.StatusCode.INVALID_ARGUMENT, "images_per_prompt"),
        (lambda s, _: s.targets.add(label="loud", experts=common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id="expert-x", weight=1e30)])),
         grpc.StatusCode.INVALID_ARGUMENT, "SELMA_EVAL_MAX_MERGE_WEIGHT=100"),
    ],
)
def test_bad_specs_are_refused_before_anything_starts(stack, mutate, code, needle):
    spec = pb.EvaluationSpec(benchmark=pb.EVALUATION_BENCHMARK_DSG_1K, max_prompts=2, targets=[pb.EvaluationTarget(label="base")],
                             vqa=pb.VqaBackend(tiny_test=pb.TinyTestVqaBackend()))
    mutate(spec, stack)
    with pytest.raises(grpc.RpcError) as e:
        start(stack["stub"], f"bad/{needle}", spec)
    assert e.value.code() == code
    assert needle.lower() in e.value.details().lower()


def test_search_refuses_validation_prompts_that_are_test_prompts_and_oversized_grids(stack):
    stub, store, experts = stack["stub"], stack["store"], stack["experts"]
    test_set = publish_prompt_set(store, "overlap-test", "colour", ["a red apple", "a blue cup"])
    val_set = publish_prompt_set(store, "overlap-val", "colour", ["A red apple.", "a green tree"])
    spec = pb.EvaluationSpec(benchmark=pb.EVALUATION_BENCHMARK_PROMPT_SET, prompt_set=common_pb2.ArtifactRef(id=test_set),
                             targets=[pb.EvaluationTarget(label="base")], vqa=pb.VqaBackend(tiny_test=pb.TinyTestVqaBackend()),
                             merge_search=pb.MergeSearchSettings(expert_ids=[e.id for e in experts],
                                                                 validation_prompt_set=common_pb2.ArtifactRef(id=val_set)))
    with pytest.raises(grpc.RpcError) as e:
        start(stub, "bad/overlap", spec)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "overlap" in e.value.details()

    clean_val = publish_prompt_set(store, "clean-val", "colour", ["a green tree"])
    spec.merge_search.validation_prompt_set.id = clean_val
    spec.merge_search.weight_values.extend([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    with pytest.raises(grpc.RpcError) as e:
        start(stub, "bad/grid", spec)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_trials" in e.value.details()
    spec.merge_search.strategy = pb.MERGE_SEARCH_STRATEGY_RANDOM
    spec.merge_search.max_trials = 3
    ok = stub.StartEvaluation(pb.StartEvaluationRequest(idempotency_key="ok/random", spec=spec, validate_only=True))
    assert not ok.job.status.job_id

    spec.prompt_set.id = "prompt-set-doesnotexist"
    with pytest.raises(grpc.RpcError) as e:
        start(stub, "bad/missing", spec)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:  # an unknown job id is NOT_FOUND
        stub.GetEvaluation(pb.GetEvaluationRequest(job_id="evaluation-0123456789abcdef"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_interrupted_evaluation_resumes_without_redoing_work_and_publishes_the_same_report(stack):
    from selma.api import message_to_dict
    from selma_evaluation.runner import EvaluationInterrupted, EvaluationJobDoc, EvaluationRunner, ServingRenderer

    settings, store, experts = stack["settings"], stack["store"], stack["experts"]
    mix = common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id=e.id, weight=1.0) for e in experts])
    spec = message_to_dict(pb.EvaluationSpec(
        benchmark=pb.EVALUATION_BENCHMARK_DSG_1K, categories=["whoops"], max_prompts=3, diffusion=DIFFUSION, labels={"title": "resume"},
        targets=[pb.EvaluationTarget(label="base"), pb.EvaluationTarget(label="mix", experts=mix)]))
    renders: list[str] = []

    class Counting(ServingRenderer):
        def render(self, target, prompt, seed, images, diffusion, should_stop):
            renders.append(target.label)
            return super().render(target, prompt, seed, images, diffusion, should_stop)

    def doc(name: str) -> EvaluationJobDoc:
        return EvaluationJobDoc(job_id=name, idempotency_key=name, spec=spec, report_id=f"eval-report-{name}", work_prefix=f"evaluation/{name}",
                                serving_endpoint=stack["training"].evaluation.serving_endpoint(), vqa={"tiny_test": {"seed": "5"}}, metrics=["dsg"])

    def run(d: EvaluationJobDoc, should_stop=lambda: False) -> dict:
        runner = EvaluationRunner(d, settings, renderer=Counting(d.serving_endpoint), should_stop=should_stop)
        try:
            return runner.run()
        finally:
            runner.close()

    resumed = doc("resumed")
    with pytest.raises(EvaluationInterrupted):
        run(resumed, should_stop=lambda: len(renders) >= 2)  # killed while rendering
    assert renders == ["base", "base"]
    answered = "evaluation/resumed/images/answers/base/part-000000.json"
    storage = open_storage(settings)
    with pytest.raises(EvaluationInterrupted):
        run(resumed, should_stop=lambda: storage.exists(answered))  # killed while answering
    assert renders == ["base"] * 3  # only the missing image was rendered
    manifest = run(resumed)
    assert renders == ["base"] * 3 + ["mix"] * 3  # nothing rendered twice
    renders.clear()
    reference = run(doc("uninterrupted"))
    assert len(renders) == 6
    a, b = store.get(manifest["id"]), store.get(reference["id"])
    for path in ("report.json", "tables.md", "verdicts.jsonl"):
        assert store.read_bytes(a, path) == store.read_bytes(b, path), path
    assert {f.path: f.sha256 for f in a.files if f.path.startswith("images/")} == {f.path: f.sha256 for f in b.files if f.path.startswith("images/")}


def test_questions_for_prompts_without_any_are_written_by_the_llm_and_asked_once(stack, llm):
    import re

    from selma_prompts.fake_llm import openai_answer

    def respond(path, body):
        text = body.get("prompt") or "\n".join(m.get("content", "") for m in body.get("messages", []))
        task = text.split("Now you:")[-1]
        noun = re.search(r"Description: (.+)", task).group(1).strip().split()[-1]
        if "Dependencies:" in task:
            out = "1. 0\n2. 1\n"
        elif "Yes/no questions:" in task:
            out = f"1. Is there a {noun}?\n2. Is the {noun} red?\n"
        elif "Multiple-choice questions:" in task:
            out = f"1. Is there a {noun}? | yes; no | yes\n2. What color is the {noun}? | red; green; blue | red\n"
        else:
            out = f"1. entity | {noun}\n2. attribute (color) | the {noun} is red\n"
        if "prompt" in body:
            out = out.split("1.", 1)[1]
        return 200, openai_answer(path, out)

    llm.responder = respond
    store = stack["store"]
    test_set = publish_prompt_set(store, "llm-questions", "colour", ["a red kettle", "a red tram"], questions=False)
    backend = {"openai_compatible": {"base_url": llm.base_url, "model": "fake", "api": "OPEN_AI_API_CHAT_COMPLETIONS", "max_retries": 0}}
    spec = pb.EvaluationSpec(benchmark=pb.EVALUATION_BENCHMARK_PROMPT_SET, prompt_set=common_pb2.ArtifactRef(id=test_set), diffusion=DIFFUSION,
                             targets=[pb.EvaluationTarget(label="base")], metrics=[pb.EVALUATION_METRIC_DSG, pb.EVALUATION_METRIC_TIFA],
                             vqa=pb.VqaBackend(tiny_test=pb.TinyTestVqaBackend(seed=9)))
    from selma.api import dict_to_message

    spec.question_backend.CopyFrom(dict_to_message(backend, common_pb2.LlmBackend))
    job = watch(stack["stub"], start(stack["stub"], "t/llm-questions", spec).job.status.job_id)
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    asked = len(llm.requests)
    assert asked >= 2 * 4  # four steps per prompt
    overall = {s.metric: s for s in job.stats.scores if not s.skill and not s.category}
    assert overall[pb.EVALUATION_METRIC_DSG].question_count == 4 and overall[pb.EVALUATION_METRIC_TIFA].question_count == 4
    items = json.loads(open_storage(stack["settings"]).get_bytes(f"evaluation/{job.status.job_id}/items.json"))
    assert [q["text"] for q in items[0]["questions"][:2]] == ["Is there a kettle?", "Is the kettle red?"]
    assert items[0]["questions"][1]["parents"] == ["1"]
    # the restarted (already finished) job asks the LLM nothing again
    again = watch(stack["stub"], start(stack["stub"], "t/llm-questions", spec).job.status.job_id)
    assert again.status.phase == common_pb2.JOB_PHASE_SUCCEEDED and len(llm.requests) == asked


def test_a_question_endpoint_the_service_may_not_call_is_refused_before_any_job(stack):
    """By default (SELMA_LLM_ALLOW_ANY_BASE_URL off) a caller cannot point the service at an address of its choosing."""
    core = stack["training"].evaluation
    permissive = core.settings
    core.settings = permissive.model_copy(update={"llm_allow_any_base_url": False})
    try:
        test_set = publish_prompt_set(stack["store"], "ssrf-questions", "colour", ["a red kettle"], questions=False)
        spec = pb.EvaluationSpec(benchmark=pb.EVALUATION_BENCHMARK_PROMPT_SET, prompt_set=common_pb2.ArtifactRef(id=test_set),
                                 diffusion=DIFFUSION, targets=[pb.EvaluationTarget(label="base")],
                                 vqa=pb.VqaBackend(tiny_test=pb.TinyTestVqaBackend()))
        spec.question_backend.openai_compatible.base_url = "http://169.254.169.254/latest/v1"
        spec.question_backend.openai_compatible.model = "m"
        with pytest.raises(grpc.RpcError) as e:
            start(stack["stub"], "t/ssrf-questions", spec)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "spec.question_backend.openai_compatible.base_url" in e.value.details()
        assert "SELMA_LLM_ALLOWED_BASE_URLS" in e.value.details()
        listed = stack["stub"].ListEvaluations(pb.ListEvaluationsRequest())
        assert all(j.status.idempotency_key != "t/ssrf-questions" for j in listed.jobs)
    finally:
        core.settings = permissive


def test_two_prompt_sets_of_one_skill_keep_all_their_prompts(stack):
    store = stack["store"]
    first = publish_prompt_set(store, "same-skill-1", "colour", ["a red plum", "a red sock"])
    second = publish_prompt_set(store, "same-skill-2", "colour", ["a red fox", "a red bus"])  # ids p000000, p000001 again
    spec = pb.EvaluationSpec(benchmark=pb.EVALUATION_BENCHMARK_PROMPT_SET, prompt_set=common_pb2.ArtifactRef(id=first),
                             prompt_sets=[common_pb2.ArtifactRef(id=second)], diffusion=DIFFUSION,
                             targets=[pb.EvaluationTarget(label="base")], vqa=pb.VqaBackend(tiny_test=pb.TinyTestVqaBackend()))
    job = watch(stack["stub"], start(stack["stub"], "t/two-sets", spec).job.status.job_id)
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    assert job.stats.images_rendered == 4
    items = json.loads(open_storage(stack["settings"]).get_bytes(f"evaluation/{job.status.job_id}/items.json"))
    assert sorted(i["prompt"] for i in items) == ["a red bus", "a red fox", "a red plum", "a red sock"]
    assert len({i["id"] for i in items}) == 4


def test_cancel_stops_the_worker_and_a_restart_resumes_its_stored_work(stack):
    stub = stack["stub"]
    spec = pb.EvaluationSpec(benchmark=pb.EVALUATION_BENCHMARK_DSG_1K, categories=["vrd"], max_prompts=12, diffusion=DIFFUSION,
                             targets=[pb.EvaluationTarget(label="base")], vqa=pb.VqaBackend(tiny_test=pb.TinyTestVqaBackend()))
    job_id = start(stub, "t/cancel", spec).job.status.job_id
    req = pb.WatchEvaluationRequest(job_id=job_id)
    req.min_interval.FromMilliseconds(100)
    for update in stub.WatchEvaluation(req, timeout=300):
        if update.job.stats.images_rendered >= 2:
            break
    cancelled = stub.CancelEvaluation(pb.CancelEvaluationRequest(job_id=job_id, reason="test")).job
    job = watch(stub, job_id)
    assert job.status.phase == common_pb2.JOB_PHASE_CANCELLED, (cancelled.status.phase, job.status.message)
    storage = open_storage(stack["settings"])
    kept = [o.key for o in storage.list(f"evaluation/{job_id}/images/base/")]
    assert 2 <= len(kept) < 12  # the worker stopped early and its images are kept
    stamps = {k: storage.stat(k).modified for k in kept}
    job = watch(stub, start(stub, "t/cancel", spec).job.status.job_id)
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    assert job.stats.images_rendered == 12
    assert all(storage.stat(k).modified == t for k, t in stamps.items())  # nothing rendered twice
