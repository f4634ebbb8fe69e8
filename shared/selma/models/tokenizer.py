"""Tokenizers trained offline, deterministically, on the caption corpus shipped with selma.

Two byte-level BPE tokenizers are trained from ``selma/data/tokenizer_corpus.txt``:

* a CLIP-style tokenizer (``CLIPTokenizer``, the class every Stable Diffusion checkpoint ships)
  for the tiny text-to-image pipelines.  Like OpenAI's CLIP vocabulary, the two special tokens
  take the last two ids (``<|startoftext|>`` = N-2, ``<|endoftext|>`` = N-1), so the text
  encoder's pooling finds the end token whether it uses the legacy "highest id" rule or
  ``eos_token_id``; padding uses ``<|endoftext|>`` as in SD 1.x;
* a GPT-2-style tokenizer with the ChatML special tokens and chat template of SmolLM2-Instruct,
  so the tiny causal LM is a drop-in stand-in for the real instruct model in plumbing tests.

Training (pure Python, ``train_bpe``) takes well under a second and gives the same vocabulary
and merges on every run, unlike the ``tokenizers`` trainer, which breaks ties in hash order.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

CORPUS_RESOURCE = "tokenizer_corpus.txt"
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
# Same token strings as SmolLM2-Instruct: ChatML turns, <|endoftext|> as the document separator.
LM_ENDOFTEXT = "<|endoftext|>"
LM_IM_START = "<|im_start|>"
LM_IM_END = "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_corpus() -> list[str]:
    """The caption-like training text shipped in ``selma/data``, one caption per line."""
    text = importlib.resources.files("selma").joinpath("data").joinpath(CORPUS_RESOURCE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _clean(texts: Iterable[str]) -> list[str]:
    # A training text containing "<|" could be pre-tokenized as a special token; captions never need it.
    return [t.replace("<|", " ") for t in texts]


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte-level alphabet: one printable character per byte, in their canonical order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def train_bpe(
    word_counts: Mapping[str, int], alphabet: Sequence[str], *, vocab_size: int, end_of_word_suffix: str = ""
) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn BPE merges over pre-tokenized ``word_counts`` until the vocabulary has ``vocab_size`` tokens.

    Deterministic by construction: the most frequent pair wins and ties go to the
    lexicographically smallest pair.  (The ``tokenizers`` BpeTrainer breaks ties by hash-map
    order, so two runs on one corpus can give different merges.)  The base vocabulary is the
    whole ``alphabet`` (plus each symbol with ``end_of_word_suffix``, as in CLIP), so any byte
    sequence can be encoded and no unknown token is ever produced.
    """
    base = list(alphabet) + ([a + end_of_word_suffix for a in alphabet] if end_of_word_suffix else [])
    vocab = list(dict.fromkeys(base))
    known = set(vocab)
    words: list[list[str]] = []
    freqs: list[int] = []
    for word in sorted(word_counts):
        symbols = list(word)
        if end_of_word_suffix:
            symbols[-1] += end_of_word_suffix
        words.append(symbols)
        freqs.append(word_counts[word])

    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in pairwise(symbols):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)

    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and pair_counts:
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        for i in sorted(where.pop(best)):
            old = words[i]
            for pair in pairwise(old):
                pair_counts[pair] -= freqs[i]
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            new: list[str] = []
            j = 0
            while j < len(old):
                if j + 1 < len(old) and (old[j], old[j + 1]) == best:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            words[i] = new
            for pair in pairwise(new):
                pair_counts[pair] += freqs[i]
                where[pair].add(i)
    if len(vocab) < vocab_size:
        logger.warning("corpus too small for %d tokens: stopped at %d", vocab_size, len(vocab))
    return vocab, merges


def _word_counts(texts: Iterable[str], backend: Tokenizer) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        counts.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return counts


def train_clip_tokenizer(
    texts: Sequence[str] | None = None, *, vocab_size: int = 1000, model_max_length: int = 77
) -> CLIPTokenizer:
    """Train a CLIP-style BPE tokenizer (lower-cased, ``</w>`` word ends) on ``texts``.

    ``texts`` defaults to the shipped corpus.  The vocabulary is laid out like OpenAI CLIP's:
    the 256 byte symbols, the same with ``</w>``, the merges, then ``<|startoftext|>`` and
    ``<|endoftext|>`` as the last two ids; ``vocab_size`` ids in all.
    """
    texts = _clean(load_corpus() if texts is None else texts)
    # Pre-tokenize with CLIPTokenizer's own normalizer and splitter so the merges match at use time.
    counts = _word_counts(texts, CLIPTokenizer().backend_tokenizer)
    ordinary, merges = train_bpe(counts, bytes_to_unicode(), vocab_size=vocab_size - 2, end_of_word_suffix="</w>")
    vocab = {tok: i for i, tok in enumerate([*ordinary, CLIP_BOS, CLIP_EOS])}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    logger.debug("trained CLIP tokenizer: %d ids, %d merges, on %d texts", len(vocab), len(merges), len(texts))
    return tok


def train_lm_tokenizer(texts: Sequence[str] | None = None, *, vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer with SmolLM2's special tokens and chat template.

    Ids 0-2 are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (as in SmolLM2); padding is on
    the left (decoder-only models generate from the right end) with ``pad`` = ``eos`` = ``<|im_end|>``.
    """
    texts = _clean(load_corpus() if texts is None else texts)
    specials = [LM_ENDOFTEXT, LM_IM_START, LM_IM_END]
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    ordinary, merges = train_bpe(counts, bytes_to_unicode(), vocab_size=vocab_size - len(specials))
    vocab = {tok: i for i, tok in enumerate([*specials, *ordinary])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=LM_IM_START,
        eos_token=LM_IM_END,
        unk_token=LM_ENDOFTEXT,
        pad_token=LM_IM_END,
        padding_side="left",
        model_max_length=1024,
    )
    tok.chat_template = CHATML_TEMPLATE
    logger.debug("trained LM tokenizer: %d ids, %d merges, on %d texts", len(tok), len(merges), len(texts))
    return tok
