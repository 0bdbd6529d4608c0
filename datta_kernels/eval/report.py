"""Tables, ``results.json``, ``results.csv`` and the figure for ``datta-kernels demo``.

``results.json`` layout: ``meta`` (command, machine, torch version, resolved backend, seeds, the
full config, wall time), ``model`` (cache path, training recipe, clean accuracy),
``source_accuracy_per_corruption``, ``results`` (one row per method × stream × batch size with
``method``, ``stream``, ``batch_size``, ``accuracy``, ``ms_per_batch`` and extras: on
single-domain streams ``per_corruption`` accuracy and, for the rows that decide,
``decisions_per_corruption``, the share of each corruption's batches per decision), ``detector``
(precision / recall / score AUROC on the dynamic streams) and ``backend_check``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..calibration import RIVALS, mixing_words, rule_name
from .corruptions import SEVERITIES
from .validation import VALIDATION

__all__ = ["CSV_FIELDS", "GOAL_BASELINES", "format_tables", "goal_for", "goal_lines", "plot", "short_name",
           "write_outputs"]

#: the baselines datta_cal is held to (issue goal: >= the best of them - 0.5 point on every
#: stream but the label-sorted one, where it must not fall below the source model): the plain
#: alternatives ``calibrate(daft_objective="margin")`` ranks DAFT against on validation streams
GOAL_BASELINES = RIVALS

CSV_FIELDS = ("method", "stream", "batch_size", "accuracy", "ms_per_batch", "ms_per_batch_no_update",
              "updated_fraction", "batches", "samples", "single_fraction")
_SHORT = {"single_noniid": "noniid", "dynamic_random": "dyn_rand", "continual": "contin",
          "mixed_domains": "mix_dom", "correlated": "correl"}
_KIND_COLOURS = {"single": "tab:blue", "mixed": "tab:orange"}
#: the i.i.d. single-domain stream under its demo and ``run`` names (the per-corruption tables)
SINGLE_DOMAIN = ("single", "continual")


def short_name(stream: str) -> str:
    """The stream's name in the tables (``single_noniid`` -> ``noniid``, ...)."""
    return _SHORT.get(stream, stream)


def goal_for(stream: str) -> tuple[tuple[str, ...], float]:
    """``(baselines, need)``: the rows ``datta_cal`` is held to on ``stream`` (the best of them)
    and the least margin in accuracy points that meets the goal: label-sorted streams against
    ``source`` with ``need`` 0, the others against :data:`GOAL_BASELINES` with ``need`` -0.5."""
    if stream in ("single_noniid", "correlated"):
        return ("source",), 0.0
    return GOAL_BASELINES, -0.5


def _pct(v) -> str:
    return "  -  " if v is None else f"{100 * v:5.1f}"


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _numerics_words(numerics: dict | None) -> str:
    """``; numerics portable (AVX2, 2 threads)`` and the like (nothing for documents written
    before the numerics were recorded)."""
    if not numerics:
        return ""
    how = f"{numerics['cpu_capability']}, {numerics['threads']} threads"
    if numerics["mode"] == "portable" and not numerics["portable"]:
        return f"; numerics NOT portable ({how}: {numerics.get('why', 'switches not in effect')})"
    return f"; numerics {numerics['mode']} ({how})"


def format_tables(doc: dict) -> str:
    """The terminal report: accuracy per method × stream × batch size, timings, detector
    quality, per-corruption accuracy and the backend check."""
    rows = doc["results"]
    meta, cfg = doc["meta"], doc["meta"]["config"]
    methods = _ordered(r["method"] for r in rows)
    streams = _ordered(r["stream"] for r in rows)
    sizes = _ordered(r["batch_size"] for r in rows)
    by = {(r["method"], r["stream"], r["batch_size"]): r for r in rows}
    clean = doc["model"].get("clean_test_accuracy")
    lines = [f"Top-1 accuracy (%) on {meta.get('dataset', 'Fashion-MNIST-C')}: {len(cfg['corruptions'])} "
             f"corruptions x {cfg['per_domain']} test images, severity {cfg['severity']}; "
             + (f"clean {_pct(clean).strip()}%; " if clean is not None else "")
             + f"backend {meta['backend']}" + _numerics_words(meta.get("numerics"))]
    calibrated = doc.get("calibration") or doc.get("datta_cal")
    vsev = tuple(cfg.get("validation_severities") or SEVERITIES)
    if vsev != SEVERITIES and calibrated:
        lines.append(f"NOTE: datta_disp / datta_cal calibrated on the validation corruptions at severity "
                     f"{', '.join(map(str, vsev))} only (--validation-severities), not at all five")
    vcorr = tuple(cfg.get("validation_corruptions") or VALIDATION)
    if vcorr != VALIDATION and calibrated:
        lines.append(f"NOTE: datta_disp / datta_cal calibrated on the validation corruptions "
                     f"{', '.join(vcorr)} (--validation-corruptions), not the default "
                     f"{', '.join(VALIDATION)}")
    leaked = doc.get("reported_on_validation") or []
    if leaked:
        lines.append(f"NOTE: includes VALIDATION corruptions {leaked} (--report-validation): these are "
                     "not test numbers; the methods were calibrated on them")
    head = (f"{'method':<18}{'bs':>4}" + "".join(f"{short_name(s):>9}" for s in streams)
            + f"{'ms/batch':>10}")
    lines += [head, "-" * len(head)]
    for bs in sizes:
        for m in methods:
            cells = [by.get((m, s, bs)) for s in streams]
            accs = "".join(f"{_pct(c['accuracy'] if c else None):>9}" for c in cells)
            ms = [c["ms_per_batch"] for c in cells if c]
            lines.append(f"{m:<18}{bs:>4}{accs}{sum(ms) / len(ms):>10.1f}")
    if doc["detector"]:
        lines += ["", "Diversity detector vs the true batch type (positive = single-domain batch); "
                      "precision/recall after the selector's warm-up, AUROC of the raw score",
                  f"{'method':<12}{'stream':<16}{'bs':>4}{'batches':>9}{'precision':>11}{'recall':>8}"
                  f"{'AUROC':>8}{'skewed':>8}  KDE rule that decided (share of batches)"]
        for d in doc["detector"]:
            why = d.get("kde_reasons") or {}
            total = sum(why.values())
            why_text = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in why.items()) if total else "-"
            lines.append(f"{d['method']:<12}{d['stream']:<16}{d['batch_size']:>4}{d['batches']:>9}"
                         f"{_pct(d['precision']):>11}{_pct(d['recall']):>8}{_pct(d['score_auroc']):>8}"
                         f"{_pct(d.get('skewed')):>8}  {why_text}")
    cal = doc.get("calibration") or {}
    if cal:
        lines += ["", "datta_disp: dispersion score (first layer whose input is nonlinear in the image), "
                      "ThresholdSelector calibrated per batch size on validation batches of "
                      + ", ".join(next(iter(cal.values()))["domains"]) + " (never on test data): "
                      + ", ".join(f"bs {bs}: {c['threshold']:.4g}" for bs, c in cal.items())]
    for bs, c in (doc.get("datta_cal") or {}).items():
        lines += ["", f"datta_cal, bs {bs} (datta_kernels.calibrate on the validation domains): instance "
                      f"terms {c['instance_mode']}, blends single {tuple(c['single_blend'])}, multiple "
                      f"{tuple(c['multiple_blend'])}, skewed {tuple(c['skewed_blend'])}; dispersion score "
                      f"at {c['score_layer']}: "
                      f"{rule_name(c['threshold'], c['low'], c.get('skew_cut'), c.get('shift_cut'))}; "
                      + (f"skewed batches on the stream statistics (momentum {c['stream_momentum']:g}"
                         + (f", reset above divergence {c['stream_reset']:g}"
                            if c.get('stream_reset') else "")
                         + (f", blend {tuple(c['stream_blend'])}" if c.get('stream_blend') else "")
                         + "); " if c.get('stream_momentum') else "")
                      + (f"DAFT on at lr {c['lr']:g}"
                         + (", multiple batches too" if c.get('daft_multiple') else "")
                         if c['daft'] else "DAFT off")
                      + ("; its mixed validation batches pool one group of domains at a time ("
                         + mixing_words(c["mixing"]) + ")" if c.get("mixing") else "")
                      + ("; DAFT ranked by its smallest margin against the plain alternatives on the "
                         "validation streams" if c.get("daft_objective") == "margin" else "")]
    lines += goal_lines(doc)
    lines += _per_corruption(doc, methods, sizes)
    lines += _decisions_per_corruption(doc, methods, sizes)
    chk = doc.get("backend_check")
    if chk:
        lines += ["", f"Backend check: DATTA on {chk['backend']} vs {chk['against']}, "
                      f"{chk['batches']} batches of {chk['stream']}/bs{chk['batch_size']}: predictions agree "
                      f"{_pct(chk['prediction_agreement']).strip()}%, decisions agree "
                      f"{_pct(chk['decision_agreement']).strip()}%, max |logit diff| "
                      f"{chk['max_abs_logit_diff']:.2e}"]
        if chk.get("note"):
            lines.append(f"  ({chk['note']})")
    return "\n".join(lines)


def goal_lines(doc: dict, method: str = "datta_cal") -> list[str]:
    """``method`` against the best baseline of :data:`GOAL_BASELINES` per stream and batch size
    (label-sorted streams: against ``source``), and its time per batch against ``tbn``'s."""
    rows = doc["results"]
    by = {(r["method"], r["stream"], r["batch_size"]): r for r in rows}
    if not any(r["method"] == method for r in rows):
        return []
    lines = ["", f"{method} vs the best baseline ({', '.join(GOAL_BASELINES)}; label-sorted stream: "
                 "vs source), accuracy points; goal >= -0.5 (>= 0 on label-sorted)",
             f"{'stream':<16}{'bs':>4}{method:>11}{'best':>8}  {'baseline':<10}{'margin':>8}  goal"]
    for r in rows:
        if r["method"] != method:
            continue
        s, bs = r["stream"], r["batch_size"]
        pool, need = goal_for(s)
        cands = [(by[(b, s, bs)]["accuracy"], b) for b in pool if (b, s, bs) in by]
        if not cands:
            continue
        best, who = max(cands)
        margin = 100 * (r["accuracy"] - best)
        lines.append(f"{short_name(s):<16}{bs:>4}{_pct(r['accuracy']):>11}{_pct(best):>8}  {who:<10}"
                     f"{margin:>+8.1f}  {'met' if margin >= need - 1e-9 else 'MISSED'}")
    tbn = [r for r in rows if r["method"] == "tbn"]
    if tbn:
        own = {(r["stream"], r["batch_size"]): r["ms_per_batch"] for r in rows if r["method"] == method}
        ratios = [own[(r["stream"], r["batch_size"])] / r["ms_per_batch"] for r in tbn
                  if (r["stream"], r["batch_size"]) in own]
        if ratios:
            lines.append(f"{method} ms/batch / tbn ms/batch over the streams: {min(ratios):.2f}-"
                         f"{max(ratios):.2f} (every batch, fine-tuned ones included)")
        plain = {(r["stream"], r["batch_size"]): r.get("ms_per_batch_no_update") for r in rows
                 if r["method"] == method}
        split = [(s, bs, plain[(s, bs)] / r["ms_per_batch"]) for r in tbn
                 for s, bs in [(r["stream"], r["batch_size"])] if plain.get((s, bs))]
        if split:
            worst = max(q for *_, q in split)
            lines.append(f"{method} ms/batch on the batches it did not fine-tune / tbn ms/batch (goal "
                         f"<= 1.1): " + ", ".join(f"{short_name(s)} bs{bs} {q:.2f}" for s, bs, q in split)
                         + f"  -> {'met' if worst <= 1.1 else 'MISSED'} (worst {worst:.2f})")
    return lines


def _per_corruption(doc: dict, methods: list[str], sizes: list) -> list[str]:
    """Per-corruption accuracy on the single-domain stream (largest batch size)."""
    bs = max(sizes)
    per = {r["method"]: r["per_corruption"] for r in doc["results"]
           if r["stream"] in SINGLE_DOMAIN and r["batch_size"] == bs}
    src = doc["source_accuracy_per_corruption"]
    cols = [m for m in methods if m in per]
    lines = ["", f"Per-corruption accuracy (%), single-domain stream, bs {bs} "
                 "('calib' = source model alone, the severity calibration)",
             f"{'corruption':<19}{'calib':>7}" + "".join(f"{m:>{max(11, len(m) + 1)}}" for m in cols)]
    for name, acc in src.items():
        lines.append(f"{name:<19}{_pct(acc):>7}" + "".join(f"{_pct(per[m].get(name)):>{max(11, len(m) + 1)}}"
                                                           for m in cols))
    return lines


def _decisions_per_corruption(doc: dict, methods: list[str], sizes: list) -> list[str]:
    """What each deciding method (oracles left out: they decide from the truth) decided on the
    single-domain stream's batches, per corruption: the shares (%) of ``single / multiple /
    skewed``.  Every batch there is single-domain, so anything but ``single`` is a misreading
    (``skewed`` meant for label-sorted batches, ``multiple`` for mixed ones).  A method whose
    output check released batches (SPEC §4; counted as ``single``) gets a column of the share
    released."""
    lines = []
    for bs in sizes:
        per = {r["method"]: r["decisions_per_corruption"] for r in doc["results"]
               if r["stream"] in SINGLE_DOMAIN and r["batch_size"] == bs
               and "decisions_per_corruption" in r
               and not r["method"].endswith("_oracle")}
        cols = [m for m in methods if m in per]
        if not cols:
            continue
        released = {r["method"]: r["released_per_corruption"] for r in doc["results"]
                    if r["stream"] in SINGLE_DOMAIN and r["batch_size"] == bs
                    and r["method"] in cols and "released_per_corruption" in r}
        width = {m: max(13, len(m) + 1) for m in cols}
        lines += ["", f"Decisions on the single-domain stream, bs {bs}: share of each corruption's batches "
                      "decided single / multiple / skewed (%)"
                  + ("; 'released': the share decided skewed, then released to single by the "
                     "output check (counted in single)" if released else ""),
                  f"{'corruption':<19}" + "".join(f"{m:>{width[m]}}" + (f"{'released':>10}" if m in released
                                                                          else "") for m in cols)]
        names = list(doc.get("source_accuracy_per_corruption") or per[cols[0]])
        for name in names:
            line = f"{name:<19}"
            for m in cols:
                share = per[m].get(name)
                cell = "-" if share is None else "/".join(
                    f"{100 * share.get(d, 0.0):.0f}" for d in ("single", "multiple", "skewed"))
                line += f"{cell:>{width[m]}}"
                if m in released:
                    rel = released[m].get(name)
                    line += f"{'-' if rel is None else f'{100 * rel:.0f}':>10}"
            lines.append(line)
    return lines


def plot(doc: dict, path: Path) -> Path | None:
    """Two panels: the diversity score along the dynamic stream coloured by the true batch
    type (with the batches DATTA called "single" marked), and accuracy by method per stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["_runs"]
    dyn = [r for r in runs if r.stream == "dynamic" and r.method == "datta"]
    dyn = max(dyn, key=lambda r: r.batch_size) if dyn else None
    bs = max(r.batch_size for r in runs)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1.15, 1]})
    ax = axes[0]
    if dyn is not None:
        for kind, colour in _KIND_COLOURS.items():
            pts = [(i, s) for i, (s, k) in enumerate(zip(dyn.scores, dyn.kinds)) if k == kind]
            if pts:
                ax.scatter(*zip(*pts), s=14, c=colour, label=f"true {kind} batch", alpha=0.8)
        called = [(i, s) for i, (s, d) in enumerate(zip(dyn.scores, dyn.decisions)) if d == "single"]
        if called:
            ax.scatter(*zip(*called), s=46, facecolors="none", edgecolors="black", linewidths=0.8,
                       label='DATTA decided "single"')
        if dyn.warmup:
            ax.axvspan(-0.5, dyn.warmup - 0.5, color="0.9", zorder=0, label="selector warm-up")
        ax.set_title(f"Diversity score along the dynamic stream (DATTA, bs {dyn.batch_size})")
        ax.set_xlabel("batch index")
        ax.set_ylabel("diversity score (std of angles, rad)")
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    else:
        ax.text(0.5, 0.5, "no DATTA run on the dynamic stream", ha="center", va="center")
        ax.set_axis_off()

    ax = axes[1]
    rows = [r for r in doc["results"] if r["batch_size"] == bs]
    methods = _ordered(r["method"] for r in rows)
    streams = _ordered(r["stream"] for r in rows)
    by = {(r["method"], r["stream"]): r["accuracy"] for r in rows}
    width = 0.8 / len(methods)
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(streams))]
        ax.bar(xs, [100 * by.get((m, s), 0) for s in streams], width, label=m, color=cmap(i))
    ax.set_xticks(range(len(streams)), [short_name(s) for s in streams])
    lo = min(100 * v for v in by.values())
    ax.set_ylim(max(0, lo - 10), 100)
    clean = doc["model"].get("clean_test_accuracy")
    if clean is not None:
        ax.axhline(100 * clean, color="0.3", ls="--", lw=1, label="clean (source)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"Accuracy by method and stream (bs {bs})")
    ax.legend(fontsize=8, ncol=2, loc="upper right", framealpha=0.9)
    fig.suptitle(f"DATTA on {doc['meta'].get('dataset', 'Fashion-MNIST-C')} ({doc['meta']['backend']} "
                 "backend)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(doc: dict, out: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``summary.txt`` and ``datta_demo.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "summary": out / "summary.txt",
             "figure": out / "datta_demo.png"}
    public = {k: v for k, v in doc.items() if not k.startswith("_")}
    paths["json"].write_text(json.dumps(public, indent=2) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(doc["results"])
    paths["summary"].write_text(format_tables(doc) + "\n")
    plot(doc, paths["figure"])
    return paths
