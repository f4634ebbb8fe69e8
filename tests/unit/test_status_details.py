"""Status messages are cut to a size every client accepts (found by the RPC fuzzer: a 1 MB id echoed
in NOT_FOUND made the client drop the answer with "received metadata size exceeds hard limit")."""

from __future__ import annotations

from urllib.parse import quote

from selma.server import MAX_STATUS_DETAILS_BYTES, bounded_details


def test_short_messages_are_kept_as_they_are():
    assert bounded_details("job 'x' not found") == "job 'x' not found"
    exact = "é" * (MAX_STATUS_DETAILS_BYTES // 2)
    assert bounded_details(exact) == exact


def test_long_messages_are_cut_on_a_character_boundary_and_say_so():
    for text in ("x" * 10_000_000, "é😀" * 1_000_000):
        out = bounded_details(f"no job {text!r}")
        assert len(out.encode("utf-8")) <= MAX_STATUS_DETAILS_BYTES
        assert out.startswith("no job '") and out.endswith("more characters)")
        # percent-encoded as grpc-message travels, it stays under the clients' 8 KiB soft header limit
        assert len(quote(out.encode("utf-8"), safe=" ")) < 8192
