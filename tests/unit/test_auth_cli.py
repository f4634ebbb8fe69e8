"""``selma auth token`` and how a client picks its token and CA: flags over SELMA_* over the stack's files."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from selma.app.cli import main
from selma.auth import TokenStore, token_digest
from selma.client import Endpoints, cli_security, read_token_file
from selma.errors import InvalidArgument
from selma.security import ClientSecurity


def test_auth_token_prints_a_fresh_token_once_and_an_entry_with_only_its_digest(tmp_path, capsys):
    tokens_file = tmp_path / "tokens.yaml"
    assert main(["auth", "token", "--name", "app-frontend", "--scopes", "generate,read", "--add-to", str(tokens_file)]) == 0
    out = capsys.readouterr().out
    tokens = re.findall(r"^(selma_\S+)$", out, re.M)
    assert len(tokens) == 1
    token = tokens[0]
    assert len(token) >= 40
    entry = yaml.safe_load(out[out.index("tokens:"):out.index("added to")])["tokens"][0]
    assert entry == {"name": "app-frontend", "sha256": token_digest(token), "scopes": ["generate", "read"]}
    assert token not in tokens_file.read_text()
    principal = TokenStore([tokens_file]).lookup(token)  # what a service reading the file makes of it
    assert principal is not None and principal.name == "app-frontend" and principal.scopes == {"generate", "read"}
    assert TokenStore([tokens_file]).lookup(token + "x") is None

    assert main(["auth", "token", "--name", "app-frontend", "--scopes", "read", "--add-to", str(tokens_file)]) == 2
    assert "already has a token named 'app-frontend'" in capsys.readouterr().err
    assert main(["auth", "token", "--name", "second", "--scopes", "run", "--add-to", str(tokens_file)]) == 0
    capsys.readouterr()
    assert [e["name"] for e in yaml.safe_load(tokens_file.read_text())["tokens"]] == ["app-frontend", "second"]
    again = main(["auth", "token", "--name", "x", "--scopes", "generate"])
    assert again == 0 and token not in capsys.readouterr().out  # every call mints a new one


def test_auth_token_refuses_unknown_scopes_naming_the_known_ones(capsys):
    assert main(["auth", "token", "--name", "x", "--scopes", "generate,root"]) == 2
    err = capsys.readouterr().err
    assert "root" in err and "generate, read, run, admin" in err


def test_a_tokens_file_that_is_not_digests_is_refused_at_start(tmp_path):
    bad = tmp_path / "tokens.yaml"
    bad.write_text(yaml.safe_dump({"tokens": [{"name": "a", "sha256": "selma_plaintext-token", "scopes": ["admin"]}]}))
    with pytest.raises(InvalidArgument) as e:
        TokenStore([bad])
    assert "64 hex digits" in str(e.value)


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"token": "", "ca_cert": "", "client_cert": "", "client_key": "", **kw})


def test_flags_win_over_the_environment_which_wins_over_the_stack_directory(tmp_path, monkeypatch):
    for name in ("SELMA_TOKEN", "SELMA_TOKEN_FILE", "SELMA_TLS_CA", "SELMA_TLS_CLIENT_CERT", "SELMA_TLS_CLIENT_KEY", "SELMA_TLS_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("from-dir\n")
    token_file.chmod(0o600)
    endpoints = Endpoints(serving="127.0.0.1:1", ca_cert=str(tmp_path / "ca.crt"), token_file=str(token_file))

    sec = cli_security(_args(), endpoints)
    assert sec.token == "from-dir" and sec.ca_cert == tmp_path / "ca.crt" and sec.tls
    monkeypatch.setenv("SELMA_TOKEN", "from-env")
    monkeypatch.setenv("SELMA_TLS_CA", str(tmp_path / "env-ca.crt"))
    sec = cli_security(_args(), endpoints)
    assert sec.token == "from-env" and sec.ca_cert == tmp_path / "env-ca.crt"
    sec = cli_security(_args(token="from-flag", ca_cert=str(tmp_path / "flag-ca.crt")), endpoints)
    assert sec.token == "from-flag" and sec.ca_cert == tmp_path / "flag-ca.crt"
    assert "from-flag" not in repr(sec)  # a security object never shows its token

    monkeypatch.delenv("SELMA_TOKEN")
    (tmp_path / "secret").write_text("mounted-secret\n")
    monkeypatch.setenv("SELMA_TOKEN_FILE", str(tmp_path / "secret"))
    assert ClientSecurity.from_settings().token == "mounted-secret"
    assert not ClientSecurity().tls and ClientSecurity(client_cert=Path("c"), client_key=Path("k")).tls


def test_a_stack_token_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text("t\n")
    path.chmod(0o644)
    with pytest.raises(InvalidArgument) as e:
        read_token_file(path)
    assert "chmod 600" in str(e.value)
    path.chmod(0o600)
    assert read_token_file(path) == "t"


def test_an_endpoints_file_keeps_the_ca_and_token_paths(tmp_path):
    path = tmp_path / "endpoints.json"
    Endpoints(serving="127.0.0.1:5", ca_cert="/x/ca.crt", token_file="/x/token").save(path)
    loaded = Endpoints.load(path)
    assert (loaded.ca_cert, loaded.token_file) == ("/x/ca.crt", "/x/token")
