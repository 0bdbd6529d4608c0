"""Two ``datta-kernels demo`` runs side by side: which rows differ, and ``datta_cal``'s (and its
oracle's) accuracy before -> after per stream, with the goal margins of both runs.

    python bench/compare_demo_runs.py OLD.json NEW.json [OLD5.json NEW5.json ...] > notes.md

Pairs of ``results.json`` files (each pair one severity).  No timing: accuracies as recorded.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from datta_kernels.benchmarking import describe_machine, provenance
from datta_kernels.eval.report import goal_for, short_name

STREAMS = ("single", "single_noniid", "mixed", "dynamic", "dynamic_random")
ROWS = ("datta_cal", "datta_cal_oracle")


def table(doc: dict) -> dict:
    return {(r["method"], r["stream"], r["batch_size"]): 100.0 * r["accuracy"] for r in doc["results"]}


def margin(t: dict, stream: str, bs: int) -> float:
    """``datta_cal`` against the best baseline of the goal (the label-sorted stream: the source model)."""
    return t["datta_cal", stream, bs] - max(t[b, stream, bs] for b in goal_for(stream)[0])


def compare(old_path: str, new_path: str) -> None:
    old_doc, new_doc = json.load(open(old_path)), json.load(open(new_path))
    old, new = table(old_doc), table(new_doc)
    sev = (new_doc.get("meta", {}).get("config") or {}).get("severity", "?")
    same = [k for k in new if k[0] not in ROWS and old.get(k) == new[k]]
    other = [k for k in new if k[0] not in ROWS and old.get(k) != new[k]]
    print(f"## {old_path} -> {new_path} (severity {sev})\n")
    print(f"- rows other than {', '.join(ROWS)}: {len(same)} identical, {len(other)} differ"
          + (": " + ", ".join(map(str, other)) if other else "") + "\n")
    sizes = sorted({k[2] for k in new})
    for row in ROWS:
        print(f"`{row}`, accuracy % before -> after (points):\n")
        print("| bs | " + " | ".join(short_name(s) for s in STREAMS) + " |")
        print("|---" * (len(STREAMS) + 1) + "|")
        for bs in sizes:
            pairs = [(old[row, s, bs], new[row, s, bs]) for s in STREAMS]
            cells = [f"{a:.1f} -> {b:.1f} ({b - a:+.1f})" for a, b in pairs]
            print(f"| {bs} | " + " | ".join(cells) + " |")
        print()
    print("Goal margins of `datta_cal` (points against the best of source, tbn, bn_adapt, tent, dyn; "
          "label-sorted: against source; goal >= -0.5, >= 0 on label-sorted), before -> after:\n")
    print("| bs | " + " | ".join(short_name(s) for s in STREAMS) + " |")
    print("|---" * (len(STREAMS) + 1) + "|")
    met = {"before": 0, "after": 0}
    for bs in sizes:
        cells = []
        for s in STREAMS:
            goal = goal_for(s)[1]
            a, b = margin(old, s, bs), margin(new, s, bs)
            met["before"] += a >= goal - 1e-9      # the demo's verdict: the exact margin
            met["after"] += b >= goal - 1e-9
            cells.append(f"{a:+.1f} -> {b:+.1f}")
        print(f"| {bs} | " + " | ".join(cells) + " |")
    print(f"\nGoals met: {met['before']} -> {met['after']} of {len(sizes) * len(STREAMS)}\n")
    for name, doc in (("before", old_doc), ("after", new_doc)):
        for bs, rep in (doc.get("datta_cal") or {}).items():
            pre = rep.get("pre_streams") or {}
            if pre:
                print(f"- {name}, bs {bs}: pre blends on the validation streams (mean of the four, %): "
                      + "; ".join(f"({k}) {np.mean(list(v.values())):.3f}" for k, v in pre.items())
                      + f"; chosen {tuple(rep['pre_blend'])}")
    print()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+", help="OLD NEW pairs of results.json")
    args = p.parse_args()
    if len(args.files) % 2:
        p.error("give OLD NEW pairs")
    prov, m = provenance(), describe_machine()
    print("# Demo runs compared\n")
    print(f"- command: `{prov['command']}`\n- commit: {prov['commit']}\n- machine: {m.get('cpu', '')} "
          "(reads recorded results: no timing)\n")
    for i in range(0, len(args.files), 2):
        compare(args.files[i], args.files[i + 1])


if __name__ == "__main__":
    main()
