"""Korean ROUGE, as the competition scores it: ROUGE-1/2/L F1 on Korean morphemes, averaged over references.

Built on rouge-score's scorer with a Korean tokenizer (rouge-score's default tokenizer deletes every
Hangul character, which made the original numbers meaningless). Morphemes come from Kiwi; `#Person1#`-style
tags are pinned as one token inside Kiwi's analysis (Kiwi would split them, and a particle cut off from its tag
is misread). Punctuation and symbol morphemes are dropped, as rouge-score's own tokenizer drops
non-alphanumerics; Latin text is lower-cased.

Each distinct text is tokenized once per tokenizer (a memo shared by all calls), in one batched Kiwi call, and
its n-gram counts are built once per call; pairs are then scored with rouge-score's own n-gram and LCS functions,
giving exactly `RougeScorer.score`'s numbers.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from rouge_score import rouge_scorer, scoring

from dialogsum.data import TAG_PATTERN, protect_tags

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

            _kiwi = Kiwi(num_workers=-1, load_typo_dict=False)  # typo correction is off; its dictionary only costs load time
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
        tokenize = self._morphemes if self.mode == "morpheme" else self._words
        for text, tokens in zip(todo, tokenize(todo)):
            self._memo[text] = tuple(tokens)

    @staticmethod
    def _words(texts: list[str]) -> list[list[str]]:
        """Lower-cased whitespace words; a tag is a word of its own (`#Person1#는` → `#Person1#`, `는`)."""
        return [
            [word for piece, is_tag in protect_tags(text) for word in ([piece] if is_tag else piece.lower().split())]
            for text in texts
        ]

    @staticmethod
    def _morphemes(texts: list[str]) -> list[list[str]]:
        """Kiwi morphemes, punctuation dropped, lower-cased. Each tag is pinned as one proper-noun token, so
        Kiwi analyses the particle after it in context (cut out on its own, `는` would read as the verb 늘-)."""
        results = _get_kiwi().tokenize(texts, pretokenized=_tag_spans)
        kept = [[tok.form for tok in toks if not tok.tag.startswith(_DROPPED_TAG_PREFIXES)] for toks in results]
        return [[form if TAG_PATTERN.fullmatch(form) else form.lower() for form in forms] for forms in kept]


def _tag_spans(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), "NNP") for m in TAG_PATTERN.finditer(text)]


_tokenizers: dict[str, KoreanTokenizer] = {}


def korean_tokenizer(mode: TokenMode = "morpheme") -> KoreanTokenizer:
    """The shared tokenizer for a mode (its memo is reused across calls)."""
    if mode not in _tokenizers:
        _tokenizers[mode] = KoreanTokenizer(mode)
    return _tokenizers[mode]


@dataclass(frozen=True)
class TextStats:
    """One text's tokens and n-gram counts, built once however many pairs the text is in."""

    tokens: list[str]
    unigrams: Counter
    bigrams: Counter
    vocabulary: frozenset[str]

    @classmethod
    def of(cls, tokens: list[str]) -> "TextStats":
        ngrams = [rouge_scorer._create_ngrams(tokens, n) for n in (1, 2)]
        return cls(tokens, *ngrams, frozenset(tokens))


def pair_fmeasures(target: TextStats, prediction: TextStats) -> dict[str, float]:
    """ROUGE-1/2/L F1 exactly as `RougeScorer.score(target, prediction)` computes them (its own functions)."""
    return {
        "rouge1": rouge_scorer._score_ngrams(target.unigrams, prediction.unigrams).fmeasure,
        "rouge2": rouge_scorer._score_ngrams(target.bigrams, prediction.bigrams).fmeasure,
        "rougeL": _lcs_fmeasure(target, prediction),
    }


def _lcs_fmeasure(target: TextStats, prediction: TextStats) -> float:
    """rouge-score's LCS F1. The LCS table is built over the tokens both texts contain: a token missing from one
    side is in no common subsequence, so the LCS length (and the score) is unchanged and the table is smaller."""
    if not target.tokens or not prediction.tokens:
        return 0.0
    shared = target.vocabulary & prediction.vocabulary
    target_shared = [t for t in target.tokens if t in shared]
    prediction_shared = [t for t in prediction.tokens if t in shared]
    lcs = rouge_scorer._lcs_table(target_shared, prediction_shared)[-1][-1] if shared else 0
    return scoring.fmeasure(lcs / len(prediction.tokens), lcs / len(target.tokens))


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
    texts = list(dict.fromkeys([*predictions, *(x for r in refs for x in r)]))
    tokenizer.prime(texts)
    stats = {text: TextStats.of(tokenizer.tokenize(text)) for text in texts}
    rows = []
    for pred, row_refs in zip(predictions, refs):
        sums = dict.fromkeys(ROUGE_TYPES, 0.0)
        for ref in row_refs:
            scores = pair_fmeasures(stats[ref], stats[pred])
            for t in ROUGE_TYPES:
                sums[t] += scores[t]
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


def role_scores(prefix: str, predictions: Sequence[str], references: Sequence[str]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(`<prefix>_*` metrics with the 95% bootstrap interval of `<prefix>_final` over the rows, per-row scores)."""
    from dialogsum.stats import bootstrap_mean

    rows = score_rows(predictions, references)
    interval = bootstrap_mean([r["final"] for r in rows])
    metrics = {f"{prefix}_{k}": v for k, v in aggregate(rows).items()}
    metrics.update({f"{prefix}_final_ci95_low": interval.low, f"{prefix}_final_ci95_high": interval.high})
    return metrics, rows


def rouge(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    mode: TokenMode = "morpheme",
) -> dict[str, float]:
    """Corpus ROUGE: {"rouge1","rouge2","rougeL"} F1 in [0, 1] and "final" = 100 × their mean."""
    return aggregate(score_rows(predictions, references, mode))
