"""Table and plot of `respec bench peers` results."""

from __future__ import annotations

from rich.table import Table

from respec.bench.console import table_console

_COLUMNS = ("batch", "mode", "vLLM engine", "respec tok/s", "vLLM tok/s", "ratio", "ratio of best runs", "ratio per CPU-s", "vs vLLM best", "same tokens",
            "respec accept len")


def print_table(results: dict) -> None:
    table = Table(title=f"respec bench peers ({results['device']}, {results['threads']} thread(s), "
                        f"{results['sampling']}, k={results['k']})")
    for column in _COLUMNS:
        table.add_column(column, justify="right", no_wrap=column == "mode")
    for row in results["rows"]:
        same = "yes" if row["tokens_equal"] else f"{row['rows_differ']} rows differ"
        table.add_row(str(row["batch"]), row["mode"], row["vllm_engine"], f"{row['respec_tokens_per_s']:.1f}",
                      f"{row['vllm_tokens_per_s']:.1f}", f"{row['ratio']:.2f}x", f"{row['ratio_best']:.2f}x",
                      _x(row.get("ratio_per_cpu_s")), f"{row['ratio_vs_vllm_best']:.2f}x",
                      same, f"{row['respec_accept_len']:.2f}")
    table_console().print(table)


def markdown_table(results: dict) -> str:
    """The same rows as a Markdown table (what docs/PERFORMANCE.md records)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for row in results["rows"]:
        same = "yes" if row["tokens_equal"] else f"{row['rows_differ']} differ"
        lines.append(f"| {row['batch']} | {row['mode']} | {row['vllm_engine']} | {row['respec_tokens_per_s']:.1f} | "
                     f"{row['vllm_tokens_per_s']:.1f} | {row['ratio']:.2f}x | {row['ratio_best']:.2f}x | "
                     f"{_x(row.get('ratio_per_cpu_s'))} | "
                     f"{row['ratio_vs_vllm_best']:.2f}x | "
                     f"{same} | {row['respec_accept_len']:.2f} |")
    return "\n".join(lines)


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, ratio) = plt.subplots(1, 2, figsize=(12, 4.5))
    modes = list(dict.fromkeys(row["mode"] for row in results["rows"]))
    for index, mode in enumerate(modes):
        rows = [row for row in results["rows"] if row["mode"] == mode]
        batches = [row["batch"] for row in rows]
        colour = f"C{index}"
        speed.plot(batches, [r["respec_tokens_per_s"] for r in rows], marker="o", color=colour, label=f"respec {mode}")
        speed.plot(batches, [r["vllm_tokens_per_s"] for r in rows], marker="x", linestyle="--", color=colour,
                   label=f"vLLM ({rows[0]['vllm_engine']})")
        ratio.plot(batches, [r["ratio"] for r in rows], marker="o", color=colour, label=f"{mode}, wall")
        per_cpu = [r.get("ratio_per_cpu_s") for r in rows]
        if all(value is not None for value in per_cpu):
            ratio.plot(batches, per_cpu, marker=".", linestyle=":", color=colour, label=f"{mode}, per CPU-s")
    ratio.axhline(1.0, color="grey", linestyle="--")
    for axis, label in ((speed, "generated tokens / s"), (ratio, "respec / vLLM tokens per second")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    speed.set_yscale("log")
    figure.suptitle(f"respec vs vLLM {results['vllm']} on {results['device']}, {results['threads']} thread(s), greedy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
