"""The table `bench/compare_trees.sh` ends with: base vs change, median over rounds.

  python bench/compare_table.py attention|train OUT_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    text = path.read_text()
    if path.name.startswith("attention"):
        return json.loads(text)["rows"]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _measures(part: str, row: dict) -> tuple[str, dict] | None:
    """(row label, {measure: value}) of one benchmark row, or None for rows not compared."""
    if part == "attention":
        if "seq" not in row:
            return None
        return (f"{row['backend']} {row['seq'] // 1024}K",
                {"fwd TF/s": row["fwd_tflops"], "fwd+bwd TF/s": row["fwd_bwd_tflops"]})
    if "step_s" not in row:
        return None
    return (f"{row['model']} {row['remat']} {row['seq'] // 1024}K",
            {"step s": row["step_s"], "MFU %": 100 * (row["mfu"] or 0),
             "peak GiB": row["peak_gib"]})


def main(part: str, out: Path) -> None:
    values: dict[tuple[str, str, str], list[float]] = {}
    for path in sorted(out.glob(f"{part}_*_*.json")):
        name = path.stem.split("_")[1]
        for row in _rows(path):
            found = _measures(part, row)
            if found is None:
                continue
            label, measures = found
            for measure, value in measures.items():
                values.setdefault((label, measure, name), []).append(value)
    labels = sorted({(label, measure) for label, measure, _ in values})
    print("| case | measure | base | change | change / base |\n| --- | --- | --- | --- | --- |")
    for label, measure in labels:
        base = values.get((label, measure, "base"))
        change = values.get((label, measure, "change"))
        if not base or not change:
            continue
        b, c = statistics.median(base), statistics.median(change)
        print(f"| {label} | {measure} | {b:.3f} | {c:.3f} | {c / b:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
