"""The demo's ``datta_cal`` per batch vs ``tbn``, on the demo's model (the goal of issue 20:
on the batches it does not fine-tune, at most 1.1x tbn's time).

Contestants, one call each on the same 28x28 Fashion-MNIST batch, the cached demo SmallResNet:

  tbn                    the TBN adapter (every layer on batch statistics; FusedDABN layers)
  bn_train               the plain model in train mode under no_grad (native BatchNorm2d)
  cal_multiple           datta_cal as the demo calibrated it (blends, pre blend, probe, DAFT on),
                         every batch decided ``multiple`` (cuts that force it; the selector still
                         reads the probe's spread and the source shift): score, spread, shift,
                         host-synced decision, no update
  cal_skewed             the same, every batch decided ``skewed``
  cal_multiple_noft      ``cal_multiple`` with DAFT off (decision on the device, no graph)
  cal_noft_no_probe      the same without the class probe and the shift (a threshold on the
                         score alone): what the probe, its spread rule and the shift cost
  cal_model_only         the calibrated model's forward alone, every layer on its ``multiple``
                         blend, no score, no probe, no decision (the layers' own cost)
  cal_single_step        every batch ``single``: the forward to the score layer without a graph,
                         then again with one, entropy backward, SGD step

The configuration (blends, cuts, DAFT) is the one ``demo_sev3.json`` records for that batch size;
the class probe is refitted on a few validation batches (its weights change no timing).
Median of interleaved calls (``datta_kernels.benchmarking.time_contestants``).

    python bench/bench_cal_step.py > bench/results/cpu_cal_step.md
    python bench/bench_cal_step.py --skip cal_single_step    # the others without the SGD step
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os

import torch

import datta_kernels as dk
from datta_kernels.adapt import TBN
from datta_kernels.benchmarking import describe_machine, provenance, time_contestants
from datta_kernels.eval.datasets import load_fashion_mnist
from datta_kernels.eval.models import TrainConfig, load_or_train
from datta_kernels.eval.validation import validation_domains

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


#: the fields of a :class:`Calibration` that report how it was chosen; every other field
#: configures the adapter and is taken from the recorded run
REPORT_FIELDS = {"batch_size", "domains", "batches", "blend_table", "pre_table", "pre_streams",
                 "decision_table", "rule_table", "daft_table", "streams", "modes", "probe", "stream_table",
                 "hard_domains", "release_table", "rival_table"}


def _calibration(model, vdom, bs: int, recorded: dict):
    """A :class:`Calibration` with the recorded choices and a quickly refitted probe: every
    configuring field as recorded (JSON lists as tuples), a field the recording predates at
    its default."""
    cal = dk.calibrate(copy.deepcopy(model), vdom, bs, n_batches=8, backend="cpu").calibration
    for f in dataclasses.fields(cal):
        if f.name in REPORT_FIELDS:
            continue
        if f.name in recorded:
            value = recorded[f.name]
            setattr(cal, f.name, tuple(value) if isinstance(value, list) else value)
        elif f.default is not dataclasses.MISSING:
            setattr(cal, f.name, f.default)
    return cal


def demo_setup():
    """The demo's data, cached model, a small validation set and ``datta_cal``'s recorded
    choices (``demo_sev3.json``): what the datta_cal timing scripts start from."""
    data = load_fashion_mnist()
    model, _ = load_or_train(TrainConfig(), data.train_x, data.train_y, progress=False)
    vdom = validation_domains(data, 200, 0, train=TrainConfig(), severities=(3,))
    recorded = json.load(open(os.path.join(RESULTS, "demo_sev3.json")))["datta_cal"]
    return data, model, vdom, recorded


def print_header(title: str, doc: str, paragraphs: int) -> None:
    """A results file's title, provenance lines and the first ``paragraphs`` paragraphs of
    ``doc`` after its summary line."""
    prov, m = provenance(), describe_machine()
    print(f"# {title}\n")
    print(f"- command: `{prov['command']}`\n- commit: {prov['commit']}\n- machine: {m.get('cpu', '')}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, 1-min load "
          f"{os.getloadavg()[0]:.2f} at the start\n")
    for part in doc.split("\n\n")[1:1 + paragraphs]:
        print(part + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip", nargs="*", default=[], help="contestants left out of the interleaved runs")
    skip = set(ap.parse_args().skip)
    data, model, vdom, recorded = demo_setup()
    print_header("`datta_cal` per batch vs `tbn` on the demo's model (cpu)", __doc__, 2)
    for bs in (16, 64):
        _table(model, data.test_x[:bs], _calibration(model, vdom, bs, recorded[str(bs)]), bs, skip)


def _table(model, x, cal, bs: int, skip=frozenset()) -> None:
    tbn = TBN(copy.deepcopy(model), backend="auto")
    plain = copy.deepcopy(model).train()

    def forced(sel, daft=True):
        cal.daft = daft
        return cal.adapter(copy.deepcopy(model), selector=sel, backend="cpu")
    # every selector reads the probe's spread and the shift, as the calibrated rule does; the
    # cuts force the answer
    adapters = {"cal_multiple": forced(dk.ThresholdSelector(0.0, skew_cut=1e-6, shift_cut=1e9)),
                "cal_skewed": forced(dk.ThresholdSelector(1e9, skew_cut=1.0, shift_cut=1e9)),
                "cal_multiple_noft": forced(dk.ThresholdSelector(0.0, skew_cut=1e-6, shift_cut=1e9),
                                            daft=False),
                "cal_noft_no_probe": forced(dk.ThresholdSelector(0.0), daft=False),
                "cal_single_step": forced(dk.ThresholdSelector(1e9, skew_cut=1e-6, shift_cut=1e9))}
    want = {"cal_multiple": "multiple", "cal_skewed": "skewed", "cal_multiple_noft": "multiple",
            "cal_noft_no_probe": "multiple", "cal_single_step": "single"}
    for name, a in adapters.items():
        a(x)
        assert a.last_decision == want[name], (name, a.last_decision)

    bare = copy.deepcopy(adapters["cal_multiple_noft"].model)
    dk.nn.set_decisions(dk.nn.dabn_layers(bare), "multiple")
    for lyr in dk.nn.dabn_layers(bare):
        lyr.compute_score = False

    def plain_call(m=plain):
        with torch.no_grad():
            return m(x)
    runs = {"tbn": lambda: tbn(x), "bn_train": plain_call}
    runs |= {name: (lambda a=a: a(x)) for name, a in adapters.items()}
    runs["cal_model_only"] = lambda: plain_call(bare)
    sec = time_contestants({k: v for k, v in runs.items() if k not in skip}, "cpu", reps=41)
    print(f"## Batch size {bs}\n")
    print("| contestant | ms | / tbn |\n|---|---|---|")
    for name, s in sec.items():
        print(f"| {name} | {1e3 * s:.3f} | {s / sec['tbn']:.2f} |")
    print()


if __name__ == "__main__":
    main()
