"""The one page-size rule of every List RPC (job lists, ListModels, ListExperts, …).

* ``page_size`` 0 means :data:`DEFAULT_PAGE_SIZE` (50); 1..:data:`MAX_PAGE_SIZE` (1000) is taken
  as given; a negative size or one above the maximum is INVALID_ARGUMENT naming ``page_size``
  (refused, not clamped, so a caller never silently gets fewer items per page than it asked for).
* ``page_token`` is "" for the first page, else a ``next_page_token`` this server issued (the
  offset of the next item as a decimal string); anything else is INVALID_ARGUMENT naming
  ``page_token``.
* ``next_page_token`` is "" on the last page.

:func:`page_window` applies the rule; :func:`paginate` applies it to a list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from selma.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_window(page_size: int, page_token: str) -> tuple[int, int]:
    """``(offset, size)`` of the page a List request asks for; INVALID_ARGUMENT for a bad size or token."""
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be 0..{MAX_PAGE_SIZE} (0 = {DEFAULT_PAGE_SIZE}); got {page_size}", field="page_size"
        )
    if page_token and not (page_token.isascii() and page_token.isdigit()):
        raise InvalidArgument(
            f"page_token {page_token!r} is not one this server issued; pass the previous response's next_page_token, or \"\" for the first page",
            field="page_token",
        )
    return int(page_token or 0), page_size or DEFAULT_PAGE_SIZE


def next_page_token(offset: int, size: int, total: int) -> str:
    """The token of the page after ``[offset, offset + size)`` of ``total`` items; "" if that was the last."""
    return str(offset + size) if offset + size < total else ""


def paginate(items: Sequence[T], page_size: int, page_token: str) -> tuple[list[T], str]:
    """One page of ``items`` and the next page's token, by the rule above."""
    offset, size = page_window(page_size, page_token)
    return list(items[offset : offset + size]), next_page_token(offset, size, len(items))
