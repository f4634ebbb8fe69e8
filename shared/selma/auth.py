"""Authentication and scoped authorization of every gRPC call: bearer tokens, optional JWTs, one table.

A caller sends ``authorization: Bearer <token>``.  The token is either an opaque selma token
(``selma auth token`` mints one; the tokens files hold only its sha256, compared in constant time)
or, when a JWKS file is configured, a JWT from the cluster's identity provider (issuer, audience,
expiry and signature checked with PyJWT; scopes from ``scope``/``scp``, name from ``sub``).

What a token may do is :data:`METHOD_SCOPES`: the scope every RPC needs, by full method name.  A
method missing from the table is refused (fail closed), and the tests enumerate every RPC of the
API from its descriptors so a new RPC cannot ship without an entry.  ``admin`` implies every scope.
No token or a token that does not verify is UNAUTHENTICATED; a token without the scope is
PERMISSION_DENIED naming the scope.  Each call is logged with the token's name (never the token),
the method and the outcome, and counted in ``selma_grpc_server_auth_total``.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from selma.config import SelmaSettings
from selma.errors import InvalidArgument, PermissionDenied, SelmaError, Unauthenticated
from selma.metrics import AUTH_CALLS

log = logging.getLogger(__name__)

GENERATE, READ, RUN, ADMIN = "generate", "read", "run", "admin"
SCOPES = (GENERATE, READ, RUN, ADMIN)


def _job_rpcs(service: str, start: str, get: str, watch: str, cancel: str, list_: str) -> dict[str, str]:
    p = f"/selma.v1.{service}/"
    return {p + start: RUN, p + cancel: RUN, p + get: READ, p + watch: READ, p + list_: READ}


# The scope each RPC needs.  generate: inference clients; read: Get/Watch/List of jobs, lineage,
# export, catalogues; run: start/cancel jobs and compute-spending previews; admin: the served models.
METHOD_SCOPES: dict[str, str] = {
    **_job_rpcs("PromptService", "StartPromptGeneration", "GetPromptGeneration", "WatchPromptGeneration",
                "CancelPromptGeneration", "ListPromptGenerations"),
    "/selma.v1.PromptService/ListSkills": READ,
    "/selma.v1.PromptService/PreviewPrompts": RUN,
    **_job_rpcs("RenderService", "StartDatasetRender", "GetDatasetRender", "WatchDatasetRender", "CancelDatasetRender",
                "ListDatasetRenders"),
    "/selma.v1.RenderService/Preview": RUN,
    **_job_rpcs("TrainingService", "StartExpertTraining", "GetExpertTraining", "WatchExpertTraining",
                "CancelExpertTraining", "ListExpertTrainings"),
    "/selma.v1.TrainingService/ListTrainingPresets": READ,
    **_job_rpcs("ServingService", "StartMerge", "GetMerge", "WatchMerge", "CancelMerge", "ListMerges"),
    "/selma.v1.ServingService/Generate": GENERATE,
    "/selma.v1.ServingService/ListModels": GENERATE,
    "/selma.v1.ServingService/ListExperts": GENERATE,
    "/selma.v1.ServingService/RegisterModel": ADMIN,
    "/selma.v1.ServingService/LoadModel": ADMIN,
    "/selma.v1.ServingService/UnloadModel": ADMIN,
    "/selma.v1.ServingService/DeleteModel": ADMIN,
    "/selma.v1.ServingService/DeleteRun": ADMIN,
    "/selma.v1.ServingService/CollectGarbage": ADMIN,
    "/selma.v1.ServingService/ExportAdapter": READ,
    "/selma.v1.ServingService/GetLineage": READ,
    **_job_rpcs("EvaluationService", "StartEvaluation", "GetEvaluation", "WatchEvaluation", "CancelEvaluation",
                "ListEvaluations"),
    **_job_rpcs("EvaluationService", "StartGate", "GetGate", "WatchGate", "CancelGate", "ListGates"),
}

# Services that answer without a token while ``auth_open_health`` (probes, grpcurl's listing).
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

TOKEN_PREFIX = "selma_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:/-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def token_digest(token: str) -> str:
    """The hex sha256 a tokens file stores for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_scopes(text: str | Iterable[str], *, field: str = "scopes") -> tuple[str, ...]:
    """Scope names from ``generate,read`` (or a list); unknown names are InvalidArgument listing the known ones."""
    items = [s.strip() for s in (text.replace(" ", ",").split(",") if isinstance(text, str) else text) if s and s.strip()]
    unknown = [s for s in items if s not in SCOPES]
    if unknown or not items:
        raise InvalidArgument(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(unknown) or 'none'}", field=field)
    return tuple(dict.fromkeys(items))


def mint_token() -> str:
    """A fresh random bearer token (256 bits from :mod:`secrets`)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_entry(name: str, token: str, scopes: Iterable[str]) -> dict[str, Any]:
    """The tokens-file entry for ``token``: its name, sha256 and scopes (never the token)."""
    if not _NAME.match(name):
        raise InvalidArgument(f"a token name is 1..128 letters, digits or . _ @ : / -, starting with a letter or digit; got {name!r}",
                              field="name")
    return {"name": name, "sha256": token_digest(token), "scopes": list(parse_scopes(list(scopes)))}


def add_token_entry(path: str | Path, entry: Mapping[str, Any]) -> None:
    """Add ``entry`` (from :func:`token_entry`) to a tokens file, creating it; a name already there is refused.

    The file is replaced atomically, so a service re-reading it never sees half of it.
    """
    path = Path(path)
    data: dict[str, Any] = {"tokens": []}
    if path.exists():
        _parse_tokens_file(path)  # refuse to extend a file the services could not read
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        data = loaded if isinstance(loaded, dict) else data
        data.setdefault("tokens", [])
    if any(isinstance(e, dict) and e.get("name") == entry["name"] for e in data["tokens"]):
        raise InvalidArgument(f"{path} already has a token named {entry['name']!r}; pick another name or remove that entry",
                              field="name")
    data["tokens"].append(dict(entry))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tmp.replace(path)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's (or JWT subject's) name and its scopes."""

    name: str
    scopes: frozenset[str]
    kind: str = "token"

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes


# ----------------------------------------------------------------------------------------------
# opaque tokens from files


def _parse_tokens_file(path: Path) -> list[tuple[str, str, frozenset[str]]]:
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    entries = (data or {}).get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a mapping with a `tokens` list")
    out = []
    for i, e in enumerate(entries):
        where = f"{path}: tokens[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where} is not a mapping")
        name, digest = str(e.get("name", "")), str(e.get("sha256", "")).lower()
        if not _NAME.match(name):
            raise ValueError(f"{where}.name {name!r} is not a valid token name")
        if not _HEX64.match(digest):
            raise ValueError(f"{where}.sha256 must be 64 hex digits (sha256 of the token; `selma auth token` prints it)")
        try:
            scopes = parse_scopes(e.get("scopes") or [], field=f"{where}.scopes")
        except InvalidArgument as err:
            raise ValueError(str(err)) from None
        out.append((name, digest, frozenset(scopes)))
    return out


class TokenStore:
    """The tokens of one or more files, re-read when a file changes (a renewed Secret)."""

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self._lock = threading.Lock()
        self._signature: tuple[Any, ...] | None = None
        self._entries: list[tuple[str, str, frozenset[str]]] = []
        self._reload(initial=True)

    @classmethod
    def from_setting(cls, value: str) -> TokenStore | None:
        paths = [p.strip() for p in value.split(",") if p.strip()]
        return cls(paths) if paths else None

    def _stat(self) -> tuple[Any, ...]:
        return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in (os.stat(p) for p in self.paths))

    def _reload(self, *, initial: bool = False) -> None:
        with self._lock:
            try:
                signature = self._stat()
                if signature == self._signature:
                    return
                entries = [e for p in self.paths for e in _parse_tokens_file(p)]
            except (OSError, ValueError, yaml.YAMLError) as e:
                if initial:
                    raise InvalidArgument(f"cannot read the tokens file(s) {', '.join(map(str, self.paths))}: {e}",
                                          field="auth_tokens_file") from None
                # A file being replaced: keep the tokens we have rather than lock everybody out.
                log.error("tokens file changed but cannot be read (%s); keeping the previous %d token(s)", e, len(self._entries))
                return
            self._signature = signature
            self._entries = entries
            log.info("auth: %d token(s) from %s%s", len(entries), ", ".join(map(str, self.paths)), "" if initial else " (reloaded)")

    def lookup(self, token: str) -> Principal | None:
        """The principal of ``token``, comparing digests in constant time; None if unknown."""
        self._reload()
        digest = token_digest(token)
        found: Principal | None = None
        for name, stored, scopes in self._entries:  # every entry is compared: no early exit on a match
            if hmac.compare_digest(digest, stored) and found is None:
                found = Principal(name, scopes)
        return found


# ----------------------------------------------------------------------------------------------
# JWTs from an identity provider


class JwtVerifier:
    """Verifies JWT bearer tokens against the keys of a JWKS file (re-read when it changes)."""

    ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")

    def __init__(self, jwks_file: Path, *, issuer: str, audience: str) -> None:
        if not issuer or not audience:
            raise InvalidArgument("JWT verification (SELMA_AUTH_JWKS_FILE) needs SELMA_AUTH_JWT_ISSUER and SELMA_AUTH_JWT_AUDIENCE",
                                  field="auth_jwt_issuer" if not issuer else "auth_jwt_audience")
        self.path = Path(jwks_file)
        self.issuer, self.audience = issuer, audience
        self._lock = threading.Lock()
        self._signature: tuple[Any, ...] | None = None
        self._keys: Any = None
        self._reload(initial=True)

    def _reload(self, *, initial: bool = False) -> None:
        import jwt

        with self._lock:
            try:
                st = os.stat(self.path)
                signature = (st.st_ino, st.st_mtime_ns, st.st_size)
                if signature == self._signature:
                    return
                keys = jwt.PyJWKSet.from_json(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError, jwt.PyJWTError) as e:
                if initial:
                    raise InvalidArgument(f"cannot read the JWKS file {self.path}: {e}", field="auth_jwks_file") from None
                log.error("JWKS file changed but cannot be read (%s); keeping the previous keys", e)
                return
            self._signature, self._keys = signature, keys

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; :class:`Unauthenticated` (without the token) otherwise."""
        import jwt

        self._reload()
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            candidates = [k for k in self._keys.keys if kid is None or k.key_id == kid]
            if not candidates:
                raise Unauthenticated("the JWT is signed by a key the server does not know (kid not in the JWKS)")
            last: Exception | None = None
            for key in candidates:
                try:
                    claims = jwt.decode(token, key=key, algorithms=list(self.ALGORITHMS), issuer=self.issuer,
                                        audience=self.audience, options={"require": ["exp", "iss", "aud", "sub"]})
                    break
                except jwt.InvalidSignatureError as e:
                    last = e
            else:
                raise Unauthenticated(f"the JWT does not verify: {last}")
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the JWT has expired; get a new one from the identity provider") from None
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"the JWT does not verify: {e}") from None
        raw = claims.get("scope", claims.get("scp", ""))
        scopes = raw.split() if isinstance(raw, str) else [str(s) for s in raw or []]
        return Principal(str(claims["sub"]), frozenset(s for s in scopes if s in SCOPES), kind="jwt")


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


# ----------------------------------------------------------------------------------------------
# the interceptor


class Authenticator:
    """Turns a call's metadata into a :class:`Principal`, or raises Unauthenticated."""

    def __init__(self, tokens: TokenStore | None, jwt_verifier: JwtVerifier | None) -> None:
        self.tokens = tokens
        self.jwt = jwt_verifier

    @classmethod
    def from_settings(cls, settings: SelmaSettings) -> Authenticator | None:
        """None when auth is off (no tokens file, no JWKS file: the local default)."""
        if not settings.auth_enabled:
            return None
        tokens = TokenStore.from_setting(settings.auth_tokens_file)
        verifier = (JwtVerifier(settings.auth_jwks_file, issuer=settings.auth_jwt_issuer, audience=settings.auth_jwt_audience)
                    if settings.auth_jwks_file is not None else None)
        return cls(tokens, verifier)

    def authenticate(self, metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Principal:
        values = [v for k, v in (metadata.items() if isinstance(metadata, Mapping) else metadata or ()) if k.lower() == "authorization"]
        if not values:
            raise Unauthenticated("this call needs a bearer token (metadata `authorization: Bearer <token>`): "
                                  "set SELMA_TOKEN or pass --token")
        scheme, _, token = str(values[0]).strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the authorization metadata must be `Bearer <token>`")
        if self.tokens is not None:
            principal = self.tokens.lookup(token)
            if principal is not None:
                return principal
        if self.jwt is not None and _looks_like_jwt(token):
            return self.jwt.verify(token)
        raise Unauthenticated("the bearer token is not valid here (unknown or revoked); check SELMA_TOKEN / --token")


def required_scope(method: str) -> str:
    """The scope ``method`` needs; PermissionDenied when the table has no entry (fail closed)."""
    scope = METHOD_SCOPES.get(method)
    if scope is None:
        raise PermissionDenied(f"{method} has no entry in the scope table (selma.auth.METHOD_SCOPES), so nobody may call it")
    return scope


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates and authorizes every call before its handler runs.

    It sits after :class:`selma.server.ErrorAndMetricsInterceptor` in the chain (inside its wrapper),
    so a refusal is a domain error that interceptor maps to its status and counts like any other.
    """

    def __init__(self, authenticator: Authenticator, *, open_health: bool = True) -> None:
        self.authenticator = authenticator
        self.open_health = open_health

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001 (grpc API)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        service = method.split("/")[1] if method.count("/") >= 2 else ""
        if self.open_health and service in OPEN_SERVICES:
            return handler
        metadata = handler_call_details.invocation_metadata
        check = lambda: self._check(method, service, metadata)  # noqa: E731 - runs per call, inside the metrics wrapper
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, check, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, check, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, check, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream, check, method))
        return handler

    def _check(self, method: str, service: str, metadata: Any) -> Principal:
        try:
            principal = self.authenticator.authenticate(metadata)
        except Unauthenticated as e:
            _record("anonymous", method, "UNAUTHENTICATED", str(e))
            raise
        if service in OPEN_SERVICES:  # auth_open_health off: any valid token may probe
            return principal
        try:
            scope = required_scope(method)
            if not principal.allows(scope):
                raise PermissionDenied(
                    f"token {principal.name!r} lacks the scope {scope!r} that {method.lstrip('/')} needs (it has: "
                    f"{', '.join(sorted(principal.scopes)) or 'none'}); use a token with scope {scope!r} or admin")
        except PermissionDenied as e:
            _record(principal.name, method, "PERMISSION_DENIED", str(e))
            raise
        return principal


def _record(name: str, method: str, code: str, detail: str = "") -> None:
    """Log and count one call's outcome by token name (never the token), method and code."""
    service, _, rpc = method.lstrip("/").partition("/")
    AUTH_CALLS.labels(name, service, rpc, code).inc()
    if code == "OK":
        log.info("auth: %s called %s: OK", name, method)
    else:
        log.warning("auth: %s called %s: %s%s", name, method, code, f" ({detail})" if detail else "")


def _outcome(e: BaseException | None, context: Any) -> str:
    if isinstance(e, SelmaError):
        return e.code.value
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "INTERNAL" if e is not None else "OK"


_CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("selma_caller", default=None)


def current_principal() -> Principal | None:
    """The authenticated caller of the RPC this thread is handling; None when auth is off."""
    return _CALLER.get()


def _wrap_unary(fn, check, method: str):  # noqa: ANN001
    def wrapper(request, context):  # noqa: ANN001
        principal = check()
        token = _CALLER.set(principal)
        try:
            response = fn(request, context)
        except BaseException as e:
            _record(principal.name, method, _outcome(e, context))
            raise
        finally:
            _CALLER.reset(token)
        _record(principal.name, method, _outcome(None, context))
        return response

    return wrapper


def _wrap_stream(fn, check, method: str):  # noqa: ANN001
    def wrapper(request, context):  # noqa: ANN001
        principal = check()
        try:
            yield from _with_caller(principal, fn(request, context))
        except GeneratorExit:
            _record(principal.name, method, "CANCELLED")
            raise
        except BaseException as e:
            _record(principal.name, method, _outcome(e, context))
            raise
        _record(principal.name, method, _outcome(None, context))

    return wrapper


def _with_caller(principal: Principal, it: Iterator[Any]) -> Iterator[Any]:
    """``it``'s items, with the caller set around each step only (the thread serves other RPCs between)."""
    try:
        while True:
            token = _CALLER.set(principal)
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                _CALLER.reset(token)
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def interceptors(settings: SelmaSettings) -> list[grpc.ServerInterceptor]:
    """The auth interceptor for these settings ([] when auth is off)."""
    authenticator = Authenticator.from_settings(settings)
    if authenticator is None:
        return []
    return [AuthInterceptor(authenticator, open_health=settings.auth_open_health)]
