"""Where the GPU benchmarks find the real assets: one rule for all of them.

`shared/` (the real rows and tokenizers, README "Data") is looked for at `$DIALOGSUM_SHARED`, then inside the
checkout (`./shared`, as on the GPU machine, where the checkout is the working directory), then beside it
(`../shared`, as on a development machine). Tokenizers that `shared/` lacks come from `.test-assets/tokenizers/`
(`scripts/fetch_test_assets.sh`: the Llama-3 tokenizer). A benchmark that finds no labelled rows stops and names
every place it looked, unless it is allowed to train on the 64 bundled sample rows (`--allow-sample`).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_ENV = "DIALOGSUM_SHARED"
FETCHED_TOKENIZERS = REPO / ".test-assets" / "tokenizers"
LABELLED = "data/dialogsum-ko/labeled.csv"


def shared_roots() -> list[Path]:
    """The places `shared/` may be, in the order they are tried."""
    configured = os.environ.get(SHARED_ENV)
    return [*([Path(configured).expanduser()] if configured else []), REPO / "shared", REPO.parent / "shared"]


def shared_path(relative: str) -> Path | None:
    """`relative` under the first shared folder that has it; None when none has it."""
    return next((root / relative for root in shared_roots() if (root / relative).exists()), None)


def tokenizer_folder(name: str) -> Path | None:
    """The real tokenizer `tokenizers/NAME`: from `shared/`, else from `.test-assets/`; None when neither has it."""
    fetched = FETCHED_TOKENIZERS / name
    return shared_path(f"tokenizers/{name}") or (fetched if fetched.is_dir() else None)


def labelled_rows(rows: int | None, allow_sample: bool):
    """(the first `rows` labelled rows, all when None; a line saying which file they came from). Without the
    competition's labelled CSV in any shared folder: the bundled sample when `allow_sample`, else SystemExit."""
    from dialogsum.data import read_dialogues, sample_data_path

    if rows is not None and rows < 1:
        raise SystemExit(f"--rows takes a positive number of rows, not {rows}")
    path = shared_path(LABELLED)
    kind = "the competition's labelled rows"
    if path is None:
        if not allow_sample:
            looked = ", ".join(str(root / LABELLED) for root in shared_roots())
            raise SystemExit(f"no labelled rows: {LABELLED} is not at {looked}. Point ${SHARED_ENV} at the shared "
                             "folder, or pass --allow-sample to train on the 64 bundled sample rows instead.")  # fmt: skip
        path, kind = sample_data_path("train"), "the bundled sample rows: --allow-sample"
    data = read_dialogues(path, require_summary=True)
    chosen = data.head(rows)
    return chosen, f"{len(chosen)} of the {len(data)} rows of {path} ({kind})"
