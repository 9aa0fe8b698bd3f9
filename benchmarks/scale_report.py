"""benchmarks/scale.py's outputs: the per-shape summary, scale.json, the markdown table and the plot."""

from __future__ import annotations

from pathlib import Path

from layerskip.jsonfile import write_json


def decode_ms(runs: dict, label: str, first: str, n: int) -> float:
    """ms per token after the first: (T(n) - T(1)) / (n - 1), medians."""
    return 1e3 * (runs[label]["median_seconds"] - runs[first]["median_seconds"]) / max(n - 1, 1)


def total_ms(runs: dict, label: str, n: int) -> float:
    return 1e3 * runs[label]["median_seconds"] / n


def size_summary(record: dict, settings: dict, bandwidth: float) -> dict:
    """The numbers the table shows for one shape (see scale.py's docstring for each)."""
    n, ours = settings["new_tokens"], record["ours"]
    ar_ms = decode_ms(ours, "ar", "ar_first", n)
    limit_ms = 1e3 * record["step_bytes"] / bandwidth
    ssd = {label: decode_ms(ours, label, "ssd_first", n) for label in ours if label.startswith("ssd_k")}
    ceiling = {label.removeprefix("ssd_"): ar_ms / ms for label, ms in ssd.items()}
    predicted = {f"k{c['k']}_{'short' if c['draft_vocab'] else 'full'}": c["predicted"] for c in record["costs"]}
    predicted_ceiling = {f"k{c['k']}_{'short' if c['draft_vocab'] else 'full'}": c["predicted_ceiling"]
                         for c in record["costs"]}
    summary = {
        "size": record["size"], "num_parameters": record["num_parameters"], "weight_bytes": record["weight_bytes"],
        "draft_layer": record["draft_layer"], "ar_ms_per_token": ar_ms, "limit_ms_per_token": limit_ms,
        "share_of_bandwidth": limit_ms / ar_ms, "ssd_ms_per_token": ssd, "ssd_ceiling": ceiling,
        "acceptance": {label.removeprefix("ssd_"): ours[label]["stats"].get("acceptance_rate") for label in ssd},
        "ssd_equals_ar": all(ours[label]["tokens"] == ours["ar"]["tokens"] for label in ssd),
        "predicted": predicted, "predicted_ceiling": predicted_ceiling,
        "peak_rss_bytes": {key: record[key] for key in ("rss_after_build", "rss_after_ours", "rss_after_hf")
                           if record.get(key)},
    }
    if "hf" in record:
        summary["hf"] = hf_summary(record, n)
    return summary


def hf_summary(record: dict, n: int) -> dict:
    ours, hf = record["ours"], record["hf"]
    ours_ssd = min((label for label in ours if label.startswith("ssd_k")), key=lambda lb: ours[lb]["median_seconds"])
    hf_ee = min((label for label in hf if label.startswith("hf_early")), key=lambda lb: hf[lb]["median_seconds"])
    return {
        "ours_ar_ms": total_ms(ours, "ar", n), "hf_greedy_ms": total_ms(hf, "hf_greedy", n),
        "ours_ssd_best": ours_ssd, "ours_ssd_best_ms": total_ms(ours, ours_ssd, n),
        "hf_early_exit_best": hf_ee, "hf_early_exit_best_ms": total_ms(hf, hf_ee, n),
        "ar_faster_by": hf["hf_greedy"]["median_seconds"] / ours["ar"]["median_seconds"],
        "ssd_faster_by": hf[hf_ee]["median_seconds"] / ours[ours_ssd]["median_seconds"],
        "hf_greedy_equals_ours": hf["hf_greedy"]["tokens"] == ours["ar"]["tokens"],
        "hf_early_exit_equals_ours": all(hf[lb]["tokens"] == ours["ar"]["tokens"] for lb in hf),
    }


def summarize(doc: dict) -> list[dict]:
    bandwidth = max(_bandwidths(doc))  # the best of the copies and sums
    return [size_summary(r, doc["settings"], bandwidth) if "error" not in r else {"size": r["size"], "error": r["error"]}
            for r in doc["sizes"]]


# ----------------------------------------------------------------------------- outputs


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _ks(values: dict, head: str) -> str:
    return " / ".join(f"{v:.2f}" for k, v in values.items() if k.endswith(head))


def _best_of(options: dict, head: str) -> str:
    """The largest of the values whose key (k4_full, ...) ends with head, and its k."""
    options = {k: v for k, v in options.items() if k.endswith(head)}
    best = max(options, key=options.get)
    return f"{options[best]:.2f}x ({best.split('_')[0]})"


def _best(values: dict, head: str, rate: str) -> str:
    return _best_of({k: v[rate] for k, v in values.items()}, head)


def markdown(doc: dict) -> str:
    s = doc["settings"]
    rates = [str(a) for a in s["acceptance"]]
    ks = "/".join(f"k={k}" for k in s["ks"])
    head = ["shape", "params", "E", "AR ms/token", "limit ms/token (share)", f"SSD ceiling, full head ({ks})",
            f"short head ({ks})", "predicted ceiling (full / short, best k)",
            *[f"predicted @ {r} (full / short, best k)" for r in rates],
            "vs transformers: AR / SSD faster by", "same tokens (SSD, HF)", "peak RSS (x weights)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in doc["summary"]:
        if "error" in row:
            lines.append(f"| {row['size']} | failed: {row['error']} |" + " |" * (len(head) - 2))
            continue
        hf = row.get("hf")
        versus = f"{hf['ar_faster_by']:.2f}x / {hf['ssd_faster_by']:.2f}x" if hf else "–"
        same = f"{row['ssd_equals_ar']}, {hf['hf_greedy_equals_ours'] and hf['hf_early_exit_equals_ours']}" if hf \
            else f"{row['ssd_equals_ar']}, –"
        rss = max(row["peak_rss_bytes"].values(), default=float("nan"))
        cells = [row["size"], _params(row["num_parameters"]), str(row["draft_layer"]), f"{row['ar_ms_per_token']:.2f}",
                 f"{row['limit_ms_per_token']:.2f} ({100 * row['share_of_bandwidth']:.0f}%)",
                 _ks(row["ssd_ceiling"], "full"), _ks(row["ssd_ceiling"], "short"),
                 f"{_best_of(row['predicted_ceiling'], 'full')} / {_best_of(row['predicted_ceiling'], 'short')}",
                 *[f"{_best(row['predicted'], 'full', r)} / {_best(row['predicted'], 'short', r)}" for r in rates],
                 versus, same, f"{rss / 1e9:.2f} GB ({rss / row['weight_bytes']:.2f}x)"]
        lines.append("| " + " | ".join(cells) + " |")
    bw = doc["bandwidth_bytes_per_second"]
    lines += ["", f"{s['dtype']}, {s['threads']} thread(s), device {s['device']}, {s['new_tokens']} new tokens after "
              f"{s['prompt_tokens']} random prompt tokens, {s['repeats']} interleaved repeats (medians). Bandwidth "
              f"at the start / end: {_rates(bw['start'])} / {_rates(bw['end'])} (the largest is the limit's). Load "
              f"average {doc['machine'].get('load_average')} -> {doc['machine'].get('load_average_end')}.",
              f"Command: `{' '.join(doc['command'])}`"]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["summary"] if "error" not in r]
    params = [r["num_parameters"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.loglog(params, [r["ar_ms_per_token"] for r in rows], "o-", label="AR, measured")
    left.loglog(params, [r["limit_ms_per_token"] for r in rows], "k--", label="bandwidth limit")
    left.set(xlabel="parameters", ylabel="ms / token", title="Autoregressive decoding")
    for head in ("full", "short"):
        right.semilogx(params, [max(v for k, v in r["ssd_ceiling"].items() if k.endswith(head)) for r in rows], "o-",
                       label=f"SSD ceiling, {head} head (best k)")
    for rate in doc["settings"]["acceptance"]:
        right.semilogx(params, [max(p[str(rate)] for p in r["predicted"].values()) for r in rows], "s:",
                       label=f"predicted at acceptance {rate}")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set(xlabel="parameters", ylabel="speed-up over AR", title="Self-speculative decoding")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(doc: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_json(out_dir / "scale.json", doc)]
    table = out_dir / "scale.md"
    table.write_text(markdown(doc), encoding="utf-8")
    paths.append(table)
    if any("error" not in r for r in doc["summary"]):
        paths.append(plot(doc, out_dir / "scale.png"))
    return paths


def _bandwidths(doc: dict) -> list[float]:
    """Every bandwidth measured, in bytes per second (older runs recorded one copy's at the start and end)."""
    values = []
    for measured in doc["bandwidth_bytes_per_second"].values():
        values += measured.values() if isinstance(measured, dict) else [measured]
    return values


def _rates(measured: dict | float) -> str:
    if not isinstance(measured, dict):
        return f"copy {measured / 1e9:.1f} GB/s"
    return ", ".join(f"{kind} {value / 1e9:.1f} GB/s" for kind, value in measured.items())
