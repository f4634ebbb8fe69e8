"""#23 item 8: one CLI grammar. One expert-weight syntax everywhere, --json and --plain on every
listing and status command, one way to name the store, hints that name CLI commands, artifacts with
their aliases and digests, and docs/cli.md rendered from the parser (stale = this test fails)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from selma.app.cli import build_parser, main
from selma.app.cli_docs import render
from selma.artifacts import ArtifactKind, ArtifactStore
from selma.cli_options import parse_expert_weights
from selma.storage import FileStorage
from selma_evaluation.commands import parse_target

REPO = Path(__file__).resolve().parents[2]

# Every command that lists or shows something.
LISTING_COMMANDS = [
    ("runs",), ("status",), ("lineage",), ("artifacts", "list"), ("artifacts", "show"), ("artifacts", "lineage"),
    ("models", "list"), ("models", "list-tiny"), ("experts", "list"), ("prompts", "skills"),
    ("eval", "run"), ("eval", "status"), ("eval", "list"), ("generate",),
]


def _subparser(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


@pytest.mark.parametrize("path", LISTING_COMMANDS, ids=" ".join)
def test_every_listing_and_status_command_takes_json_and_plain(path):
    assert {"--json", "--plain"} <= _options(_subparser(build_parser(), path)), f"selma {' '.join(path)}"


def test_commands_that_read_the_store_name_it_alike():
    parser = build_parser()
    for path in [("artifacts", "list"), ("artifacts", "show"), ("artifacts", "lineage"), ("eval", "report")]:
        assert {"--storage", "--dir"} <= _options(_subparser(parser, path)), f"selma {' '.join(path)}"


def test_one_expert_weight_syntax_for_generate_and_eval():
    assert parse_expert_weights("quickstart/counting=0.7,expert-abc=0.3") == [("quickstart/counting", 0.7), ("expert-abc", 0.3)]
    target = parse_target("mix=experts:quickstart/counting=0.7,expert-abc=0.3")
    assert target["experts"]["experts"] == [{"expert_id": "quickstart/counting", "weight": 0.7}, {"expert_id": "expert-abc", "weight": 0.3}]
    assert parse_target("even=experts:a,b")["experts"]["experts"] == [{"expert_id": "a"}, {"expert_id": "b"}]


@pytest.mark.parametrize("argv", [
    ["generate", "a cat", "--experts", "expert-a:0.5,expert-b:0.5"],
    ["eval", "run", "--target", "mix=experts:expert-a:0.5,expert-b:0.5"],
    ["generate", "a cat", "--experts", "expert-a=x"],
])
def test_another_expert_weight_syntax_is_refused_showing_the_right_one(argv, tmp_path, capsys):
    assert main([*argv, "--endpoints", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "ID=WEIGHT" in err and "quickstart/counting=0.7" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def store_dir(tmp_path):
    store = ArtifactStore(FileStorage(tmp_path / "stack" / "storage"))
    with store.writer(ArtifactKind.PROMPT_SET, key="p") as w:
        w.put_bytes("prompts.jsonl", b"{}\n")
    manifest = store.list()[0]
    store.set_alias("current-prompts", manifest.id)
    return tmp_path / "stack", manifest


def test_artifacts_list_has_alias_and_digest_columns_and_takes_dir(store_dir, capsys):
    stack, manifest = store_dir
    assert main(["artifacts", "list", "--dir", str(stack), "--plain"]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    cells = dict(zip(header.split("\t"), row.split("\t"), strict=True))
    assert cells["id"] == manifest.id and cells["alias"] == "current-prompts" and manifest.digest.startswith(cells["digest"])
    assert main(["artifacts", "list", "--storage", (stack / "storage").as_uri(), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["digest"] == manifest.digest and listed[0]["aliases"] == ["current-prompts"]


def test_artifacts_show_prints_json_only_when_asked(store_dir, capsys):
    stack, manifest = store_dir
    assert main(["artifacts", "show", "current-prompts", "--dir", str(stack)]) == 0
    out = capsys.readouterr().out
    assert manifest.id in out and "digest" in out and not out.lstrip().startswith("{")
    assert main(["artifacts", "show", "current-prompts", "--dir", str(stack), "--plain"]) == 0
    assert f"digest\t{manifest.digest}" in capsys.readouterr().out
    assert main(["artifacts", "show", "current-prompts", "--dir", str(stack), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == manifest.id


def test_hints_name_cli_commands_that_exist(tmp_path):
    from selma.errors import NotFound
    from selma_serving.lora import resolve_expert

    store = ArtifactStore(FileStorage(tmp_path / "storage"))
    for ref in ("quickstart/nosuch", "expert-nosuch"):
        with pytest.raises(NotFound) as e:
            resolve_expert(store, ref)
        assert "`selma experts list`" in str(e.value)
    parser = build_parser()
    _subparser(parser, ("experts", "list"))  # the commands the hints name exist
    _subparser(parser, ("models", "list"))


def test_docs_cli_md_is_the_parser_rendered():
    current = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == render(build_parser()), "docs/cli.md is stale: run `make cli-docs` and commit it"
