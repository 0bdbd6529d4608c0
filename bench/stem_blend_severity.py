"""Does the blend of the layers before the score layer (``calibrate``'s step 2b) trade mild
against severe shifts?  Steps 1-2 of ``calibrate`` on all the validation domains, and again on
the hardest third of them alone (validation data only; nothing is chosen here).

Prompted by test numbers, said plainly: in the demo's severity-5 runs ``datta_cal`` and its
oracle trail ``tbn`` on the mixed stream at bs 64 (43.6 against 45.9 %), where step 2b put the
stem on the source statistics (1, 0, 0), and meet it at bs 16, where it chose (0.8, 0, 0.2).
This script asks the validation data alone whether the stem's blend is worth more on hard
domains than its mean over all domains says.  "Hard": the ``ceil(D/3)`` validation domains
on which the source model (its own statistics, no adaptation) is least accurate, each
domain's images once in batches.  The tables are steps 1-2's (``_search_blends``, instance
terms per sample, the mode every calibration so far chose): each candidate blend of the layers
before the score layer, with the later layers on the right blend of each batch type, accuracy
(%) on the validation batches of each type; and the mixed-batch accuracy of each blend on
every layer (step 1).

Then a per-batch stem: would a rule that puts the stem on one blend or another by the batch's
own shift there (the signed source shift at the stem's input, SPEC §6) beat the best fixed
blend?  For each validation batch of steps 1-2 (all domains), its accuracy with the stem on the
best two fixed blends of the all-domain table (the later layers on the type's right blend) and
its stem shift; the best cut on ``|shift|`` (the second blend above it) by the step-2b
objective, the mean over the three types.  An upper bound on what such a rule could gain here:
its cut is fitted on the same batches it is scored on.

    python bench/stem_blend_severity.py [--batch-size 64] > bench/results/stem_blend_severity.md
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from _validation_setup import setup

from datta_kernels.calibration import (
    BLEND_GRID,
    KINDS,
    _batches,
    _blends_behind,
    _configure,
    _hard_domains,
    _search_blends,
    default_batches,
    first_nonlinear_layer,
)
from datta_kernels.diversity import source_shift
from datta_kernels.eval.runner import DemoConfig
from datta_kernels.nn import dabn_layers
from datta_kernels.surgery import convert_model


def blends(model, domains: dict, bs: int) -> dict:
    """Steps 1-2 on ``domains`` (step 2b's best pre blend, 2c behind it: the choice before the
    validation streams weighed step 2b's best two); also returns the model, its layers, the
    score layer's index and the batches."""
    g = torch.Generator().manual_seed(0)
    val = _batches(domains, bs, default_batches(bs), g)
    work = convert_model(copy.deepcopy(model).eval(), "datta", shrink_k=None, cluster=True, backend="cpu")
    layers = dabn_layers(work)
    pre = first_nonlinear_layer(work, val["single"][0][0])
    found = _search_blends(work, layers, pre, val, tuple(BLEND_GRID), ("instance",))
    found |= _blends_behind(work, layers, pre, val, tuple(BLEND_GRID), found, found["pre_ranked"][0])
    return found | {"work": work, "layers": layers, "at": pre, "val": val}


@torch.no_grad()
def per_batch_stem(found: dict, stems) -> tuple[dict, dict]:
    """Per batch type: each stem blend's per-batch accuracy, and the per-batch signed source
    shift at the stem's input (the later layers on the type's right blend)."""
    work, layers, at, val = found["work"], found["layers"], found["at"], found["val"]
    right = {"single": found["single"], "mixed": found["multiple"], "sorted": found["skewed"]}
    seen: list[float] = []
    stem = layers[0]
    hook = stem.register_forward_hook(lambda m, inp, out: seen.append(float(source_shift(
        *reversed(torch.var_mean(inp[0], dim=(2, 3))), m.source_mean, m.source_var, m.eps, signed=True))))
    acc, shift = {}, {}
    for w in stems:
        for k in KINDS:
            _configure(layers, at, w, (right[k],) * 3, found["mode"])
            seen.clear()
            acc[w, k] = np.array([float((work(x).argmax(1) == y).float().mean()) for x, y in val[k]])
            shift[k] = np.array(seen)
    hook.remove()
    return acc, shift


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=64)
    bs = p.parse_args().batch_size
    data, model, vdom = setup("The stem's blend on all validation domains and on the hard ones", __doc__,
                              per_domain=DemoConfig().validation_per_domain)
    hard = _hard_domains(lambda: model, vdom, bs, 0)
    print(f"- batch size {bs}; hard domains (source model least accurate): {', '.join(hard)}\n")
    t0 = time.perf_counter()
    found = {"all": blends(model, vdom, bs), "hard": blends(model, {k: vdom[k] for k in hard}, bs)}
    for name, f in found.items():
        print(f"- {name}: chosen pre {f['pre']}, single {f['single']}, multiple {f['multiple']}, "
              f"skewed {f['skewed']}")
    print(f"\n(steps 1-2 twice in {time.perf_counter() - t0:.0f} s)\n")
    print("Blend of the layers before the score layer (step 2b), accuracy % per batch type and "
          "the mean over the three (the objective); sorted by the all-domain mean:\n")
    print("| pre blend | all: single | mixed | sorted | mean | hard: single | mixed | sorted | mean |")
    print("|---|" + "---|" * 8)
    rows = sorted(BLEND_GRID, key=lambda w: -sum(found["all"]["pre_table"][w].values()))
    for w in rows:
        cells = []
        for name in ("all", "hard"):
            t = found[name]["pre_table"][w]
            cells += [f"{t[k]:.1f}" for k in KINDS] + [f"{sum(t.values()) / 3:.2f}"]
        print(f"| {w} | " + " | ".join(cells) + " |")
    print("\nStep 1: mixed batches, every layer on the blend (accuracy %):\n")
    print("| blend | all | hard |")
    print("|---|---|---|")
    for w in BLEND_GRID:
        print(f"| {w} | {found['all']['blend_table'][w]['mixed']:.1f} | "
              f"{found['hard']['blend_table'][w]['mixed']:.1f} |")
    stems = rows[:2]
    acc, shift = per_batch_stem(found["all"], stems)
    print(f"\nA per-batch stem (all domains): {stems[1]} where |stem shift| > cut, else {stems[0]}:\n")
    print("| batch type | stem shift: min | median | max | " + " | ".join(f"{w}" for w in stems)
          + " | best cut | share above it |")
    print("|---|" + "---|" * (5 + len(stems)))
    cuts = np.concatenate([[-np.inf], np.unique(np.abs(np.concatenate(list(shift.values())))), [np.inf]])

    def rule(c, k):
        return np.where(np.abs(shift[k]) > c, acc[stems[1], k], acc[stems[0], k])
    means = [np.mean([rule(c, k).mean() for k in KINDS]) for c in cuts]
    best = cuts[int(np.argmax(means))]
    for k in KINDS:
        q = np.quantile(shift[k], [0, 0.5, 1])
        print(f"| {k} | {q[0]:.3f} | {q[1]:.3f} | {q[2]:.3f} | "
              + " | ".join(f"{100 * acc[w, k].mean():.2f}" for w in stems)
              + f" | {100 * rule(best, k).mean():.2f} at {best:.3f}"
              + f" | {(np.abs(shift[k]) > best).mean():.2f} |")
    fixed = [np.mean([acc[w, k].mean() for k in KINDS]) for w in stems]
    print(f"\nmean over the three types: fixed {stems[0]} {100 * fixed[0]:.2f} %, fixed {stems[1]} "
          f"{100 * fixed[1]:.2f} %, the per-batch stem at its best cut {100 * max(means):.2f} %")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
