"""Competition CSVs: reading, validation, cleaning, and the tokens every tokenizer must keep whole.

Labelled files have `fname,dialogue,summary[,topic]`, unlabelled ones `fname,dialogue`. Files are UTF-8 with or
without BOM, LF or CRLF. Any problem raises `DataError` naming the file, the row (1-based data row, header
excluded) and the column; nothing is dropped silently: every cleaning step is counted in the `DataReport`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

SPEAKER_TOKENS = [f"#Person{i}#" for i in range(1, 8)]
ENTITY_TOKENS = [
    "#PhoneNumber#",
    "#Address#",
    "#DateOfBirth#",
    "#PassportNumber#",
    "#SSN#",
    "#CardNumber#",
    "#CarNumber#",
    "#Email#",
]
SPECIAL_TOKENS = SPEAKER_TOKENS + ENTITY_TOKENS
TAG_PATTERN = re.compile(r"#[A-Za-z]+\d*#")

LABELLED_COLUMNS = ("fname", "dialogue", "summary")
UNLABELLED_COLUMNS = ("fname", "dialogue")
_NOISE = {
    "literal \\n": (re.compile(r"\\n"), "\n"),
    "<br>": (re.compile(r"<br\s*/?>", re.IGNORECASE), "\n"),
    "CR line ends": (re.compile(r"\r\n?"), "\n"),
    "trailing spaces": (re.compile(r"[ \t]+(?=\n|$)"), ""),
}


class DataError(ValueError):
    """Invalid input data; `problems` lists every (file, row, column, message) found."""

    def __init__(self, problems: list[tuple[str, int | None, str | None, str]]):
        self.problems = problems
        shown = [_describe(*p) for p in problems[:20]]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} data problem(s):\n  " + "\n  ".join(shown) + more)


def _describe(file: str, row: int | None, column: str | None, message: str) -> str:
    where = file
    if row is not None:
        where += f", row {row}"
    if column is not None:
        where += f", column '{column}'"
    return f"{where}: {message}"


@dataclass(frozen=True)
class Dialogue:
    fname: str
    dialogue: str
    summary: str | None = None
    topic: str | None = None


@dataclass
class DataReport:
    """What reading a file did: rows read and kept, and what cleaning changed."""

    path: str
    rows: int = 0
    labelled: bool = False
    cleaned_cells: Counter = field(default_factory=Counter)
    digest: str = ""
    selection: str = ""  # how the rows were chosen from the file, when not all of them

    def summary(self) -> str:
        cleaned = ", ".join(f"{k}: {v}" for k, v in sorted(self.cleaned_cells.items())) or "none"
        return f"{self.path}: {self.rows} rows ({'labelled' if self.labelled else 'unlabelled'}); cleaned cells: {cleaned}"


@dataclass
class DialogueSet:
    rows: list[Dialogue]
    report: DataReport

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def fnames(self) -> list[str]:
        return [r.fname for r in self.rows]

    @property
    def dialogues(self) -> list[str]:
        return [r.dialogue for r in self.rows]

    @property
    def summaries(self) -> list[str]:
        return [r.summary or "" for r in self.rows]

    def head(self, n: int | None) -> "DialogueSet":
        """The first n rows (all when n is None); the report keeps the full file's digest."""
        if n is None or n >= len(self.rows):
            return self
        return self.subset(self.rows[:n], f"first {n} rows")

    def subset(self, rows: list[Dialogue], how: str) -> "DialogueSet":
        """Some of the rows; the report keeps the file's path and digest and records how they were chosen."""
        selection = f"{self.report.selection}; {how}" if self.report.selection else how
        report = DataReport(self.report.path, len(rows), self.report.labelled, self.report.cleaned_cells,
                            self.report.digest, selection)  # fmt: skip
        return DialogueSet(list(rows), report)


def clean_text(text: str) -> tuple[str, list[str]]:
    """Normalise line breaks and the known noise; returns (text, the kinds of noise that were found)."""
    found = []
    for kind, (pattern, repl) in _NOISE.items():
        text, n = pattern.subn(repl, text)
        if n:
            found.append(kind)
    return text.strip(), found


def read_dialogues(path: str | Path, require_summary: bool | None = None) -> DialogueSet:
    """Read and validate a competition CSV.

    require_summary: True demands a `summary` column, False ignores it, None (default) uses it when present.
    """
    path = Path(path)
    name = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError([(name, None, None, "file not found")]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError([(name, None, None, f"not valid UTF-8 at byte {e.start} (line {line})")]) from None

    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise DataError([(name, None, None, "empty file (no header)")])
    header = [h.strip() for h in header]
    missing = [c for c in UNLABELLED_COLUMNS if c not in header]
    if require_summary and "summary" not in header:
        missing.append("summary")
    if missing:
        raise DataError([(name, None, c, f"required column missing (header: {','.join(header)})") for c in missing])
    labelled = "summary" in header and require_summary is not False
    wanted = [*LABELLED_COLUMNS, "topic"] if labelled else list(UNLABELLED_COLUMNS)
    index = {c: header.index(c) for c in wanted if c in header}

    problems: list[tuple[str, int | None, str | None, str]] = []
    report = DataReport(name, labelled=labelled, digest=hashlib.sha256(raw).hexdigest()[:16])
    rows: list[Dialogue] = []
    first_row: dict[str, int] = {}
    for row_no, record in enumerate(reader, start=1):
        if not any(cell.strip() for cell in record):
            problems.append((name, row_no, None, "blank row"))
            continue
        if len(record) != len(header):
            problems.append((name, row_no, None, f"{len(record)} fields, header has {len(header)}"))
            continue
        values: dict[str, str | None] = {}
        for column, i in index.items():
            cell = record[i]
            if column == "topic":
                values[column] = cell.strip() or None
                continue
            cleaned, found = clean_text(cell) if column != "fname" else (cell.strip(), [])
            if not cleaned:
                problems.append((name, row_no, column, "empty cell" + (" after cleaning" if cell.strip() else "")))
                continue
            for kind in found:
                report.cleaned_cells[f"{column}: {kind}"] += 1
            values[column] = cleaned
        fname = values.get("fname")
        if fname is not None:
            if fname in first_row:
                problems.append((name, row_no, "fname", f"duplicate fname '{fname}' (first at row {first_row[fname]})"))
            else:
                first_row[fname] = row_no
        if len(values) == len(index):
            rows.append(Dialogue(**values))  # type: ignore[arg-type]
    if problems:
        raise DataError(problems)
    if not rows:
        raise DataError([(name, None, None, "no data rows")])
    report.rows = len(rows)
    return DialogueSet(rows, report)


def rows_digest(fnames: list[str], references: list[str | None]) -> str:
    """Digest of the exact (fname, reference) pairs a score was computed on, independent of their order: two
    scores are comparable only when their digests are equal."""
    pairs = sorted(zip(fnames, [r or "" for r in references]))
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def dataset_rows_digest(data: "DialogueSet") -> str:
    return rows_digest(data.fnames, [r.summary for r in data.rows])


def fname_fraction(fname: str) -> float:
    """A stable number in [0, 1) from the fname alone (its SHA-256), so a split never depends on row order."""
    return int(hashlib.sha256(fname.encode("utf-8")).hexdigest()[:15], 16) / 16**15


def split_validation(data: "DialogueSet", fraction: float) -> tuple["DialogueSet", "DialogueSet"]:
    """(train, validation): the rows whose `fname_fraction` is below `fraction` become validation."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be between 0 and 1, got {fraction}")
    validation = [r for r in data.rows if fname_fraction(r.fname) < fraction]
    train = [r for r in data.rows if fname_fraction(r.fname) >= fraction]
    if not validation or not train:
        raise DataError([(data.report.path, None, "fname", f"a validation_fraction of {fraction} of {len(data)} rows "
                          f"leaves {len(train)} training and {len(validation)} validation rows; give a validation file")])  # fmt: skip
    return data.subset(train, f"{fraction:g} held out by fname hash"), data.subset(validation, f"{fraction:g} by fname hash")


def check_disjoint(sets: dict[str, "DialogueSet"]) -> None:
    """Raise DataError when two roles share a row (the same fname, or the same dialogue text under another fname),
    naming the fnames."""
    problems: list[tuple[str, int | None, str | None, str]] = []
    names = list(sets)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = sets[first], sets[second]
            shared = sorted(set(a.fnames) & set(b.fnames))
            texts = {r.dialogue: r.fname for r in a.rows}
            same_text = sorted(f"{texts[r.dialogue]}={r.fname}" for r in b.rows if r.dialogue in texts and texts[r.dialogue] != r.fname)
            for kind, found in (("fname", shared), ("dialogue", same_text)):
                if found:
                    shown = ", ".join(found[:10]) + (f" ... ({len(found)} in all)" if len(found) > 10 else "")
                    problems.append((f"{first} ({a.report.path}) and {second} ({b.report.path})", None, kind,
                                     f"{len(found)} shared row(s): {shown}"))  # fmt: skip
    if problems:
        raise DataError(problems)


@dataclass
class DataRoles:
    """Train fits; validation chooses (epochs, weights, variants, the champion's ranking); test reports."""

    train: DialogueSet
    validation: DialogueSet
    test: DialogueSet | None

    def sets(self) -> dict[str, DialogueSet]:
        return {"train": self.train, "validation": self.validation, **({"test": self.test} if self.test else {})}


def load_data_roles(
    train_path: str | Path | None,
    validation_path: str | Path | None = None,
    test_path: str | Path | None = None,
    *,
    validation_fraction: float = 0.2,
    limits: tuple[int | None, int | None, int | None] = (None, None, None),
) -> DataRoles:
    """Read the three roles. No validation file: `validation_fraction` of the training rows (by fname hash). No
    files at all: the bundled sample's train (split) and dev (as test). `limits` keep the first N rows of train,
    validation and test. Rows shared between roles are refused (DataError naming the fnames)."""
    train = read_dialogues(train_path or sample_data_path("train"), require_summary=True)
    if validation_path:
        validation = read_dialogues(validation_path, require_summary=True)
    else:
        train, validation = split_validation(train, validation_fraction)
    if test_path is None and train_path is None:
        test_path = sample_data_path("dev")
    test = read_dialogues(test_path, require_summary=True) if test_path else None
    max_train, max_validation, max_test = limits
    roles = DataRoles(train.head(max_train), validation.head(max_validation), test.head(max_test) if test else None)
    check_disjoint(roles.sets())
    return roles


def write_dialogues(data: DialogueSet, path: str | Path) -> Path:
    """Write rows as a competition CSV (`fname,dialogue[,summary,topic]`, UTF-8, quoted), readable by `read_dialogues`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [*LABELLED_COLUMNS, "topic"] if data.report.labelled else list(UNLABELLED_COLUMNS)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([getattr(r, c) or "" for c in columns] for r in data.rows)
    return path


def sample_data_path(split: str = "train") -> Path:
    """The bundled Korean sample set: `train` (labelled), `dev` (labelled) or `test` (unlabelled)."""
    if split not in {"train", "dev", "test"}:
        raise ValueError(f"unknown sample split '{split}' (train, dev, test)")
    return Path(str(resources.files("dialogsum") / "sample_data" / f"{split}.csv"))


def protect_tags(text: str) -> list[tuple[str, bool]]:
    """Split text into (piece, is_tag) so callers can keep `#Person1#`-style tags whole."""
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for m in TAG_PATTERN.finditer(text):
        if m.start() > pos:
            pieces.append((text[pos : m.start()], False))
        pieces.append((m.group(0), True))
        pos = m.end()
    if pos < len(text):
        pieces.append((text[pos:], False))
    return pieces
