"""Step 5 ranked by its worst margin against the plain alternatives, judged on a held-out
validation family (validation data only).

``calibrate``'s step 5 ranks DAFT's settings (off, a rate, the reliable-sample filter) by their
*mean* accuracy over five validation streams (single, mixed, dynamic, label-sorted, hard).  A
user's question, and the issue's goal, is another one: is the calibrated DATTA at least as good
as each plain alternative they could deploy instead (the source model, test-batch statistics,
``bn_adapt``, Tent, DYN) on *every* kind of stream?  A mean lets a gain on one stream (the hard
one, where fast rates help) pay for a loss on another (the long single-domain one, where they
drift).  The *margin* objective ranks a setting by its smallest margin over the five streams,
each against the best of those alternatives on that stream (ties: the mean).

Which objective picks a setting that carries over to corruptions it never saw?  The folds and
the candidates are ``bench/step5_lofo.py``'s (one validation family held out at a time; steps
1-4 from the demo's saved calibration, which saw every family, said plainly): this script reads
every candidate's accuracies on the tuning and held-out streams from
``bench/results/step5_lofo.md`` (a recorded run of the same model copy; one number is rerun
here and checked), runs the five alternatives on the same streams, and reports for each fold
the pick of each objective and its **goal margins** on the held-out family's five streams (the
demo's goal table: points against the best alternative; label-sorted against the source model;
a cell is met at >= -0.5, label-sorted at >= 0).

Rule fixed before the run (committed with this script, before its results): step 5's default
objective becomes the margin objective only if, summed over the six folds (two batch sizes x
three held-out families), its picks meet **at least as many** held-out goal cells as the mean
objective's picks **and** have the **higher mean** held-out goal margin.

    python bench/step5_margin.py --calibration 64=FILE --calibration 16=FILE
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

from _validation_setup import defined_batches, validation_streams, without_daft
from step5_lofo import fold, saved_calibrations

from datta_kernels.calibration import RIVALS, _stream_accuracy
from datta_kernels.eval.report import goal_for
from datta_kernels.eval.runner import METHODS, DemoConfig, run_lockstep
from datta_kernels.eval.streams import STREAMS, make_stream
from datta_kernels.eval.validation import VALIDATION, pool_of

TUNE = ("single", "mixed", "dynamic", "sorted", "hard")
LOFO = Path(__file__).resolve().parent / "results" / "step5_lofo.md"


def recorded() -> dict[tuple[int, str], dict[str, dict[str, float]]]:
    """``{(bs, family): {candidate: {column: accuracy}}}`` from ``step5_lofo.md``'s tables."""
    out: dict = {}
    bs = fam = cols = None
    for line in LOFO.read_text().splitlines():
        if m := re.match(r"## Batch size (\d+)", line):
            bs = int(m.group(1))
        elif m := re.match(r"### Held out: (\w+)", line):
            fam, cols = m.group(1), None
        elif line.startswith("| candidate |") and fam:
            cols = [c.strip() for c in line.strip("|").split("|")][1:]
        elif cols and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out.setdefault((bs, fam), {})[cells[0]] = dict(zip(cols, map(float, cells[1:])))
        elif not line.strip() and cols and out.get((bs, fam)):
            cols = None
    return out


def rival_accuracy(model, cfg: DemoConfig, pool, stream) -> dict[str, float]:
    adapters = {m: METHODS[m](copy.deepcopy(model), cfg.backend, cfg.lr, {}, stream) for m in RIVALS}
    return {r.method: 100.0 * r.accuracy for r in run_lockstep(adapters, stream, pool.batches(stream))}


def goal_margins(acc: dict[str, float], rivals: dict[str, dict[str, float]]) -> dict[str, float]:
    """The demo's goal margins on the held-out streams (:func:`goal_for`: label-sorted against
    the source)."""
    return {s: acc[s] - max(rivals[s][b] for b in goal_for(s)[0]) for s in STREAMS}


def met(margins: dict[str, float]) -> int:
    return sum(v >= goal_for(s)[1] for s, v in margins.items())


def main() -> None:
    title = "Step 5 by its worst margin against the plain alternatives"
    cfg, model, vdom, cals, _ = saved_calibrations(title, __doc__)
    table = recorded()
    summary = []
    for bs, path, cal in cals:
        print(f"## Batch size {bs}\n\n- calibration `{path}`\n")
        for i, fam in enumerate(VALIDATION):
            rows = table[(bs, fam)]
            tune, hard = fold(vdom, fam)
            tpool, tstreams = validation_streams(tune, bs, cfg.seed)
            hpool, hstreams = validation_streams(hard, bs, cfg.seed, kinds=("single",))
            streams = {k: (tpool, s) for k, s in tstreams.items()} | {"hard": (hpool, hstreams["single"])}
            if i == 0:      # the recorded table is this code's: rerun DAFT off on the hard stream
                off = without_daft(cal)
                again = _stream_accuracy(off.adapter(copy.deepcopy(model), backend=cfg.backend), hpool.x,
                                         hpool.y, hstreams["single"].batches)
                assert abs(again - rows["off"]["hard"]) < 0.006, (again, rows["off"]["hard"])
                print(f"- check: DAFT off on the hard tuning stream reruns to {again:.2f} % "
                      f"(recorded {rows['off']['hard']:.2f} %)\n")
            tune_rivals = {k: rival_accuracy(model, cfg, *ps) for k, ps in streams.items()}
            held = pool_of({k: v for k, v in vdom.items() if k.split("@")[0] == fam})
            held_rivals = {s: rival_accuracy(model, cfg, held,
                                             defined_batches(make_stream(held, s, bs, cfg.seed)))
                           for s in STREAMS}
            best = {k: max(v.values()) for k, v in tune_rivals.items()}
            mean5 = {n: sum(r[k] for k in TUNE) / len(TUNE) for n, r in rows.items()}
            worst = {n: min(r[k] - best[k] for k in TUNE) for n, r in rows.items()}
            pick_mean = max(rows, key=lambda n: mean5[n])
            pick_margin = max(rows, key=lambda n: (worst[n], mean5[n]))
            print(f"### Held out: {fam} (hard tuning stream over {', '.join(hard)})\n")
            print("| stream | " + " | ".join(RIVALS) + " |\n|---|" + "---|" * len(RIVALS))
            for k, v in [*tune_rivals.items(), *((f"held-out {s}", held_rivals[s]) for s in STREAMS)]:
                print(f"| {k} | " + " | ".join(f"{v[m]:.2f}" for m in RIVALS) + " |")
            print("\n| candidate | " + " | ".join(f"{k} margin" for k in TUNE)
                  + " | five mean | worst margin |\n|---|" + "---|" * (len(TUNE) + 2))
            for n, r in rows.items():
                print(f"| {n} | " + " | ".join(f"{r[k] - best[k]:+.2f}" for k in TUNE)
                      + f" | {mean5[n]:.2f} | {worst[n]:+.2f} |")
            print()
            for obj, pick in (("mean (step 5 now)", pick_mean), ("margin", pick_margin)):
                acc = {s: rows[pick][f"held-out {s}"] for s in STREAMS}
                g = goal_margins(acc, held_rivals)
                summary.append((bs, fam, obj, pick, g))
                print(f"- {obj} objective picks **{pick}**; held-out goal margins "
                      + ", ".join(f"{s} {v:+.2f}" for s, v in g.items())
                      + f" ({met(g)} of 5 met, mean {sum(g.values()) / len(g):+.2f})")
            print()
    print("## Summary: held-out goal margins of each objective's pick\n")
    print("| bs | held out | objective | pick | " + " | ".join(STREAMS) + " | met | mean |\n|---|---|---|---|"
          + "---|" * (len(STREAMS) + 2))
    for bs, fam, obj, pick, g in summary:
        print(f"| {bs} | {fam} | {obj} | {pick} | " + " | ".join(f"{g[s]:+.2f}" for s in STREAMS)
              + f" | {met(g)} | {sum(g.values()) / len(g):+.2f} |")
    print()
    for obj in ("mean (step 5 now)", "margin"):
        gs = [g for _, _, o, _, g in summary if o == obj]
        cells = [v for g in gs for v in g.values()]
        print(f"- {obj}: {sum(met(g) for g in gs)} of {len(cells)} held-out cells met, mean margin "
              f"{sum(cells) / len(cells):+.3f}, worst {min(cells):+.2f}")


if __name__ == "__main__":
    main()
