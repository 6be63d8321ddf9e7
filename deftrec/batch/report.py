"""Reports of an evaluation: the console table, ``report.md`` (tables, protocol, timings) and
``report.png`` (NDCG@10 / HR@10 bars), and the protocol stated in all of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

KS = (5, 10, 20)
PROTOCOL = ("leave-one-out; full-catalog ranking (no sampled negatives); every model is scored on the same "
            "users by the same metrics code; history_excluded removes from every model's ranking (DeftRec, each "
            "baseline, validation and the endpoint alike) every item of the user's sequence before the target, "
            "however old (the prompt reads only the newest max_history of them); history_kept removes nothing; "
            "the baselines fit on every user's sequence before the split's target (SASRec early-stops on the last "
            "item of it) and score each user from that whole sequence")



def format_table(metrics: dict) -> str:
    lines = [f"split {metrics['split']}, {metrics['users']:,} users, sampler {metrics['sampler']} "
             f"({metrics['steps']} steps), coverage@10 {metrics['coverage']:.3f}",
             f"{'model':<11} | {'excluded HR@10':>14} {'NDCG@10 ± se':>15} {'HR@20':>6} | {'kept HR@10':>10} "
             f"{'NDCG@10':>8}"]
    for name, r in metrics["results"].items():
        ex, kp = r["history_excluded"], r["history_kept"]
        se = f" ± {ex['ndcg@10_se']:.4f}" if "ndcg@10_se" in ex else ""
        lines.append(f"{name:<11} | {ex['hr@10']:>14.4f} {ex['ndcg@10']:.4f}{se:>9} {ex['hr@20']:>6.4f} | "
                     f"{kp['hr@10']:>10.4f} {kp['ndcg@10']:>8.4f}")
    for name, reason in metrics.get("baselines_not_run", {}).items():
        lines.append(f"{name:<11} | not run: {reason}")
    return "\n".join(lines)


def write_report(metrics: dict, out: Path) -> None:
    """``report.md`` (tables, protocol, timings) and ``report.png`` (NDCG@10 / HR@10 bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics["results"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, proto in zip(axes, ("history_excluded", "history_kept")):
        x = np.arange(len(names))
        hr = [metrics["results"][n][proto]["hr@10"] for n in names]
        nd = [metrics["results"][n][proto]["ndcg@10"] for n in names]
        ax.bar(x - 0.2, hr, 0.4, label="HR@10")
        ax.bar(x + 0.2, nd, 0.4, label="NDCG@10")
        ax.set_xticks(x, names)
        ax.set_title(proto.replace("_", " "))
        ax.legend()
    fig.suptitle(f"DeftRec vs baselines — {metrics['split']}, {metrics['users']} users")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)
    rows = []
    for proto in ("history_excluded", "history_kept"):
        rows.append(f"\n### {proto.replace('_', ' ')}\n")
        rows.append("| model | " + " | ".join(f"{m}@{k}" for k in KS for m in ("HR", "NDCG")) + " |")
        rows.append("|---|" + "---|" * (2 * len(KS)))
        for n in names:
            r = metrics["results"][n][proto]
            rows.append(f"| {n} | " + " | ".join(f"{r[f'{m}@{k}']:.4f}" for k in KS for m in ("hr", "ndcg")) + " |")
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in metrics["seconds"].items())
    text = (f"# DeftRec evaluation\n\nSplit `{metrics['split']}`, {metrics['users']:,} users, sampler "
            f"`{metrics['sampler']}` ({metrics['steps']} steps), seed {metrics['seed']}. Model "
            f"`{metrics['model_version']}`, index `{metrics['index_version']}`.\n\nProtocol: {metrics['protocol']}.\n"
            + "\n".join(rows) + "".join(f"\n\n{n}: not run ({r})" for n, r in metrics.get("baselines_not_run", {}).items())
            + f"\n\nCoverage@10 (history excluded): {metrics['coverage']:.3f}. Time: {secs}.\n\n"
            "![DeftRec vs baselines](report.png)\n")
    (out / "report.md").write_text(text, encoding="utf-8")
