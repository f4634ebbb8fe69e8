"""The SkillSet: one declarative YAML file that describes a whole SELMA run.

```yaml
apiVersion: selma.dev/v1alpha1
kind: SkillSet
metadata: {name: quickstart}          # the run name (DNS label)
spec:
  skills:                             # built-in skills by name, or inline rules + seed examples
    - {name: counting, count: 8}
    - {name: my-skill, description: "...", rules: ["..."], seedExamples: ["a", "b", "c"], count: 8}
  prompts:  {backend: {embedded: {}}, rougeLThreshold: 0.8, seed: 0}
  render:   {model: {source: tiny://sd}, diffusion: {scheduler: ddim, steps: 10}, batchSize: 4}
  training: {config: {baseModel: {source: tiny://sd}, preset: tiny, maxSteps: 30}, placement: {launcher: local}}
  #           skills: {counting: {lora: {rank: 8}, learningRate: 2e-4}}   per-skill config fields over `config`
  merge:    {method: mean_delta, weights: {counting: 0.5}, modelName: quickstart}
  gate:     {vqa: {shapesworldJudge: {}}, threshold: 1.0, candidatesPerPrompt: 4, targetKept: 48}   # optional, a GateSettings
  evaluation: {...}                   # optional, an EvaluationSpec
```

With a ``gate:`` section, rendering is best-of-K: candidate rounds per skill, each scored by a gate
job (EvaluationService) until the target number of kept images or the candidate budget is reached;
training then uses the kept images.

The stage sections are the API's own messages in their JSON form (``RenderSettings``,
``ExpertTrainingConfig``, ``Placement``, ``LlmBackend``, ``EvaluationSpec``), so the file can
say everything the API can and stays in step with it.  Enum values may be written short
(``ddim``, ``mean_delta``, ``tiny``) or in full (``SCHEDULER_DDIM``).  Every error names the
field and the line it is on; nothing starts until the whole file is valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from selma import specs
from selma.api import enum_proto_name, enum_value
from selma.errors import InvalidArgument
from selma.specs import expert_weights, rouge_l_threshold
from selma.v1 import (
    common_pb2,
    evaluation_service_pb2,
    prompt_service_pb2,
    render_service_pb2,
    serving_service_pb2,
    training_service_pb2,
)

API_VERSION = "selma.dev/v1alpha1"
KIND = "SkillSet"
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SKILL_RE = re.compile(r"^[a-z0-9]([-_a-z0-9]{0,61}[a-z0-9])?$")


class SkillSetError(InvalidArgument):
    """A SkillSet that cannot be used; the message names the field path and line."""


@dataclass
class SkillEntry:
    """One skill of the run: built-in (``builtin``) or inline (``inline``), with its prompt count."""

    name: str
    count: int
    inline: prompt_service_pb2.Skill | None = None

    @property
    def builtin(self) -> bool:
        return self.inline is None


@dataclass
class SkillSet:
    """A validated SkillSet: the run name and one API message per stage."""

    name: str
    skills: list[SkillEntry]
    prompts: dict[str, Any]
    backend: common_pb2.LlmBackend | None
    render: render_service_pb2.RenderSettings
    training_config: training_service_pb2.ExpertTrainingConfig
    placement: common_pb2.Placement
    merge_method: int
    merge_weights: dict[str, float]
    merge_density: float
    merge_output_rank: int
    merge_fuse: bool
    model_name: str
    evaluation: evaluation_service_pb2.EvaluationSpec | None = None
    # spec.gate: best-of-K rendering with a VQA gate between render and training; None = train on every rendered image
    gate: evaluation_service_pb2.GateSettings | None = None
    # spec.render.shards / spec.render.placement: a sharded render (shard workers, each placed like a worker Job); 0 = the service default
    render_shards: int = 0
    render_placement: common_pb2.Placement | None = None
    # spec.training.distributed: nodes x processesPerNode trainer processes per expert (DistributedDataParallel); unset = one
    training_distributed: training_service_pb2.DistributedTraining | None = None
    # spec.training.skills: per-skill ExpertTrainingConfig fields laid over training_config
    training_overrides: dict[str, training_service_pb2.ExpertTrainingConfig] = field(default_factory=dict)
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def training_config_for(self, skill: str) -> training_service_pb2.ExpertTrainingConfig:
        """The skill's training config: ``spec.training.config`` with the skill's own fields laid over it."""
        config = training_service_pb2.ExpertTrainingConfig()
        config.CopyFrom(self.training_config)
        if skill in self.training_overrides:
            _overlay(config, self.training_overrides[skill])
        return config

    def prompt_spec(self, skill: SkillEntry, *, run: str | None = None) -> prompt_service_pb2.PromptGenerationSpec:
        spec = prompt_service_pb2.PromptGenerationSpec(run=run or self.name, count=skill.count)
        if skill.inline is not None:
            spec.skill.CopyFrom(skill.inline)
        else:
            spec.skill_name = skill.name
        p = self.prompts
        if "rougeLThreshold" in p:
            spec.rouge_l_threshold = float(p["rougeLThreshold"])
        if "seed" in p:
            spec.seed = int(p["seed"])
        for key, attr in (("examplesPerRequest", "examples_per_request"), ("promptsPerRequest", "prompts_per_request"), ("maxLlmRequests", "max_llm_requests")):
            if key in p:
                setattr(spec, attr, int(p[key]))
        if self.backend is not None:
            spec.backend.CopyFrom(self.backend)
        return spec


# ------------------------------------------------------------------------------------ loading


def load_skillset(path: str | Path) -> SkillSet:
    """Read and validate a SkillSet file; SkillSetError (INVALID_ARGUMENT) names field and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SkillSetError(f"SkillSet file {path} does not exist", field="skillset") from None
    return parse_skillset(text, source=str(path))


def parse_skillset(text: str, *, source: str = "<skillset>") -> SkillSet:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SkillSetError(f"{source}: not valid YAML: {e}") from None
    lines = _LineIndex(node, source)
    if not isinstance(data, dict):
        raise SkillSetError(f"{source}: a SkillSet is a YAML mapping with apiVersion, kind, metadata and spec")
    if data.get("apiVersion") != API_VERSION:
        raise lines.error(("apiVersion",), f"must be {API_VERSION!r}; got {data.get('apiVersion')!r}")
    if data.get("kind") != KIND:
        raise lines.error(("kind",), f"must be {KIND!r}; got {data.get('kind')!r}")
    _only(data, {"apiVersion", "kind", "metadata", "spec"}, (), lines)
    meta = data.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise lines.error(("metadata", "name"), "the run name must be a DNS label (lowercase letters, digits, '-', at most 63)")
    spec = data.get("spec")
    if not isinstance(spec, dict):
        raise lines.error(("spec",), "spec is required and must be a mapping")
    _only(spec, {"skills", "prompts", "render", "training", "merge", "gate", "evaluation"}, ("spec",), lines)

    skills = _skills(spec.get("skills"), lines)
    prompts = _mapping(spec.get("prompts", {}), ("spec", "prompts"), lines)
    _only(prompts, {"backend", "rougeLThreshold", "seed", "examplesPerRequest", "promptsPerRequest", "maxLlmRequests"}, ("spec", "prompts"), lines)
    if "rougeLThreshold" in prompts:
        _rule(lines, ("spec", "prompts", "rougeLThreshold"), rouge_l_threshold, prompts["rougeLThreshold"])
    for key in ("seed", "examplesPerRequest", "promptsPerRequest", "maxLlmRequests"):
        if key in prompts and (not isinstance(prompts[key], int) or prompts[key] < 0):
            raise lines.error(("spec", "prompts", key), f"must be a non-negative integer; got {prompts[key]!r}")
    backend = None
    if "backend" in prompts:
        backend = _proto(prompts["backend"], common_pb2.LlmBackend, ("spec", "prompts", "backend"), lines)

    training = _mapping(spec.get("training"), ("spec", "training"), lines, required=True)
    _only(training, {"config", "placement", "distributed", "skills"}, ("spec", "training"), lines)
    config = _proto(training.get("config"), training_service_pb2.ExpertTrainingConfig, ("spec", "training", "config"), lines, required=True)
    if not config.base_model.source:
        raise lines.error(("spec", "training", "config", "baseModel"), "baseModel.source is required (a hub id, a path, an s3:// prefix or tiny://sd)")
    placement = _proto(training.get("placement", {}), common_pb2.Placement, ("spec", "training", "placement"), lines)
    distributed = (_proto(training["distributed"], training_service_pb2.DistributedTraining, ("spec", "training", "distributed"), lines)
                   if "distributed" in training else None)  # absent: one process, whatever the pod's GPUs
    training_overrides: dict[str, training_service_pb2.ExpertTrainingConfig] = {}
    skill_names = {s.name for s in skills}
    for skill, section in _mapping(training.get("skills", {}), ("spec", "training", "skills"), lines).items():
        if skill not in skill_names:
            raise lines.error(("spec", "training", "skills", skill), f"no skill {skill!r} in spec.skills ({', '.join(sorted(skill_names))})")
        training_overrides[skill] = _proto(section, training_service_pb2.ExpertTrainingConfig, ("spec", "training", "skills", skill), lines, required=True)

    render_section = dict(_mapping(spec.get("render", {}), ("spec", "render"), lines))
    render_shards = render_section.pop("shards", 0)
    if isinstance(render_shards, bool) or not isinstance(render_shards, int) or not 0 <= render_shards <= 256:
        raise lines.error(("spec", "render", "shards"), f"must be a whole number of shard workers in 0..256 (0 = the service default); got {render_shards!r}")
    render_placement = _proto(render_section.pop("placement", {}), common_pb2.Placement, ("spec", "render", "placement"), lines)
    render = _proto(render_section, render_service_pb2.RenderSettings, ("spec", "render"), lines)
    if not render.model.source:
        render.model.CopyFrom(config.base_model)  # render with the model being fine-tuned unless told otherwise

    merge = _mapping(spec.get("merge", {}), ("spec", "merge"), lines)
    _only(merge, {"method", "weights", "density", "outputRank", "fuse", "modelName"}, ("spec", "merge"), lines)
    method = _enum_value(common_pb2.MergeMethod.DESCRIPTOR, merge.get("method", "mean_delta"), ("spec", "merge", "method"), lines)
    weights = _mapping(merge.get("weights", {}), ("spec", "merge", "weights"), lines)
    names = {s.name for s in skills}
    for skill, w in weights.items():
        if skill not in names:
            raise lines.error(("spec", "merge", "weights", skill), f"no skill {skill!r} in spec.skills ({', '.join(sorted(names))})")
        _rule(lines, ("spec", "merge", "weights", skill), lambda v, fld: expert_weights([v], fld), w)
    if weights:  # the service's rule: every expert has a weight or none has
        _rule(lines, ("spec", "merge", "weights"), expert_weights, [weights.get(s.name) for s in skills])
    model_name = merge.get("modelName", name)
    if not isinstance(model_name, str) or not _NAME_RE.match(model_name):
        raise lines.error(("spec", "merge", "modelName"), "must be a DNS label")
    density = _rule(lines, ("spec", "merge", "density"), specs.density, merge.get("density", 0.0))
    rank = merge.get("outputRank", 0)
    if not isinstance(rank, int) or rank < 0:
        raise lines.error(("spec", "merge", "outputRank"), f"must be a non-negative integer; got {rank!r}")

    gate = None
    if spec.get("gate") is not None:
        gate = _gate(spec["gate"], lines)

    evaluation = None
    if spec.get("evaluation") is not None:
        evaluation = _proto(spec["evaluation"], evaluation_service_pb2.EvaluationSpec, ("spec", "evaluation"), lines)

    return SkillSet(
        name=name,
        skills=skills,
        prompts=prompts,
        backend=backend,
        render=render,
        training_config=config,
        training_overrides=training_overrides,
        placement=placement,
        merge_method=method,
        merge_weights={k: float(v) for k, v in weights.items()},
        merge_density=float(density),
        merge_output_rank=rank,
        merge_fuse=bool(merge.get("fuse", False)),
        model_name=model_name,
        evaluation=evaluation,
        gate=gate,
        render_shards=render_shards,
        render_placement=render_placement,
        training_distributed=distributed,
        source=source,
        raw=data,
    )


def _gate(value: Any, lines: _LineIndex) -> evaluation_service_pb2.GateSettings:
    """``spec.gate``: a GateSettings, held to the gate service's own field rules (selma.specs)."""
    path = ("spec", "gate")
    msg = _proto(value, evaluation_service_pb2.GateSettings, path, lines, required=True)
    _rule(lines, (*path, "threshold"), specs.gate_threshold, msg.threshold if msg.HasField("threshold") else None)
    _rule(lines, (*path, "candidatesPerPrompt"), specs.candidates_per_prompt, msg.candidates_per_prompt)
    try:
        specs.gate_budget(msg.target_kept, msg.max_candidates, "")
    except InvalidArgument as e:
        raise lines.error((*path, "targetKept" if (e.field or "").endswith("target_kept") else "maxCandidates"), e.message) from None
    return msg


def _rule(lines: _LineIndex, path: tuple, rule: Any, value: Any) -> Any:
    """Apply one of the API's field rules (:mod:`selma.specs`), reporting a refusal at ``path`` with the rule's own message."""
    try:
        return rule(value, "")
    except InvalidArgument as e:
        raise lines.error(path, e.message) from None


def _skills(value: Any, lines: _LineIndex) -> list[SkillEntry]:
    path = ("spec", "skills")
    if not isinstance(value, list) or not value:
        raise lines.error(path, "give at least one skill (a built-in name or inline rules + seedExamples)")
    out: list[SkillEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        p = (*path, i)
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise lines.error(p, "a skill is a name or a mapping with name and count")
        _only(item, {"name", "count", "description", "rules", "seedExamples"}, p, lines)
        name = item.get("name")
        if not isinstance(name, str) or not _SKILL_RE.match(name):
            raise lines.error((*p, "name"), f"skill name must be lowercase letters, digits, '-' or '_' (at most 63); got {name!r}")
        if name in seen:
            raise lines.error((*p, "name"), f"skill {name!r} appears twice")
        seen.add(name)
        count = item.get("count", 100)
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise lines.error((*p, "count"), f"count must be a positive integer; got {count!r}")
        inline = None
        if any(k in item for k in ("description", "rules", "seedExamples")):
            rules = item.get("rules") or []
            seeds = item.get("seedExamples") or []
            if not isinstance(rules, list) or not rules or not all(isinstance(r, str) and r.strip() for r in rules):
                raise lines.error((*p, "rules"), "an inline skill needs a non-empty list of rules")
            if not isinstance(seeds, list) or len(seeds) < 3 or not all(isinstance(s, str) and s.strip() for s in seeds):
                raise lines.error((*p, "seedExamples"), f"an inline skill needs at least 3 seed examples; got {len(seeds) if isinstance(seeds, list) else seeds!r}")
            inline = prompt_service_pb2.Skill(name=name, description=str(item.get("description", "")), rules=rules, seed_examples=seeds)
        out.append(SkillEntry(name=name, count=count, inline=inline))
    return out


# ------------------------------------------------------------------------------- proto parsing


def _proto(value: Any, cls: type[Message], path: tuple, lines: _LineIndex, *, required: bool = False) -> Any:
    """Parse a section into an API message, accepting short enum names; errors name field + line."""
    if value is None:
        if required:
            raise lines.error(path, "is required")
        value = {}
    if not isinstance(value, dict):
        raise lines.error(path, f"must be a mapping (the JSON form of {cls.DESCRIPTOR.name})")
    normalized = _normalize(value, cls.DESCRIPTOR, path, lines)
    try:
        return json_format.ParseDict(normalized, cls())
    except json_format.ParseError as e:
        raise lines.error(path, f"{e}") from None


def _overlay(base: Message, over: Message) -> None:
    """Set every field ``over`` sets on ``base``: messages field by field, lists replaced (not appended, as MergeFrom would)."""
    for fd, value in over.ListFields():
        if fd.is_repeated:
            base.ClearField(fd.name)
            getattr(base, fd.name).extend(value)
        elif fd.message_type is not None:
            _overlay(getattr(base, fd.name), value)
        else:
            setattr(base, fd.name, value)


def _normalize(value: dict, desc: Descriptor, path: tuple, lines: _LineIndex) -> dict:
    out: dict[str, Any] = {}
    for key, v in value.items():
        fd = desc.fields_by_camelcase_name.get(key) or desc.fields_by_name.get(key)
        if fd is None:
            known = ", ".join(sorted(f.camelcase_name for f in desc.fields))
            raise lines.error((*path, key), f"unknown field {key!r} in {desc.name}; known fields: {known}")
        p = (*path, key)
        if fd.type == FieldDescriptor.TYPE_ENUM:
            if fd.is_repeated and isinstance(v, list):
                v = [desc_enum_name(fd, x, (*p, i), lines) for i, x in enumerate(v)]
            else:
                v = desc_enum_name(fd, v, p, lines)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry is False and fd.message_type.full_name.startswith("selma."):
            if fd.is_repeated and isinstance(v, list):
                v = [_normalize(x, fd.message_type, (*p, i), lines) if isinstance(x, dict) else x for i, x in enumerate(v)]
            elif isinstance(v, dict):
                v = _normalize(v, fd.message_type, p, lines)
        elif fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Duration" and isinstance(v, int | float):
            v = f"{v}s"  # durations may be written as plain seconds
        out[key] = v
    return out


def desc_enum_name(fd: FieldDescriptor, value: Any, path: tuple, lines: _LineIndex) -> str:
    """An enum field's value as proto JSON spells it (the API's one enum rule, selma.api.enum_proto_name)."""
    return _rule(lines, path, lambda v, fld: enum_proto_name(fd.enum_type, v, field=fld), value)


def _enum_value(enum_desc: Any, value: Any, path: tuple, lines: _LineIndex) -> int:
    return _rule(lines, path, lambda v, fld: enum_value(enum_desc, v, field=fld), value)


def _mapping(value: Any, path: tuple, lines: _LineIndex, *, required: bool = False) -> dict:
    if value is None:
        if required:
            raise lines.error(path, "is required")
        return {}
    if not isinstance(value, dict):
        raise lines.error(path, "must be a mapping")
    return value


def _only(mapping: dict, allowed: set[str], path: tuple, lines: _LineIndex) -> None:
    for key in mapping:
        if key not in allowed:
            raise lines.error((*path, key), f"unknown field {key!r}; expected one of: {', '.join(sorted(allowed))}")


# -------------------------------------------------------------------------------- line numbers


class _LineIndex:
    """Finds the line of a field path in the composed YAML node tree, for error messages."""

    def __init__(self, root: yaml.Node | None, source: str) -> None:
        self.root = root
        self.source = source

    def line(self, path: tuple) -> int | None:
        node = self.root
        best = node.start_mark.line + 1 if node is not None else None
        for part in path:
            nxt = None
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.value == part:
                        nxt = v if not isinstance(v, yaml.ScalarNode) or v.value != "" else k
                        best = k.start_mark.line + 1
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                nxt = node.value[part]
                best = nxt.start_mark.line + 1
            if nxt is None:
                break
            node = nxt
        return best

    def error(self, path: tuple, message: str) -> SkillSetError:
        dotted = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")
        line = self.line(path)
        where = f"{self.source}:{line}" if line else self.source
        return SkillSetError(f"{where}: {dotted}: {message}", field=dotted)


def merge_spec(skillset: SkillSet, expert_ids: dict[str, str]) -> common_pb2.MergeSpec:
    """The MergeSpec for the trained experts (skill → expert id), with the SkillSet's weights."""
    spec = common_pb2.MergeSpec(method=skillset.merge_method, density=skillset.merge_density, output_rank=skillset.merge_output_rank, fuse=skillset.merge_fuse)
    for s in skillset.skills:
        ew = spec.experts.add(expert_id=expert_ids[s.name])
        if skillset.merge_weights:
            ew.weight = skillset.merge_weights[s.name]
    return spec


def merge_job_spec(skillset: SkillSet, expert_ids: dict[str, str]) -> serving_service_pb2.MergeJobSpec:
    return serving_service_pb2.MergeJobSpec(run=skillset.name, model_name=skillset.model_name, merge=merge_spec(skillset, expert_ids), register=True, load=True, replace=True)
