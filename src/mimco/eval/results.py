"""Result rows of evaluation commands (JSON lines + CSV per folder) and one table over many runs."""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from mimco.errors import MimcoError


def file_hash(path: str | Path) -> str:
    """First 12 hex digits of the file's SHA-256 (identifies the exact checkpoint evaluated)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def write_result(out_dir: str | Path, row: dict[str, Any]) -> Path:
    """Append ``row`` (command, checkpoint, metrics, config, ...) to results.jsonl and rewrite results.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    flat = [{**{k: v for k, v in r.items() if k not in ("metrics", "config")}, **r.get("metrics", {})}
            for r in read_results(out / "results.jsonl")]
    cols = list(dict.fromkeys(k for r in flat for k in r))
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(flat)
    return out / "results.jsonl"


def write_table(rows: list[dict[str, Any]], out: Path, header: str, name: str = "results") -> str:
    """``out/<name>.md`` (``header``, then the rows as a Markdown table) and ``out/<name>.csv``;
    returns the Markdown."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with (out / f"{name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="-")
        w.writeheader()
        w.writerows(rows)
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(md)
    return md


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Every result row under the given folders (results.jsonl files, searched recursively)."""
    rows = []
    for p in map(Path, paths):
        if not p.exists():
            raise MimcoError(f"{p} does not exist; pass run or result folders")
        files = [p] if p.is_file() else sorted(p.rglob("results.jsonl"))
        rows += [{"folder": str(f.parent), **r} for f in files for r in read_results(f)]
    if not rows:
        raise MimcoError(f"no results.jsonl under {', '.join(map(str, paths))}; run mimco knn / linprobe / finetune "
                         "first")
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per result: checkpoint, its hash, command, data, then every metric seen."""
    metrics = list(dict.fromkeys(k for r in rows for k in r.get("metrics", {})))
    head = ["checkpoint", "sha256", "command", "data", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r.get("metrics", {})
        cells = [r.get("name") or Path(str(r.get("checkpoint", ""))).name, r.get("sha256", ""), r.get("command", ""),
                 r.get("data", ""), *[f"{m[k]:.2f}" if isinstance(m.get(k), float) else m.get(k, "") for k in metrics]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
