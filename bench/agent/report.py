"""Turning a run into what people read: the targets checked, a markdown table, two plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = (
    ("workload", "workload", "{}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.3f}"),
    ("itl_p50_s", "ITL p50 s", "{:.3f}"),
    ("itl_p99_s", "ITL p99 s", "{:.3f}"),
    ("out_tok_s", "out tok/s", "{:.1f}"),
    ("goodput_rps_per_core", "goodput req/s/core", "{:.3f}"),
    ("agent_step_p99_s", "agent step p99 s", "{:.2f}"),
    ("failed", "failed", "{}"),
    ("reuse_ratio", "reuse", "{:.3f}"),
    ("decode_local_hit_rate", "decode-local", "{:.3f}"),
    ("bytes_moved_ratio", "bytes moved", "{:.2f}"),
)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(modes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issues 7's, 12's and 17's targets against this run's numbers; a target whose modes did not run is `met: null`."""
    prefix, peer = modes.get("prefix_aware", {}), modes.get("transformers_serve", {})
    colo, disagg = modes.get("colocated", {}), modes.get("disaggregated", {})
    vllm = modes.get("vllm", {})
    checks: dict[str, tuple[float | None, str, Any]] = {
        "prefix_aware_ttft_p50_vs_transformers_serve": (
            _ratio(prefix.get("ttft_p50_s"), peer.get("ttft_p50_s")), "<= 0.333", lambda v: v <= 1 / 3),
        "prefix_aware_out_tok_s_vs_transformers_serve": (
            _ratio(prefix.get("out_tok_s"), peer.get("out_tok_s")), ">= 2.0", lambda v: v >= 2.0),
        "prefix_aware_reuse_ratio": (prefix.get("reuse_ratio"), ">= 0.98", lambda v: v >= 0.98),
        "disaggregated_short_ttft_p99_vs_colocated": (
            _ratio(disagg.get("ttft_p99_s"), colo.get("ttft_p99_s")), "<= 0.333", lambda v: v <= 1 / 3),
        "disaggregated_goodput_per_core_vs_colocated": (
            _ratio(disagg.get("goodput_rps_per_core"), colo.get("goodput_rps_per_core")), ">= 1.5", lambda v: v >= 1.5),
    }  # fmt: skip
    for name in ("vllm_pd", "vllm_pair"):  # agentkv in front of two vLLM workers, against one vLLM server
        ours = modes.get(name, {})
        checks |= {
            f"{name}_ttft_p99_vs_vllm": (_ratio(ours.get("ttft_p99_s"), vllm.get("ttft_p99_s")), "<= 0.5", lambda v: v <= 0.5),
            f"{name}_itl_p99_vs_vllm": (_ratio(ours.get("itl_p99_s"), vllm.get("itl_p99_s")), "<= 0.5", lambda v: v <= 0.5),
            f"{name}_out_tok_s_vs_vllm": (_ratio(ours.get("out_tok_s"), vllm.get("out_tok_s")), ">= 1.2", lambda v: v >= 1.2),
            f"{name}_reuse_ratio": (ours.get("reuse_ratio"), ">= 0.98", lambda v: v >= 0.98),
        }  # fmt: skip
    out = {name: {"value": value, "target": target, "met": None if value is None else bool(ok(value))}
           for name, (value, target, ok) in checks.items()}  # fmt: skip
    moved = {m: d["bytes_moved_ratio"] for m, d in modes.items() if d.get("bytes_moved_ratio") is not None}
    out["bytes_moved_ratio"] = {"value": moved, "target": "= 1.00 (modes that moved KV)",
                                "met": all(round(v, 2) == 1.0 for v in moved.values()) if moved else None}  # fmt: skip
    failed = {m: d.get("failed") for m, d in modes.items()}
    out["failed"] = {"value": failed, "target": "= 0", "met": all(v == 0 for v in failed.values()) if failed else None}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| mode | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, mode in result["modes"].items():
        if "error" in mode:
            lines.append(f"| {name} | error: {mode['error'].splitlines()[0][:120]} |")
            continue
        cells = [("-" if mode.get(key) is None else fmt.format(mode[key])) for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| target | value | wanted | met |", "|---|---|---|---|"]
    for name, t in result.get("targets", {}).items():
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {name} | {_show(t['value'])} | {t['target']} | {met} |")
    return "\n".join(lines) + "\n"


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_show(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def plots(ttfts: dict[str, list[float]], reuse: dict[str, dict[int, float]], out_dir: Path) -> dict[str, str]:
    """TTFT CDF per mode and reuse per turn per mode, as PNG files in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, values in ttfts.items():
        if values:
            xs = np.sort(values)
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=mode)
    ax.set(xscale="log", xlabel="time to first token (s)", ylabel="fraction of requests", title="TTFT CDF per mode")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    files["ttft_cdf"] = str(out_dir / "ttft_cdf.png")
    fig.savefig(files["ttft_cdf"], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, by_turn in reuse.items():
        if by_turn:
            ax.plot(list(by_turn), list(by_turn.values()), marker="o", label=mode)
    ax.set(xlabel="turn", ylabel="reused / reusable tokens", title="Prefix reuse per turn", ylim=(0, 1.05))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    files["reuse_per_turn"] = str(out_dir / "reuse_per_turn.png")
    fig.savefig(files["reuse_per_turn"], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return files
