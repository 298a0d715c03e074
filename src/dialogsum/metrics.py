"""Korean ROUGE, as the competition scores it: ROUGE-1/2/L F1 on Korean morphemes, averaged over references.

Built on rouge-score's `RougeScorer` with a Korean tokenizer (rouge-score's default tokenizer deletes every
Hangul character, which made the original numbers meaningless). Morphemes come from Kiwi; `#Person1#`-style
tags stay one token (Kiwi would split them). Punctuation and symbol morphemes are dropped, as rouge-score's
own tokenizer drops non-alphanumerics; Latin text is lower-cased.

Each distinct text is tokenized once per tokenizer (a memo shared by all calls), in one batched Kiwi call.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Literal

from rouge_score import rouge_scorer

from dialogsum.data import protect_tags

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
TokenMode = Literal["morpheme", "whitespace"]
# Kiwi tags of punctuation and symbols (sentence-final marks, brackets, separators, other symbols).
_DROPPED_TAG_PREFIXES = ("SF", "SP", "SS", "SE", "SO", "SW")

_kiwi = None
_kiwi_lock = threading.Lock()


def _get_kiwi():
    global _kiwi
    with _kiwi_lock:
        if _kiwi is None:
            from kiwipiepy import Kiwi

            _kiwi = Kiwi(num_workers=-1)
    return _kiwi


class KoreanTokenizer:
    """A rouge-score tokenizer (`tokenize(text) -> list[str]`) over Korean morphemes or whitespace words."""

    def __init__(self, mode: TokenMode = "morpheme"):
        if mode not in ("morpheme", "whitespace"):
            raise ValueError(f"unknown token mode '{mode}' (morpheme, whitespace)")
        self.mode = mode
        self._memo: dict[str, tuple[str, ...]] = {}

    def tokenize(self, text: str) -> list[str]:
        tokens = self._memo.get(text)
        if tokens is None:
            self.prime([text])
            tokens = self._memo[text]
        return list(tokens)

    def prime(self, texts: Iterable[str]) -> None:
        """Tokenize every distinct, not yet seen text in one batch."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if not todo:
            return
        split = [protect_tags(t) for t in todo]
        plain = list(dict.fromkeys(p for pieces in split for p, is_tag in pieces if not is_tag and p.strip()))
        plain_tokens = dict(zip(plain, self._tokenize_plain(plain)))
        for text, pieces in zip(todo, split):
            tokens: list[str] = []
            for piece, is_tag in pieces:
                if is_tag:
                    tokens.append(piece)
                elif piece.strip():
                    tokens.extend(plain_tokens[piece])
            self._memo[text] = tuple(tokens)

    def _tokenize_plain(self, texts: list[str]) -> list[list[str]]:
        if self.mode == "whitespace":
            return [[w.lower() for w in t.split()] for t in texts]
        results = _get_kiwi().tokenize(texts)
        return [[tok.form.lower() for tok in toks if not tok.tag.startswith(_DROPPED_TAG_PREFIXES)] for toks in results]


_tokenizers: dict[str, KoreanTokenizer] = {}


def korean_tokenizer(mode: TokenMode = "morpheme") -> KoreanTokenizer:
    """The shared tokenizer for a mode (its memo is reused across calls)."""
    if mode not in _tokenizers:
        _tokenizers[mode] = KoreanTokenizer(mode)
    return _tokenizers[mode]


def _as_reference_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def score_rows(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    mode: TokenMode = "morpheme",
) -> list[dict[str, float]]:
    """Per-row ROUGE F1 (each averaged over that row's references) and `final` = 100 × mean of the three."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    refs = _as_reference_lists(references)
    for i, r in enumerate(refs):
        if not r:
            raise ValueError(f"row {i}: no reference")
    tokenizer = korean_tokenizer(mode)
    tokenizer.prime([*predictions, *(x for r in refs for x in r)])
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=tokenizer)
    rows = []
    for pred, row_refs in zip(predictions, refs):
        sums = dict.fromkeys(ROUGE_TYPES, 0.0)
        for ref in row_refs:
            scores = scorer.score(ref, pred)
            for t in ROUGE_TYPES:
                sums[t] += scores[t].fmeasure
        row = {t: sums[t] / len(row_refs) for t in ROUGE_TYPES}
        row["final"] = 100.0 * sum(row[t] for t in ROUGE_TYPES) / len(ROUGE_TYPES)
        rows.append(row)
    return rows


def aggregate(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of per-row scores; an empty list scores 0."""
    keys = (*ROUGE_TYPES, "final")
    if not rows:
        return dict.fromkeys(keys, 0.0)
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def rouge(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    mode: TokenMode = "morpheme",
) -> dict[str, float]:
    """Corpus ROUGE: {"rouge1","rouge2","rougeL"} F1 in [0, 1] and "final" = 100 × their mean."""
    return aggregate(score_rows(predictions, references, mode))
