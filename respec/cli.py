"""The `respec` command line: run graphs, read traces, benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: each compares against its baseline in the same run.")
app.add_typer(bench_app, name="bench")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="the run's YAML file")],
    name: Annotated[str | None, typer.Option(help="run name (default: run.name from the file)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a key: --set run.seed=3")] = [],  # noqa: B006
    progress: Annotated[bool, typer.Option(help="live progress view on a terminal")] = True,
    resume: Annotated[bool, typer.Option(help="continue runs/<name> from its latest checkpoint")] = False,
) -> None:
    """Run the graph in CONFIG until an actor ends it; exit non-zero with the reason if it fails."""
    from respec.runtime.graph import ConfigError
    from respec.runtime.launcher import run_file

    try:
        result = run_file(config, name, _overrides(set_), progress, resume)
    except ConfigError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from None
    colour = "green" if result.ok else "red"
    typer.secho(f"{'ok' if result.ok else 'FAILED'}: {result.reason} ({result.wall_s:.1f}s) -> {result.run_dir}",
                fg=colour, err=True)
    raise typer.Exit(result.exit_code)


@app.command()
def trace(
    run_dir: Annotated[Path, typer.Argument(help="runs/<name>")],
    chrome: Annotated[Path | None, typer.Option(help="write Chrome/Perfetto trace JSON here")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the summary as JSON here")] = None,
) -> None:
    """Per-actor and per-message summary and timeline of a run's trace."""
    from respec.runtime.trace_report import trace_command

    try:
        trace_command(str(run_dir), str(chrome) if chrome else None, str(json_out) if json_out else None)
    except FileNotFoundError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from None


@bench_app.command("runtime")
def bench_runtime(
    json_file: Annotated[Path, typer.Option("--json", help="write results here")] = Path("runs/bench_runtime.json"),
    quick: Annotated[bool, typer.Option(help="fewer iterations (for tests)")] = False,
) -> None:
    """Round trips and throughput of respec actors against bare pyzmq; 64 MiB across processes."""
    from respec.bench.runtime import run_benchmark

    results = run_benchmark(quick=quick)
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(results, indent=2))
    typer.echo(f"wrote {json_file}")


@bench_app.command("sd")
def bench_sd(
    model: Annotated[Path, typer.Option(help="local checkpoint directory of the policy")],
    json_file: Annotated[Path, typer.Option("--json", help="write results here")] = Path("runs/bench_sd.json"),
    draft: Annotated[str, typer.Option(help="drafter: ngram")] = "ngram",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    batches: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,2,4,8,16,32,64",
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per row")] = 64,
    plot: Annotated[Path | None, typer.Option(help="PNG of speedup against batch size")] = None,
) -> None:
    """Accepted tokens per second of SD configs against plain decoding, per batch size."""
    from respec.bench.sd import run_benchmark, write_json

    results = run_benchmark(str(model), draft, tuple(int(b) for b in batches.split(",")),
                            max_new_tokens=max_new_tokens, device=device,
                            plot=str(plot or json_file.with_suffix(".png")))
    write_json(results, str(json_file))
    typer.echo(f"wrote {json_file} and {plot or json_file.with_suffix('.png')}")


@app.command()
def prepare(
    out: Annotated[Path, typer.Option(help="where policy/ and eagle/ go")] = Path("models/tiny"),
    sft_steps: Annotated[int, typer.Option(help="supervised steps of the policy")] = 600,
    eagle_steps: Annotated[int, typer.Option(help="distillation steps of the EAGLE head")] = 300,
    seed: Annotated[int, typer.Option()] = 0,
    force: Annotated[bool, typer.Option(help="retrain what already exists")] = False,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default)")] = 0,
) -> None:
    """Train the built-in tiny policy (supervised) and its EAGLE head (distilled) from scratch."""
    from respec.prepare import prepare as run_prepare

    try:
        report = run_prepare(out, sft_steps, eagle_steps, seed, force, threads)
    except OSError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report, indent=2))


def _overrides(pairs: list[str]) -> dict:
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set takes KEY=VALUE, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main() -> None:
    app()


if __name__ == "__main__":
    main()
