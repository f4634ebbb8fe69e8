"""Request limits: the bounds every request is held to at the API boundary, from settings.

Every selma server checks each request message before its servicer sees it (a server
interceptor, :class:`RequestLimitsInterceptor`): every string field, by kind, and every repeated
or map field are bounded by the ``SELMA_MAX_*`` settings of :class:`selma.config.SelmaSettings`
(the *Limits* group).  Ids, names, keys, URIs and other short strings get one cap
(``SELMA_MAX_ID_CHARS``), prompts another (``SELMA_MAX_PROMPT_CHARS``), free text (skill rules,
descriptions, reasons) a third (``SELMA_MAX_TEXT_CHARS``), and a repeated field or map holds at
most ``SELMA_MAX_REPEATED_ITEMS`` entries.  Service-specific maxima (images per request, steps,
resolutions, training batch size, placement) live in each service's settings and are checked
by its spec parsing with :func:`check_chars` / :func:`check_items` / :func:`check_at_most`.

A request over a limit is INVALID_ARGUMENT naming the field, the limit's setting and its
value (``spec.run is 10485760 characters; the limit is SELMA_MAX_ID_CHARS=1024``): the request
must change, and retrying never helps (RESOURCE_EXHAUSTED is what selma answers when it is busy,
and clients retry that).  Messages quote at most a short prefix of a bad value
(:func:`selma.errors.quote`), and every error message is cut to a bounded length
(:data:`selma.errors.MAX_MESSAGE_CHARS`).  Requests larger than ``SELMA_MAX_RECEIVE_MESSAGE_BYTES``
never reach Python: gRPC refuses them with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from selma.errors import InvalidArgument

# String fields holding prompts (the generated, rendered and served text itself).
PROMPT_FIELDS = frozenset({"prompt", "prompts", "negative_prompt", "seed_examples", "text"})
# String fields holding other free text written by a person.
TEXT_FIELDS = frozenset({"description", "rules", "reason", "stop", "message", "system_prompt"})
# Nested messages deeper than this are refused (protobuf's own parser allows 100).
MAX_DEPTH = 32


def setting_name(name: str) -> str:
    """A settings field name as its environment variable (``max_id_chars`` → ``SELMA_MAX_ID_CHARS``)."""
    return f"SELMA_{name.upper()}"


def check_chars(value: str, fld: str, limit: int, setting: str) -> str:
    """``value`` unless it is longer than ``limit`` characters (INVALID_ARGUMENT naming ``setting``)."""
    if len(value) > limit:
        raise InvalidArgument(f"is {len(value)} characters; the limit is {setting_name(setting)}={limit}", field=fld)
    return value


def check_items(count: int, fld: str, limit: int, setting: str, what: str = "entries") -> None:
    """At most ``limit`` entries in a repeated field or list (INVALID_ARGUMENT naming ``setting``)."""
    if count > limit:
        raise InvalidArgument(f"has {count} {what}; the limit is {setting_name(setting)}={limit}", field=fld)


def check_at_most(value: float, fld: str, limit: float, setting: str, what: str = "") -> None:
    """A number at most ``limit`` (INVALID_ARGUMENT naming ``setting``)."""
    if value > limit:
        raise InvalidArgument(f"{what or 'value'} {value:g} is over the limit {setting_name(setting)}={limit:g}", field=fld)


@dataclass(frozen=True)
class Limits:
    """The generic request limits (``SELMA_MAX_*``), as the interceptor and spec parsers use them."""

    max_id_chars: int = 1024
    max_prompt_chars: int = 4096
    max_text_chars: int = 16384
    max_repeated_items: int = 10000

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(**{name: int(getattr(settings, name)) for name in cls.__dataclass_fields__})

    def string_limit(self, field_name: str) -> tuple[int, str]:
        """(limit, setting) for a string field of this name."""
        if field_name in PROMPT_FIELDS:
            return self.max_prompt_chars, "max_prompt_chars"
        if field_name in TEXT_FIELDS:
            return self.max_text_chars, "max_text_chars"
        return self.max_id_chars, "max_id_chars"

    def check_message(self, msg: Message, path: str = "") -> None:
        """Every set field of ``msg`` (recursively) within the limits; INVALID_ARGUMENT naming the first over one."""
        self._walk(msg, path, 0)

    def _walk(self, msg: Message, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise InvalidArgument(f"nests messages more than {MAX_DEPTH} levels deep", field=path or "request")
        for fd, value in msg.ListFields():
            fld = f"{path}.{fd.name}" if path else fd.name
            if fd.is_repeated:
                check_items(len(value), fld, self.max_repeated_items, "max_repeated_items")
                if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                    self._walk_map(fd, value, fld, depth)
                else:
                    for i, item in enumerate(value):
                        self._check_value(fd, item, f"{fld}[{i}]", depth)
            else:
                self._check_value(fd, value, fld, depth)

    def _walk_map(self, fd: FieldDescriptor, value: Any, fld: str, depth: int) -> None:
        value_fd = fd.message_type.fields_by_name["value"]
        for key, item in value.items():
            if isinstance(key, str):
                check_chars(key, f"{fld} key", self.max_id_chars, "max_id_chars")
            self._check_value(value_fd, item, f"{fld}[{key!r}]" if len(str(key)) <= 64 else f"{fld}[…]", depth, name=fd.name)

    def _check_value(self, fd: FieldDescriptor, value: Any, fld: str, depth: int, *, name: str = "") -> None:
        if fd.type == FieldDescriptor.TYPE_STRING:
            limit, setting = self.string_limit(name or fd.name)
            check_chars(value, fld, limit, setting)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            self._walk(value, fld, depth + 1)


class RequestLimitsInterceptor(grpc.ServerInterceptor):
    """Checks every unary request message against :class:`Limits` before the servicer runs.

    It sits inside the error interceptor, so a refusal is an ordinary domain error (INVALID_ARGUMENT
    naming the field and the limit) and is counted like any other.  Client-streamed requests are
    bounded by the message size only.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001 (grpc API)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return handler._replace(unary_unary=self._checked(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._checked(handler.unary_stream))
        return handler

    def _checked(self, fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def checked(request: Any, context: Any) -> Any:
            if isinstance(request, Message):
                self.limits.check_message(request)
            return fn(request, context)

        return checked
