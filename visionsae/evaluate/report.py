"""The report directory: report.json (every number), report.md (the table), PNG plots, index.html.

report.json is strict JSON: a figure that is undefined (e.g. MS of a latent that fires on one
image) is written as null.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from visionsae.atomic import atomic_write, fsync_dir
from visionsae.errors import UserError
from visionsae.evaluate import plots
from visionsae.evaluate.explorer import write_explorer
from visionsae.locks import OutputLock
from visionsae.store import is_store

REPORT_FORMAT = "visionsae-eval-report"
REPORT_VERSION = 1


def open_report_dir(out: Path) -> OutputLock:
    """Check ``out`` before any work, create it and lock it (one sae-eval per report directory)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: choose a directory for the report")
    for p in [out, *out.resolve().parents]:
        if is_store(p):
            raise UserError(f"--out {out} is {'inside ' if p != out else ''}an activation store ({p}): the report "
                            "would be written into it; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the report directory {out}: {err.strerror or err}; choose another --out") from None
    return OutputLock(out, "sae-eval").acquire()


def write_report(result, out: Path) -> dict[str, Path]:
    """Write every report file under ``out`` (created if needed); returns {kind: path}.

    Everything is written into a temporary folder inside ``out`` first and then renamed into place,
    report.json last: a full disk or a crash leaves the previous report whole, never an empty
    report.json or a new one beside an old index.html."""
    out = Path(out)
    tmp = out / f".report.tmp-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = {"json": tmp / "report.json", "md": tmp / "report.md"}
        doc = report_dict(result)
        report_json = (json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n").encode()
        figures = plots.write_plots(result, tmp)
        files.update(figures)
        files["md"].write_text(markdown(doc, {k: p.name for k, p in figures.items()}))
        files["html"] = write_explorer(result, tmp, {k: p.name for k, p in figures.items()})
        for entry in sorted(tmp.iterdir()):
            target = out / entry.name
            if entry.is_dir() and target.is_dir():
                old = tmp / f".old-{entry.name}"
                os.replace(target, old)
            os.replace(entry, target)
        fsync_dir(out)
        # last, and durably: a report.json says that the files beside it are this report's
        atomic_write(out / "report.json", report_json, hidden=True)
    except OSError as err:
        what = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise UserError(f"cannot write the report in {out} ({what}): free space or choose another --out; "
                        "the previous report there, if any, is unchanged") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: out / p.relative_to(tmp) for k, p in files.items()}


def report_dict(result) -> dict[str, Any]:
    settings = dataclasses.asdict(result.config)
    settings.pop("progress", None)
    try:
        pkg_version = version("visionsae")
    except PackageNotFoundError:
        pkg_version = None
    return {"format": REPORT_FORMAT, "format_version": REPORT_VERSION, "visionsae_version": pkg_version,
            "settings": settings, "groups": [g.summary for g in result.groups],
            "checkpoints": [dict(c.summary, group=c.group) for c in result.checkpoints]}


def _clean(obj: Any) -> Any:
    """JSON-able copy: NaN / inf -> null, numpy and torch values -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return _clean(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _fmt(x: Any, digits: int) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def summary_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: one row per checkpoint."""
    cks = doc["checkpoints"]
    budgets = sorted({int(m) for c in cks for m in c["probes"].get("budgets", {})})
    sweep = sorted({int(k) for c in cks for k in c["k_sweep"]})
    header = (["checkpoint", "arch", "k", "latents", "FVU", "L0", "dead %", "MS mean", "MS median", "MS e_n",
               "purity@top", "purity@all"] + [f"probe m={m}" for m in budgets] + ["probe raw"]
              + [f"FVU k'={k}" for k in sweep])
    rows = []
    for c in cks:
        rec, sp, pr, pu = c["reconstruction"], c["sparsity"], c["probes"], c["purity"]
        row = [c["name"], c["config"]["arch"], str(c["config"]["k"]), str(c["config"]["n_latents"]),
               _fmt(rec["fvu"], 4), _fmt(sp["l0"], 1), _fmt(100 * sp["dead_fraction"], 1),
               _fmt(c["monosemanticity"]["mean"], 3), _fmt(c["monosemanticity"]["median"], 3),
               _ms_encoder(doc, c), _fmt(pu.get("top", {}).get("mean"), 3), _fmt(pu.get("all", {}).get("mean"), 3)]
        row += [_fmt(pr.get("budgets", {}).get(str(m), {}).get("accuracy"), 3) for m in budgets]
        row += [_fmt(pr.get("raw", {}).get("accuracy"), 3)]
        row += [_fmt(c["k_sweep"].get(str(k), {}).get("fvu"), 4) for k in sweep]
        rows.append(row)
    return header, rows


def _ms_encoder(doc: dict, c: dict) -> str:
    """The encoder whose image embeddings e_n this checkpoint's MS compares images with."""
    groups = doc["groups"]
    g = groups[c["group"]] if isinstance(c.get("group"), int) and c["group"] < len(groups) else {}
    return str(g.get("ms_encoder", "–"))


def _penalties_on(c: dict) -> str:
    train = c.get("train") or {}
    if train.get("reg", "none") == "none":
        return "–"
    return "relu(z)" if train.get("reg_on", "raw") == "relu" else "|z|"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(doc: dict, figures: dict[str, str]) -> str:
    header, rows = summary_rows(doc)
    parts = ["# SAE evaluation", "", _table(header, rows), ""]
    parts += ["FVU: fraction of variance unexplained on held-out images (lower is better). L0: mean number of "
              "firing latents per row. dead: latents that never fire on the held-out rows. MS: Monosemanticity "
              "Score (Pach et al. 2025) over live latents that fire on at least two images; MS e_n: the encoder "
              "whose image embeddings it compares (own layer: circular, an untrained SAE scores above 0; pass "
              "--ms-embeddings STORE for an independent backbone). purity: share of a latent's firing images in its most "
              "frequent class, over its top images / over all images where it fires, mean over live latents "
              "that fire on at least two labelled images (as MS). "
              "probe m: held-out accuracy of a logistic-regression probe on each image's m largest latents; raw: "
              "the same probe on the raw image-level activations. FVU k': FVU when the model keeps k' latents.", ""]
    parts += ["## Data", ""]
    for g in doc["groups"]:
        ds = g["store"]["dataset"]
        parts.append(f"- store `{g['store']['path']}` ({g['store']['backbone'].get('id')}, {ds.get('id')}/"
                     f"{ds.get('split')}), layer `{g['layer']['name']}` (d = {g['layer']['d']}, "
                     f"{g['layer']['tokens_per_image']} token(s) per image): {g['held_out_images']} held-out images "
                     f"({g['held_out_rows']} rows; {g['evaluated_on']}), {g['probe_train_images']} probe-training "
                     f"images" + (f" from `{g['probe_train_store']}`" if g["probe_train_store"] else "") +
                     "; MS embeddings: "
                     f"{g['ms_embeddings']}" + (f"; {g['pooling']}" if g["pooling"] else ""))
    parts += ["", "## Details", ""]
    detail_header = ["checkpoint", "MS baseline", "MSE", "EV", "NMSE", "cosine", "l2 ratio", "rel. bias", "dense",
                     "l1/l2 of z+",
                     "latents for 90% of z+", "latents for 90% of code", "per-input k (mean, q05-q95)",
                     "MS latents", "purity@top latents", "purity@all latents", "penalties on",
                     "trained l1/l2", "trained off-support l1"]
    detail_rows = []
    for c in doc["checkpoints"]:
        rec, sp = c["reconstruction"], c["sparsity"]
        kd = sp.get("k_distribution")
        tp = sp.get("trained_penalties", {})
        detail_rows.append([c["name"], _fmt(c["monosemanticity"]["baseline_mean_cosine"], 3), f"{rec['mse']:.4g}",
                            _fmt(rec["explained_variance"], 4), _fmt(rec["nmse"], 4),
                            _fmt(rec["cosine"], 4), _fmt(rec["l2_ratio"], 4), _fmt(rec["rel_bias"], 4),
                            str(sp["dense"]), _fmt(sp["l1_l2_ratio"], 2), _fmt(sp["latents_for_mass"], 1),
                            _fmt(sp["kept_latents_for_mass"], 1),
                            f"{kd['mean']:.2f} ({kd['q05']:.1f}-{kd['q95']:.1f})" if kd else "fixed",
                            str(c["monosemanticity"]["n_latents"]),
                            str(c["purity"].get("top", {}).get("n_latents", "–")),
                            str(c["purity"].get("all", {}).get("n_latents", "–")),
                            _penalties_on(c), _fmt(tp.get("l1_l2_ratio"), 2), _fmt(tp.get("off_support_l1"), 2)])
    parts += [_table(detail_header, detail_rows), ""]
    parts += ["MS baseline: the mean cosine between the held-out images' embeddings, i.e. the MS of a latent that "
              "fires equally on every image; MS above it measures selectivity. "
              "z+ is the positive part of the pre-sparsity encoder output z (only positive values can enter a "
              "Top-k/ReLU code); l1/l2 is its mean ||z+||_1 / ||z+||_2 per row. "
              "penalties on: what the checkpoint's regularizers measured (|z| or relu(z); – when trained without "
              "them); trained l1/l2 and off-support l1: those quantities as trained, over the batch-active latents "
              "of each evaluation batch (a set that grows with the batch size).", ""]
    notes = [f"- {c['name']}: {c['k_sweep_note']}" for c in doc["checkpoints"] if c.get("k_sweep_note")]
    notes += [f"- {c['name']}: probes skipped ({c['probes']['skipped']})" for c in doc["checkpoints"]
              if "skipped" in c["probes"]]
    notes += [f"- {c['name']}: purity skipped ({c['purity']['skipped']})" for c in doc["checkpoints"]
              if "skipped" in c["purity"]]
    notes += [f"- {c['name']}: a probe at budget {m} did not converge in the iteration limit"
              for c in doc["checkpoints"] for m, v in c["probes"].get("budgets", {}).items() if not v["converged"]]
    if notes:
        parts += ["## Notes", ""] + notes + [""]
    if figures:
        parts += ["## Figures", ""] + [f"![{k}]({name})" for k, name in figures.items()] + [""]
    parts += ["Every latent, browsable (top and quantile images, histograms, heatmaps, class effects): the latent "
              "explorer, [index.html](index.html). Every number: report.json.", ""]
    return "\n".join(parts)

