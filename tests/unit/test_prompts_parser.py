"""The numbered-list parser on the kinds of mess LLMs actually write."""

from __future__ import annotations

from selma_prompts.parser import clean_item, parse_numbered_list


def test_completion_that_starts_mid_item_and_ends_in_prose_keeps_only_the_items():
    text = " An apple, a banana and a lemon.\n5. Two eggs in a bag.\n\nYour task is to summarise the rules.\nDo you agree?"
    out = parse_numbered_list(text, starts_mid_item=True)
    assert out.items == ["An apple, a banana and a lemon.", "Two eggs in a bag."]
    assert out.prose_lines == 2


def test_numbering_styles_gaps_and_blank_lines_are_all_items():
    text = (
        "Sure! Here are more descriptions:\n\n"
        "4. A red kite.\n\n"
        "5) A blue boat.\n"
        "(8) A green frog.\n"
        "#9 - A grey owl.\n"
        "**10.** A **bold** fox.\n"
        "- 11. A bulleted bear.\n"
        "Prompt 12: A labelled lamp.\n"
        "13: A colon cat.\n"
        "14.\n"
        "15. \"A quoted quail.\"\n"
        "I hope these help!\n"
    )
    out = parse_numbered_list(text)
    assert out.items == [
        "A red kite.",
        "A blue boat.",
        "A green frog.",
        "A grey owl.",
        "A **bold** fox.",
        "A bulleted bear.",
        "A labelled lamp.",
        "A colon cat.",
        "A quoted quail.",
    ]
    assert out.empty_items == 1  # "14." with nothing after it
    assert out.prose_lines == 2


def test_duplicates_are_kept_for_the_diversity_filter():
    out = parse_numbered_list("4. A cat on a mat.\n5. A cat on a mat.\n6. A dog.")
    assert out.items == ["A cat on a mat.", "A cat on a mat.", "A dog."]


def test_items_run_together_on_one_line_are_split_when_the_numbers_count_up():
    out = parse_numbered_list("1. Empty box 2. Red ball 3. Three cats 7. not a split")
    assert out.items == ["Empty box", "Red ball", "Three cats 7. not a split"]


def test_wrapped_item_and_text_on_the_line_after_its_number():
    text = "4. In this picture we can see a boat.\nBehind it there are trees.\n5.\nA dog asleep on a porch.\n\nThe end:\n"
    out = parse_numbered_list(text)
    assert out.items == ["In this picture we can see a boat. Behind it there are trees.", "A dog asleep on a porch."]


def test_decimal_numbers_and_years_are_not_items():
    out = parse_numbered_list("2.5 liters of milk in a jug.\n4. A jug with 2.5 liters of milk.")
    assert out.items == ["A jug with 2.5 liters of milk."]
    assert out.prose_lines == 1


def test_output_cut_by_max_tokens_drops_the_incomplete_last_item():
    text = "4. A tall giraffe.\n5. A small mouse under a"
    out = parse_numbered_list(text, truncated=True)
    assert out.items == ["A tall giraffe."]
    assert out.truncated_item == "A small mouse under a"
    # A cut that happens right after a line break loses nothing.
    assert parse_numbered_list(text + " table.\n", truncated=True).items == ["A tall giraffe.", "A small mouse under a table."]
    # Prose after the last item means the list itself was complete.
    assert parse_numbered_list("4. A cat.\n\nHere are more ide", truncated=True).items == ["A cat."]


def test_a_restated_list_restarting_at_one_is_parsed_in_full():
    text = "1. Three red apples.\n2. Two kids.\n3. A desk.\n4. One owl on a branch."
    assert parse_numbered_list(text).items == ["Three red apples.", "Two kids.", "A desk.", "One owl on a branch."]


def test_nothing_usable():
    for text in ("", "\n\n", "Sorry, I can't help with that.", "#$%^"):
        assert parse_numbered_list(text).items == []


def test_clean_item_strips_wrappers_and_whitespace():
    assert clean_item('  **"A  cat\ton a mat."**  ') == "A cat on a mat."
    assert clean_item("“Curly quotes”") == "Curly quotes"
    assert clean_item("**") == "**"
