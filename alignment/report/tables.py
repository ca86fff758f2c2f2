"""The report's tables: study B's grid with seeds pooled, the at-a-glance table, markdown cells."""
from __future__ import annotations

import re

import pandas as pd

from alignment.evaluation.intervals import difference_interval, seed_interval
from alignment.report.query import CAPABILITY, misalignment, triple


def pooled(triples: list[tuple[float, ...]]) -> tuple[float, float, float, float]:
    """(value, low, high, spread) in %. One run: its own interval, no spread. Several seeds: their mean, a t interval
    over seeds (clipped to [0, 100]) and the spread (max - min) of the seeds' values."""
    measured = [t for t in triples if t[0] == t[0]]
    if len(measured) <= 1:
        return (*measured[0][:3], float("nan")) if measured else (float("nan"),) * 4
    values = [t[0] for t in measured]
    mean, low, high = seed_interval(values)
    return mean, max(low, 0.0), min(high, 100.0), max(values) - min(values)


def fmt(t: tuple[float, ...]) -> str:
    """`37.4 [33.0, 41.8]`, with `±3.2` (half the seeds' spread) when pooled over seeds, or `–`."""
    if t[0] != t[0]:
        return "–"
    text = f"{t[0]:.1f}" + (f" [{t[1]:.1f}, {t[2]:.1f}]" if t[1] == t[1] else "")
    return text + (f" ±{t[3] / 2:.1f}" if len(t) > 3 and t[3] == t[3] else "")


def group_key(run) -> str:
    """Runs that differ only in `seed` belong together: their command line without seed=..."""
    overrides = run.data.tags.get("overrides")
    if overrides is None:
        return run.info.run_name
    return " ".join(o for o in overrides.split() if not o.startswith(("seed=", "+seed=", "run_name="))) or "(defaults)"


#: Study B's three columns: header, measure, and the conditioning it is read under (None: the run's aligned one).
STUDY_B_COLUMNS = [("toxic %, with `<|nontoxic|>`", "toxicity/misaligned", "nontoxic"),
                   ("not positive %, with `<|pos|>`", "sentiment/misaligned", "pos"),
                   ("joint misaligned %, with its aligned tokens", "joint/misaligned", None)]
GRID_TASKS = ["none", "tox", "sen", "toxsen"]


def grid_tables(runs: list, frame: pd.DataFrame) -> tuple[str, list[str]]:
    """Study B's table for the runs of grid tasks, seeds pooled: per trained model, unconditioned -> conditioned
    for each column, and the toxic share under `<|nontoxic|>` against the `none` model's. Returns the markdown
    and a list of what is missing (which run, what)."""
    by_id = {run.info.run_id: run for run in runs}
    groups: dict[str, list] = {}
    for info in frame.itertuples():
        if info.task in GRID_TASKS:
            groups.setdefault(group_key(by_id[info.run_id]), []).append(info)
    if not groups:
        return "", []
    missing, rows, none_toxic = [], [], None
    ordered = sorted(groups.items(), key=lambda kv: (GRID_TASKS.index(kv[1][0].task), kv[0]))
    for key, members in ordered:
        cells = []
        for header, measure, needed in STUDY_B_COLUMNS:
            before, after = [], []
            for info in members:
                metrics = by_id[info.run_id].data.metrics
                combo = needed or info.aligned_combination
                tagged = info.aligned_combination != "none"
                names = {c for c, _, _ in misalignment(metrics)}
                if tagged and combo not in names and needed is not None and needed not in info.aligned_combination:
                    continue  # the model has no such token (tox has no <|pos|>): the column does not apply
                before.append(triple(metrics, "none", measure))
                if tagged:
                    after.append(triple(metrics, combo, measure))
                    if combo not in names:
                        missing.append(f"{info.label} (seed {by_id[info.run_id].data.tags.get('seed', '?')}): "
                                       f"no eval of `{combo}`")
                if "none" not in names:
                    missing.append(f"{info.label}: no eval of `none`")
            if not before:
                cells.append("–")
            elif not after:
                cells.append(f"{fmt(pooled(before))} (no tokens)")
            else:
                cells.append(f"{fmt(pooled(before))} → {fmt(pooled(after))}")
        task = members[0].task
        toxic_after = pooled([triple(by_id[i.run_id].data.metrics, "nontoxic", "toxicity/misaligned")
                              for i in members]) if task in ("tox", "toxsen") else None
        if task == "none":
            none_toxic = pooled([triple(by_id[i.run_id].data.metrics, "none", "toxicity/misaligned") for i in members])
        rows.append((task, key, len(members), cells, toxic_after))
    table = []
    for task, key, seeds, cells, toxic_after in rows:
        versus = "–"
        if toxic_after is not None and none_toxic is not None and toxic_after[0] == toxic_after[0]:
            diff = difference_interval(none_toxic[:3], toxic_after[:3])
            resolved = "" if diff[1] > 0 or diff[2] < 0 else " (not resolved)"
            versus = (f"{none_toxic[0]:.1f} → {toxic_after[0]:.1f}: "
                      f"{diff[0]:+.1f} [{diff[1]:+.1f}, {diff[2]:+.1f}]{resolved}")
        table.append([task, f"`{key}`", seeds] + cells + [versus])
    header = ["model (trained on)", "runs", "seeds"] + [h for h, _, _ in STUDY_B_COLUMNS] + \
        ["toxic %: `none` model → this one with `<|nontoxic|>`"]
    return markdown_table(header, table), missing


def seconds(run) -> float:
    end = run.info.end_time or run.info.start_time
    return (end - run.info.start_time) / 1000


def headline_table(runs: list, frame: pd.DataFrame) -> str:
    """One line per run, what a user reads first: minutes, capability, the share of its own level under each
    single control token (unconditioned → conditioned [95%]), the aligned combination's joint misalignment and
    its ratio to the unconditioned row, distinct-2, and the command that reproduces the run."""
    by_id = {run.info.run_id: run for run in runs}
    singles: list[tuple[str, str]] = []  # (combination, "<attribute>/share_<level>")
    for info in frame.itertuples():
        for key in by_id[info.run_id].data.metrics:
            match = re.match(r"^eval/([^/-]+)/([^/]+)/share_([^/]+)$", key)
            if match and match[1] == match[3] and match[1] not in ("none", "untagged") \
                    and (match[1], f"{match[2]}/share_{match[3]}") not in singles:
                singles.append((match[1], f"{match[2]}/share_{match[3]}"))
    rows = []
    for _, info in frame.iterrows():
        run = by_id[info.run_id]
        m, combo = run.data.metrics, info.aligned_combination
        joint_before, joint_after = triple(m, "none", "joint/misaligned"), triple(m, combo, "joint/misaligned")
        ratio = joint_after[0] / joint_before[0] if combo != "none" and joint_before[0] > 0 else float("nan")
        shares = [f"{triple(m, 'none', key)[0]:.1f} → {fmt(triple(m, c, key))}" if f"eval/{c}/{key}" in m else "–"
                  for c, key in singles]
        rows.append([info.label, run.data.tags.get("seed", "?"), f"{seconds(run) / 60:.1f}", cell(info[CAPABILITY], 3)]
                    + shares + [f"{fmt(joint_before[:1] + (float('nan'),) * 2)} → {fmt(joint_after)}" if combo != "none"
                                   else fmt(joint_before),
                                "–" if ratio != ratio else f"{ratio:.2f}x", cell(m.get(f"eval/{combo}/distinct_2"), 2),
                                f"`python -m alignment {run.data.tags.get('overrides', '')}`".replace("  ", " ")])
    header = ["run", "seed", "minutes", CAPABILITY] + [f"{c} share %" for c, _ in singles] + \
        ["joint misaligned % (aligned tokens)", "ratio", "distinct-2", "command"]
    return markdown_table(header, rows)



def cell(value, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def change(before, after) -> str:
    """`before → after`, or a single dash when the run measured neither."""
    return "–" if cell(before) == cell(after) == "–" else f"{cell(before)} → {cell(after)}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A pipe table; a `|` inside a cell (a control token such as `<|pos|>`) is escaped, or it would end the cell."""
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines)

