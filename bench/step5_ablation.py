"""What step 5's hard stream and entropy filter changed on the demo's test streams: ``datta_cal``
as ``calibrate`` now configures it, beside the same calibration with the DAFT setting the
previous step 5 would have taken (the best mean over the four validation streams alone, among
DAFT off and the plain rates, then ``+multiple``, the filter never a candidate).

Nothing is chosen here: both configurations come from the validation data (the second is the
previous objective applied to the validation numbers this calibration recorded), and the test
numbers only say what the change did.  For each batch size, ``calibrate`` runs as the demo runs
it (same model, validation domains, seed and DAFT rates: its report equals the demo's), then both
adapters run the demo's five test streams at severity 3 and 5 (``run_lockstep``, the demo's
loop).  The previous objective's rate search stopped where it stopped on the four-stream mean;
where that search would have asked for a rate this run did not try, the script says so and
reports no previous-choice row for that batch size.

    python bench/step5_ablation.py > bench/results/step5_ablation.md
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch
from _validation_setup import setup

from datta_kernels.calibration import RATE_STEPS, _past_the_end, calibrate, default_batches
from datta_kernels.eval.runner import DemoConfig, cal_rates, run_lockstep
from datta_kernels.eval.streams import STREAMS, make_stream
from datta_kernels.eval.validation import test_pool

FOUR = ("single", "mixed", "dynamic", "sorted")


def four_mean(row: dict) -> float:
    return float(np.mean([row[k] for k in FOUR]))


def previous_choice(rep, candidates: tuple[float, ...]) -> tuple[bool, float, bool] | None:
    """The previous step 5 on this report's numbers: ``(daft, lr, daft_multiple)``, or None where
    its rate search would have needed a rate this calibration did not run (then it cannot be
    told).  The ``+multiple`` row exists only for the new choice; where the previous choice is
    another setting its ``+multiple`` run is unknown: ``daft_multiple`` is then None (the
    caller takes it as not kept and says so)."""
    table = rep.daft_table
    on = {float(k.split("lr ")[1]): v for k, v in table.items()
          if k.startswith("on, lr ") and "," not in k[len("on, lr "):]}
    tried = sorted(set(candidates))
    for _ in range(RATE_STEPS if len(tried) > 1 else 0):
        top, nxt = _past_the_end({r: on[r] for r in tried}, table["off"], four_mean)
        if nxt is None:
            break
        key = min(on, key=lambda r: abs(math.log(r / nxt)))
        if not math.isclose(key, nxt, rel_tol=1e-9):
            return None
        tried.append(key)
        tried.sort()
        if four_mean(on[key]) <= four_mean(on[top]):
            break
    rows = [("off", False, tried[0])] + [(f"on, lr {r:g}", True, r) for r in tried]
    means = [four_mean(table[k]) for k, _, _ in rows]
    key, daft, rate = rows[int(np.argmax(means))]
    if not daft:
        return False, rate, False
    plus = f"{key}, +multiple"
    if plus not in table:       # not run for this setting: taken as not kept (printed)
        return True, rate, None
    return True, rate, four_mean(table[plus]) > max(means)


def main() -> None:
    data, model, vdom = setup("Step 5's hard stream and entropy filter on the demo's test streams",
                              __doc__, per_domain=DemoConfig().validation_per_domain)
    cfg = DemoConfig()
    pools = {sev: test_pool(data, cfg.per_domain, sev, cfg.seed, cfg.test_corruptions, False)
             for sev in (3, 5)}
    for bs in (16, 64):
        rep = calibrate(copy.deepcopy(model), vdom, bs, n_batches=default_batches(bs),
                        lr=cal_rates(cfg.lr), backend=cfg.backend, seed=cfg.seed).calibration
        now = (rep.daft, rep.lr, rep.entropy_filter, rep.daft_multiple)
        prev = previous_choice(rep, cal_rates(cfg.lr))
        print(f"## bs {bs}\n")
        print(f"- hard stream: {', '.join(rep.hard_domains)}")
        print(f"- step 5 now: DAFT {'on' if rep.daft else 'off'}, lr {rep.lr:g}, entropy filter "
              f"{rep.entropy_filter}, +multiple {rep.daft_multiple}")
        if prev is None:
            print("- previous step 5: cannot be told from this run's table (a rate it would try "
                  "was not run)\n")
            continue
        print(f"- previous step 5 (four-stream mean): DAFT {'on' if prev[0] else 'off'}, lr "
              f"{prev[1]:g}, +multiple "
              + ("not run for it, taken as not kept (every earlier calibration rejected it)"
                 if prev[2] is None else str(prev[2])) + "\n")
        prev = (prev[0], prev[1], bool(prev[2]))
        print("| daft row | " + " | ".join(FOUR) + " | hard | four-stream mean | five-stream mean |")
        print("|---|" + "---|" * (len(FOUR) + 3))
        for k, v in rep.daft_table.items():
            five = np.mean(list(v.values()))
            print(f"| {k} | " + " | ".join(f"{v[s]:.2f}" for s in FOUR)
                  + f" | {v.get('hard', float('nan')):.2f} | {four_mean(v):.2f} | {five:.2f} |")
        print()
        if (prev[0], prev[1], None, prev[2]) == now:
            print("The two choices are the same configuration: the test rows would be equal.\n")
            continue
        before = dataclasses.replace(rep, daft=prev[0], lr=prev[1], entropy_filter=None,
                                     daft_multiple=prev[2])
        print("Test accuracy (%), the demo's streams:\n")
        print("| severity | stream | now | previous step 5 | now - previous |")
        print("|---|---|---|---|---|")
        for sev, pool in pools.items():
            for name in STREAMS:
                stream = make_stream(pool, name, bs, cfg.seed)
                adapters = {"now": rep.adapter(copy.deepcopy(model), backend=cfg.backend),
                            "previous": before.adapter(copy.deepcopy(model), backend=cfg.backend)}
                a, b = (100 * r.accuracy for r in run_lockstep(adapters, stream, pool.batches(stream)))
                print(f"| {sev} | {name} | {a:.1f} | {b:.1f} | {a - b:+.1f} |", flush=True)
        print()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
