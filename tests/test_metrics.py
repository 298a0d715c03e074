"""Korean ROUGE on Korean rows (the bundled sample): Hangul counts, tags stay whole, references average, and the fast path gives exactly
rouge-score's `RougeScorer` numbers."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from dialogsum import metrics
from dialogsum.data import read_dialogues, sample_data_path
from dialogsum.metrics import ROUGE_TYPES, KoreanTokenizer, aggregate, korean_tokenizer, rouge, score_rows

# Two Korean sentences without a morpheme in common: 사과/를/먹/었/다 and 하늘/이/파랗/네요.
APPLE = "사과를 먹었다."
SKY = "하늘이 파랗네요."


@pytest.fixture(scope="module")
def rows():
    return read_dialogues(sample_data_path("train")).rows[:40]


def test_identical_korean_summaries_score_one(rows) -> None:
    summaries = [r.summary for r in rows]
    assert rouge(summaries, summaries) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "final": 100.0})


def test_korean_texts_without_shared_morphemes_score_zero() -> None:
    tokenizer = KoreanTokenizer()
    assert not set(tokenizer.tokenize(APPLE)) & set(tokenizer.tokenize(SKY))
    assert rouge([APPLE], [SKY]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "final": 0.0}


def test_hangul_is_scored_where_rouge_scores_default_tokenizer_drops_it(rows) -> None:
    reference = rows[0].summary  # "#Person2#는 #Person1#에게 전화해 다음 주 화요일 오전 10시로 건강검진을 예약하고, ..."
    prediction = "다음 주 화요일 오전에 건강검진을 예약합니다."
    default = rouge_scorer.RougeScorer(list(ROUGE_TYPES)).score(reference, prediction)
    assert [default[t].fmeasure for t in ROUGE_TYPES] == [0.0, 0.0, 0.0]  # every Hangul character deleted
    ours = rouge([prediction], [reference])
    assert ours["rouge1"] > 0.3 and ours["rouge2"] > 0 and ours["rougeL"] > 0.3


def test_multiple_references_are_averaged(rows) -> None:
    prediction, other = rows[0].summary, rows[1].summary
    assert score_rows([APPLE], [[APPLE, SKY]])[0]["rouge1"] == pytest.approx(0.5)
    both = score_rows([prediction], [[prediction, other]])[0]
    alone = score_rows([prediction], [other])[0]
    for t in ROUGE_TYPES:
        assert both[t] == pytest.approx((1.0 + alone[t]) / 2)


def test_tags_stay_one_token_and_particles_after_them_are_read_in_context() -> None:
    text = "#Person1#는 #Person2#를 #PhoneNumber#로 불렀다."
    tokens = KoreanTokenizer().tokenize(text)
    assert tokens[:6] == ["#Person1#", "는", "#Person2#", "를", "#PhoneNumber#", "로"]
    assert KoreanTokenizer("whitespace").tokenize(text) == [
        "#Person1#", "는", "#Person2#", "를", "#PhoneNumber#", "로", "불렀다."
    ]  # fmt: skip
    assert rouge(["#Person1#는 떠났다."], ["#Person2#는 떠났다."])["rouge1"] < 1.0


def test_whitespace_mode_scores_words() -> None:
    prediction, reference = "오늘 날씨가 좋다", "오늘 날씨는 좋다"
    words = rouge([prediction], [reference], mode="whitespace")
    assert words["rouge1"] == pytest.approx(2 / 3) and words["rouge2"] == 0.0
    assert rouge([prediction], [reference])["rouge1"] == pytest.approx(4 / 5)  # 오늘/날씨/가|는/좋/다
    with pytest.raises(ValueError, match="unknown token mode"):
        KoreanTokenizer("characters")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["morpheme", "whitespace"])
def test_scores_equal_a_plain_rouge_scorer_on_korean_rows(rows, mode: str) -> None:
    predictions = [r.dialogue.split("\n")[0] for r in rows] + [r.summary for r in rows[1:]] + ["", "#Person1#"]
    references = [r.summary for r in rows] + [r.summary for r in rows[:-1]] + [rows[0].summary, ""]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=KoreanTokenizer(mode))
    plain = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    expected = [{t: s.fmeasure for t, s in scores.items()} for scores in plain]
    got = score_rows(predictions, references, mode)
    assert [{t: row[t] for t in ROUGE_TYPES} for row in got] == expected
    assert all(row["final"] == pytest.approx(100 * sum(row[t] for t in ROUGE_TYPES) / 3) for row in got)


def test_each_distinct_text_is_tokenized_once_in_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_tokenizers", {})
    batches: list[list[str]] = []
    morphemes = KoreanTokenizer._morphemes

    def counting(texts: list[str]) -> list[list[str]]:
        batches.append(list(texts))
        return morphemes(texts)

    monkeypatch.setattr(KoreanTokenizer, "_morphemes", staticmethod(counting))
    score_rows([APPLE, SKY, APPLE], [SKY, [APPLE, SKY], SKY])
    rouge([APPLE], [SKY])
    assert batches == [[APPLE, SKY]]
    assert korean_tokenizer() is korean_tokenizer()


def test_aggregate_and_input_checks() -> None:
    assert aggregate([]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "final": 0.0}
    assert rouge([""], [APPLE])["final"] == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_rows([APPLE, SKY], [APPLE])
    with pytest.raises(ValueError, match="row 0: no reference"):
        score_rows([APPLE], [[]])
