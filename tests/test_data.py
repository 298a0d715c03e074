"""Competition CSVs (validation errors that name file, row and column; cleaning that is counted) and the
dialogue tags and EOS targets with the real KoBART and Qwen3 tokenizers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dialogsum.config import load_model_config
from dialogsum.data import (
    SPECIAL_TOKENS,
    DataError,
    Dialogue,
    check_disjoint,
    dataset_rows_digest,
    load_data_roles,
    read_dialogues,
    rows_digest,
    sample_data_path,
    split_validation,
    write_dialogues,
)
from dialogsum.features import IGNORE_INDEX, encode_example, prompt_ids
from dialogsum.models import load_tokenizer

HEADER = "fname,dialogue,summary,topic\n"
GOOD_ROW = 'train_0,"#Person1#: 안녕하세요.\n#Person2#: 네, 안녕하세요.","#Person1#과 #Person2#가 인사합니다.",인사\n'
DIALOGUE = "#Person1#: 여권을 잃어버렸어요. 번호는 #PassportNumber#예요.\n#Person2#: 대사관에 연락해 보세요."
SUMMARY = "#Person1#은 여권을 잃어버려서 #Person2#에게 도움을 청합니다."


def write(tmp_path: Path, content: str | bytes, name: str = "data.csv") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def problems_of(path: Path, **kwargs) -> DataError:
    with pytest.raises(DataError) as error:
        read_dialogues(path, **kwargs)
    return error.value


def error_lines(error: DataError) -> list[str]:
    """The message's problem lines (after the 'N data problem(s):' line)."""
    return [line.strip() for line in str(error).splitlines()[1:]]


@pytest.mark.real_assets("labeled")
def test_real_labelled_file_reads_with_counted_cleaning(real_asset: Callable[[str], Path]) -> None:
    data = read_dialogues(real_asset("labeled"))
    assert len(data) == 400 and data.report.labelled and data.report.rows == 400
    assert data.rows[0].fname == "dev_0" and data.rows[0].topic == "의사 상담"
    assert all("#Person1#" in d for d in data.dialogues)
    assert data.report.cleaned_cells == {"dialogue: trailing spaces": 95}
    assert "400 rows (labelled); cleaned cells: dialogue: trailing spaces: 95" in data.report.summary()


@pytest.mark.real_assets("unlabeled")
def test_real_unlabelled_file_reads(real_asset: Callable[[str], Path]) -> None:
    data = read_dialogues(real_asset("unlabeled"))
    assert len(data) == 499 and not data.report.labelled
    with pytest.raises(DataError, match="column 'summary': required column missing"):
        read_dialogues(real_asset("unlabeled"), require_summary=True)


def test_bundled_sample_set_has_at_least_60_korean_dialogues() -> None:
    splits = {split: read_dialogues(sample_data_path(split)) for split in ("train", "dev", "test")}
    assert sum(len(s) for s in splits.values()) >= 60
    assert splits["train"].report.labelled and splits["dev"].report.labelled and not splits["test"].report.labelled


# --- data roles -----------------------------------------------------------------------------------------


def test_validation_split_is_by_fname_hash_whatever_the_row_order() -> None:
    data = read_dialogues(sample_data_path("train"))
    train, validation = split_validation(data, 0.2)
    reversed_data = data.subset(list(reversed(data.rows)), "reversed")
    _, validation_again = split_validation(reversed_data, 0.2)
    assert sorted(validation.fnames) == sorted(validation_again.fnames)
    assert not set(train.fnames) & set(validation.fnames) and len(train) + len(validation) == len(data)
    assert 0.1 < len(validation) / len(data) < 0.35
    assert validation.report.selection == "0.2 by fname hash" and validation.report.digest == data.report.digest


def test_rows_digest_is_order_free_and_changes_with_rows_or_references() -> None:
    data = read_dialogues(sample_data_path("dev"))
    digest = dataset_rows_digest(data)
    assert dataset_rows_digest(data.subset(list(reversed(data.rows)), "reversed")) == digest
    assert dataset_rows_digest(data.head(19)) != digest
    assert rows_digest(data.fnames, [s + "." for s in data.summaries]) != digest


def test_rows_shared_by_two_roles_are_named_by_fname_and_by_dialogue(tmp_path: Path) -> None:
    data = read_dialogues(sample_data_path("dev"))
    renamed = data.subset([Dialogue("copy_of_dev_3", data.rows[3].dialogue, "다른 요약")], "one renamed row")
    with pytest.raises(DataError) as caught:
        check_disjoint({"train": data.head(5), "test": data.subset(data.rows[2:7], "rows 2-6")})
    assert "3 shared row(s): dev_2, dev_3, dev_4" in str(caught.value) and "column 'fname'" in str(caught.value)
    with pytest.raises(DataError, match="dev_3=copy_of_dev_3") as caught:
        check_disjoint({"validation": data, "test": renamed})
    assert "column 'dialogue'" in str(caught.value)


def test_default_roles_and_written_files_round_trip(tmp_path: Path) -> None:
    roles = load_data_roles(None)
    assert roles.test is not None and roles.test.report.path == str(sample_data_path("dev"))
    path = write_dialogues(roles.validation, tmp_path / "validation.csv")
    again = read_dialogues(path)
    assert again.rows == roles.validation.rows and dataset_rows_digest(again) == dataset_rows_digest(roles.validation)
    limited = load_data_roles(sample_data_path("train"), sample_data_path("dev"), limits=(10, 5, None))
    assert (len(limited.train), len(limited.validation), limited.test) == (10, 5, None)


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "fname,dialogue\ntrain_0,안녕\n")
    error = problems_of(path, require_summary=True)
    assert f"{path}, column 'summary': required column missing (header: fname,dialogue)" in str(error)
    path = write(tmp_path, "id,dialogue,summary\n1,안녕,인사\n", "no_fname.csv")
    assert f"{path}, column 'fname': required column missing" in str(problems_of(path))


def test_empty_cell_names_file_row_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + GOOD_ROW + 'train_1,"#Person1#: 네.",  ,\n')
    error = problems_of(path)
    assert error.problems == [(str(path), 2, "summary", "empty cell")]
    assert error_lines(error) == [f"{path}, row 2, column 'summary': empty cell"]


def test_cell_that_cleaning_empties_is_an_empty_cell(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + GOOD_ROW + 'train_1,"#Person1#: 네.",<br>,\n')
    assert error_lines(problems_of(path)) == [f"{path}, row 2, column 'summary': empty cell after cleaning"]


def test_duplicate_fname_names_both_rows(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + GOOD_ROW + GOOD_ROW)
    assert error_lines(problems_of(path)) == [
        f"{path}, row 2, column 'fname': duplicate fname 'train_0' (first at row 1)"
    ]


def test_wrong_field_count_names_the_row(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + GOOD_ROW + "train_1,안녕,인사,주제,덤\n")
    assert error_lines(problems_of(path)) == [f"{path}, row 2: 5 fields, header has 4"]


def test_non_utf8_bytes_are_reported_with_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, (HEADER + GOOD_ROW).encode("utf-8") + "train_1,안녕,인사,주제\n".encode("cp949"))
    error = str(problems_of(path))
    assert f"{path}: not valid UTF-8 at byte" in error and "(line 4)" in error


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + GOOD_ROW + 'train_1,,"요약",\n' + GOOD_ROW + "\n" + "train_2,a,b\n")
    assert error_lines(problems_of(path)) == [
        f"{path}, row 2, column 'dialogue': empty cell",
        f"{path}, row 3, column 'fname': duplicate fname 'train_0' (first at row 1)",
        f"{path}, row 4: blank row",
        f"{path}, row 5: 3 fields, header has 4",
    ]


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    text = (HEADER + GOOD_ROW + 'train_1,"#Person1#: 여보세요?\n#Person2#: 네.",통화합니다.,전화\n').replace("\n", "\r\n")
    data = read_dialogues(write(tmp_path, "\ufeff".encode("utf-8") + text.encode("utf-8")))
    assert data.fnames == ["train_0", "train_1"]
    assert data.rows[1].dialogue == "#Person1#: 여보세요?\n#Person2#: 네."
    assert data.rows[1].summary == "통화합니다." and data.rows[1].topic == "전화"
    assert data.report.cleaned_cells == {"dialogue: CR line ends": 2}


def test_literal_newlines_and_br_are_cleaned_and_counted(tmp_path: Path) -> None:
    row = r'train_1,"#Person1#: 안녕.\n#Person2#: 네.<br>#Person1#: 잘 가.","작별 인사를<BR/>합니다.",인사' + "\n"
    data = read_dialogues(write(tmp_path, HEADER + GOOD_ROW + row))
    assert data.rows[1].dialogue == "#Person1#: 안녕.\n#Person2#: 네.\n#Person1#: 잘 가."
    assert data.rows[1].summary == "작별 인사를\n합니다."
    assert data.report.cleaned_cells == {"dialogue: literal \\n": 1, "dialogue: <br>": 1, "summary: <br>": 1}


# --- tokenizers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kobart(real_asset: Callable[[str], Path]):
    cfg = load_model_config("kobart", {"tokenizer.path": str(real_asset("kobart-tokenizer"))})
    return cfg, load_tokenizer(cfg)


@pytest.fixture(scope="module")
def qwen3(real_asset: Callable[[str], Path]):
    cfg = load_model_config("qwen3-4b", {"tokenizer.path": str(real_asset("qwen3-tokenizer"))})
    return cfg, load_tokenizer(cfg)


@pytest.fixture(scope="module")
def sample_trained():
    """A tokenizer trained from the bundled sample's training rows, as a tiny model without tokenizer.path gets."""
    cfg = load_model_config("kobart-tiny")
    train = read_dialogues(sample_data_path("train"))
    return cfg, load_tokenizer(cfg, train.dialogues + train.summaries)


@pytest.mark.parametrize(
    "model",
    [
        "sample_trained",
        pytest.param("kobart", marks=pytest.mark.real_assets("kobart-tokenizer")),
        pytest.param("qwen3", marks=pytest.mark.real_assets("qwen3-tokenizer")),
    ],
)
def test_every_dialogue_tag_is_one_token(model: str, request: pytest.FixtureRequest) -> None:
    _, tokenizer = request.getfixturevalue(model)
    ids = {tag: tokenizer(tag, add_special_tokens=False)["input_ids"] for tag in SPECIAL_TOKENS}
    assert {tag: len(i) for tag, i in ids.items() if len(i) != 1} == {}
    assert len({i[0] for i in ids.values()}) == len(SPECIAL_TOKENS)
    in_text = tokenizer("#Person2#에게 #PhoneNumber#로 전화", add_special_tokens=False)["input_ids"]
    assert ids["#Person2#"][0] in in_text and ids["#PhoneNumber#"][0] in in_text


@pytest.mark.real_assets("kobart-tokenizer")
def test_kobart_targets_end_with_eos_and_tags_survive_decoding(kobart) -> None:
    cfg, tokenizer = kobart
    example = encode_example(cfg, tokenizer, DIALOGUE, SUMMARY)
    assert example["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in example["labels"][:-1]
    assert example["input_ids"][0] == tokenizer.bos_token_id and example["input_ids"][-1] == tokenizer.eos_token_id
    decoded = tokenizer.decode(example["labels"], skip_special_tokens=True)
    assert "#Person1#" in decoded and "#Person2#" in decoded and tokenizer.eos_token not in decoded
    assert "#PassportNumber#" in tokenizer.decode(example["input_ids"], skip_special_tokens=True)


@pytest.mark.real_assets("kobart-tokenizer")
def test_kobart_long_summary_is_cut_before_the_eos(kobart) -> None:
    cfg, tokenizer = kobart
    example = encode_example(cfg, tokenizer, DIALOGUE, SUMMARY * 40)
    assert len(example["labels"]) == cfg.training.max_target_length
    assert example["labels"][-1] == tokenizer.eos_token_id


@pytest.mark.real_assets("qwen3-tokenizer")
def test_qwen3_chat_prompt_is_masked_and_the_target_ends_with_eos(qwen3) -> None:
    cfg, tokenizer = qwen3
    assert cfg.prompt.format == "chat" and tokenizer.eos_token == "<|im_end|>"
    prompt = prompt_ids(cfg, tokenizer, DIALOGUE)
    example = encode_example(cfg, tokenizer, DIALOGUE, SUMMARY)
    summary_ids = tokenizer(SUMMARY, add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt + summary_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + summary_ids + [tokenizer.eos_token_id]
    rendered = tokenizer.decode(prompt)
    assert "<|im_start|>system" in rendered and rendered.endswith("<|im_start|>assistant\n")
    assert DIALOGUE in rendered
    assert "#Person1#" in tokenizer.decode(example["labels"][len(prompt) :], skip_special_tokens=True)
