"""The report's figures: the matrix as a coloured table, per-model validation curves, the timeline of children."""

from __future__ import annotations

from pathlib import Path

from dialogsum import figures
from dialogsum.pipeline.matrix import STATUS_COLOURS, pivot_matrix, status_of
from dialogsum.pipeline.store import held_gpus, started_ms
from dialogsum.tracking import KIND_TAG, MODEL_TAG, STATUS_TAG


def matrix_png(matrix, path: Path) -> Path:
    """The matrix as a table image, one line per cell (status, then scores), readable at the size the UI shows it."""
    wide = pivot_matrix(matrix).map(lambda cell: str(cell).replace(" (", "\n(").replace(" [", "\n["))
    fig, ax = figures.subplots(figsize=(1.6 + 1.5 * max(len(wide.columns), 1), 0.9 + 0.55 * max(len(wide), 1)), dpi=120)
    ax.axis("off")
    if not wide.empty:
        colours = [[STATUS_COLOURS.get(status_of(str(v)), "white") for v in row] for row in wide.values]
        table = ax.table(cellText=wide.values, rowLabels=wide.index, colLabels=wide.columns, cellColours=colours,
                         loc="upper center", cellLoc="center")  # fmt: skip
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 2.6)
    ax.set_title("dialogsum pipeline: model × stage", fontsize=11, loc="left")
    return figures.save(fig, path)


def curves_png(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """Validation `final` per epoch, one line per model; None when no model has a curve."""
    curves = {model: points for model, points in curves.items() if points}
    if not curves:
        return None
    fig, ax = figures.subplots(figsize=(6, 3.5), dpi=100)
    for model, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val_final (Korean ROUGE × 100)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figures.save(fig, path)


def timeline_png(parent, children: list, path: Path) -> Path:
    """One bar per child from its start to its end, coloured by status, labelled with its step, model and the GPUs
    it held."""
    t0 = parent.info.start_time
    fig, ax = figures.subplots(figsize=(7, 0.8 + 0.35 * max(len(children), 1)), dpi=100)
    for i, run in enumerate(children):
        start = (started_ms(run) - t0) / 1000
        end = ((run.info.end_time or run.info.start_time) - t0) / 1000
        colour = STATUS_COLOURS.get(run.data.tags.get(STATUS_TAG, ""), "#cccccc")
        ax.barh(i, max(end - start, 0.2), left=start, color=colour, edgecolor="black")
    ax.set_yticks(range(len(children)))
    ax.set_yticklabels([timeline_label(r) for r in children], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since pipeline start")
    return figures.save(fig, path)


def timeline_label(run) -> str:
    """`train: kobart [GPU 3]`; without the brackets for a stage that was not pinned to GPUs."""
    gpus = held_gpus(run)
    return f"{run.data.tags.get(KIND_TAG)}: {run.data.tags.get(MODEL_TAG, run.info.run_name)}" + (f" [{gpus}]" if gpus else "")
