"""Report files of an evaluation: ``report.json``, ``per_image.csv``, ``report.md``, ``ced.png``."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from fgtbt_jax import paths
from fgtbt_jax.evaluation.metrics import FULL, ced_curve


def _rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for protocol, per_ds in report["metrics"].items():
        for ds, per_subset in per_ds.items():
            for subset, m in per_subset.items():
                rows.append({"protocol": protocol, "dataset": ds, "subset": subset, **m})
    return rows


def format_markdown(report: Mapping[str, Any]) -> str:
    """Markdown table: one row per protocol / dataset / subset; NME and FR in percent."""
    t = report["meta"].get("fr_threshold", 0.1)
    lines = [
        "| protocol | dataset | subset | images | NME io (%) | NME ip (%) "
        f"| FR@{t:g} ip (%) | FR@{t:g} io (%) | AUC@{t:g} io |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in _rows(report):
        lines.append(
            f"| {r['protocol']} | {r['dataset']} | {r['subset']} | {r['count']} "
            f"| {100 * r['nme_inter_ocular']:.3f} | {100 * r['nme_inter_pupil']:.3f} "
            f"| {100 * r[f'fr_{t:g}']:.2f} | {100 * r[f'fr_{t:g}_inter_ocular']:.2f} "
            f"| {r[f'auc_{t:g}']:.4f} |"
        )
    notes = [f"- **{k}**: {v}" for k, v in report["meta"].get("protocols", {}).items()]
    notes += [f"- FR: {report['meta'].get('fr_definition', '')}"]
    notes += [f"- AUC: {report['meta'].get('auc_definition', '')}"]
    return "\n".join(lines + [""] + notes) + "\n"


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, epath.Path]:
    """Writes ``report.json`` (without per-image rows), ``per_image.csv``, ``report.md`` and
    ``ced.png`` (inter-ocular CED of the full sets, one panel per protocol) to ``out_dir``.

    ``per_image.csv`` has one row per image and group (an image of a subset appears again
    under each group it is scored in, see the ``subsets`` column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = paths.resolve(out_dir, "--out")
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "report.json",
        "md": out / "report.md",
        "csv": out / "per_image.csv",
        "png": out / "ced.png",
    }
    summary = {k: v for k, v in report.items() if k != "per_image"}
    paths.write_text(files["json"], json.dumps(summary, indent=2, default=float) + "\n")
    paths.write_text(files["md"], format_markdown(report))
    per_image = report.get("per_image", [])
    if per_image:
        cols = list(per_image[0])
        lines = [",".join(cols)] + [
            ",".join(
                f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]).replace(",", ";")
                for c in cols
            )
            for r in per_image
        ]
        paths.write_text(files["csv"], "\n".join(lines) + "\n")

    t = float(report["meta"].get("fr_threshold", 0.1))
    protocols = list(report["metrics"])
    fig, axes = plt.subplots(
        1, len(protocols), figsize=(5.5 * len(protocols), 4.5), squeeze=False, sharey=True
    )
    for ax, protocol in zip(axes[0], protocols, strict=True):
        for ds in report["metrics"][protocol]:
            groups = report["metrics"][protocol][ds]
            group = FULL if FULL in groups else next(iter(groups))
            nme = [
                r[f"{protocol}_nme_inter_ocular"]
                for r in per_image
                if r["dataset"] == ds and group in r["subsets"].split("|")
            ]
            if not nme:
                continue
            x, y = ced_curve(np.asarray(nme), t)
            a = groups[group][f"auc_{t:g}"]
            norm = ", box-size norm." if ds == "AFLW" else ""
            name = ds if group == FULL else f"{ds} {group}"
            ax.plot(x, y, label=f"{name} (AUC@{t:g} = {a:.3f}, n = {len(nme)}{norm})")
        ax.set_xlim(0, t)
        ax.set_ylim(0, 1)
        ax.set_xlabel("NME (inter-ocular)")
        ax.set_ylabel("fraction of images")
        ax.set_title(f"CED, {protocol} protocol")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    paths.write_bytes(files["png"], png.getvalue())
    plt.close(fig)
    return files
