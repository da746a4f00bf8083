"""The `respec` command line: run graphs, read traces, benchmark."""

from __future__ import annotations

import json
import signal
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
    set_: Annotated[list[str], typer.Option("--set", help="override a key: --set run.seed=3 (=null removes it)")] = [],  # noqa: B006
    progress: Annotated[bool, typer.Option(help="live progress view on a terminal")] = True,
    resume: Annotated[bool, typer.Option(help="continue runs/<name> from its latest checkpoint")] = False,
) -> None:
    """Run the graph in CONFIG until an actor ends it; exit non-zero with the reason if it fails."""
    from respec.runtime.graph import ConfigError
    from respec.runtime.launcher import run_file

    # Ctrl-C (SIGINT) stops the run cleanly even where it was started ignoring SIGINT: a
    # shell script's background job (`respec run ... &`) inherits SIG_IGN, and then Python
    # would never raise KeyboardInterrupt, so nothing could stop the run but a kill.
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
    repeats: Annotated[int, typer.Option(help="runs of every config per batch size, in turn; the fastest is kept")] = 1,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default)")] = 0,
) -> None:
    """Accepted tokens per second of SD configs against plain decoding, per batch size."""
    from respec.bench.sd import run_benchmark, write_json

    results = run_benchmark(str(model), draft, tuple(int(b) for b in batches.split(",")),
                            max_new_tokens=max_new_tokens, device=device,
                            plot=str(plot or json_file.with_suffix(".png")), repeats=repeats, threads=threads)
    write_json(results, str(json_file))
    typer.echo(f"wrote {json_file} and {plot or json_file.with_suffix('.png')}")


@app.command()
def profile(
    config: Annotated[Path, typer.Argument(help="a run YAML: its Verifier's model_path, its Generator's drafter")],
    out: Annotated[Path, typer.Option(help="write the profile JSON here")] = Path("runs/profile.json"),
    configs: Annotated[str, typer.Option(help="comma-separated draft shapes s<steps>_t<branch>_n<nodes>")]
        = "s1_t1_n1,s2_t1_n2,s4_t1_n4,s6_t1_n6,s3_t2_n6",
    batches: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,2,4,8,16,32,64",
    contexts: Annotated[str, typer.Option(help="comma-separated context lengths (tokens)")] = "16,64,144",
    repeats: Annotated[int, typer.Option(help="timed steps per grid point (their mean is kept)")] = 8,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default)")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Measure step time of plain decoding and each draft shape over batch x context, for the Scheduler."""
    from respec.runtime.graph import ConfigError
    from respec.sched.run_profile import profile_run_config

    try:
        measured = profile_run_config(config, out, _names(configs), _ints(batches), _ints(contexts), repeats,
                                      threads, device)
    except (ConfigError, ValueError, OSError) as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out}: {len(measured.points)} points in {measured.wall_s:.1f}s on {measured.key['device']}")


@bench_app.command("adaptive")
def bench_adaptive(
    json_file: Annotated[Path, typer.Option("--json", help="write results here")] = Path("runs/bench_adaptive.json"),
    model: Annotated[Path, typer.Option(help="the policy checkpoint")] = Path("models/tiny/policy"),
    draft: Annotated[str, typer.Option(help="an EAGLE head directory, or ngram")] = "models/tiny/eagle",
    batches: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,2,4,8,16,32,64",
    configs: Annotated[str, typer.Option(help="comma-separated static draft shapes")]
        = "s1_t1_n1,s2_t1_n2,s4_t1_n4,s6_t1_n6,s3_t2_n6",
    profile_file: Annotated[Path | None, typer.Option("--profile", help="use this profile instead of measuring")]
        = None,
    repeats: Annotated[int, typer.Option(help="runs per measurement (median kept)")] = 5,
    plot: Annotated[Path | None, typer.Option(help="PNG (default: beside the JSON)")] = None,
    tail: Annotated[str, typer.Option(help="long tail: lognormal (forced lengths) or natural (each row to its "
                                           "EOS: for a policy whose answers vary in length)")] = "lognormal",
) -> None:
    """Throughput of the Scheduler's choice against no-SD and every static draft shape, per batch size
    and over a long-tail rollout phase."""
    from respec.bench.adaptive import plot as plot_results
    from respec.bench.adaptive import print_tables, run_benchmark
    from respec.bench.sd import write_json

    plot = plot or json_file.with_suffix(".png")
    try:
        results = run_benchmark(str(model), draft, tuple(_ints(batches)), tuple(_names(configs)),
                                str(profile_file) if profile_file else None,
                                str(json_file.with_name(json_file.stem + "_profile.json")), repeats,
                                tail_kind=tail)
    except (ValueError, OSError) as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from None
    print_tables(results)
    write_json(results, str(json_file))
    plot_results(results, str(plot))
    typer.echo(f"wrote {json_file} and {plot}")


@bench_app.command("peers")
def bench_peers(
    json_file: Annotated[Path, typer.Option("--json", help="write results here")] = Path("runs/bench_peers.json"),
    model: Annotated[Path, typer.Option(help="the policy checkpoint")] = Path("models/tiny/policy"),
    eagle: Annotated[Path, typer.Option(help="respec's own EAGLE head (sd_eagle)")] = Path("models/tiny/eagle"),
    eagle3: Annotated[Path, typer.Option(help="EAGLE-3-layout head for both engines (sd_eagle3); distilled here "
                                              "if missing")] = Path("runs/peers_eagle3_head"),
    batches: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,2,4,8,16,32,64",
    modes: Annotated[str, typer.Option(help="comma-separated: nosd,sd_ngram,sd_eagle3,sd_eagle")]
        = "nosd,sd_ngram,sd_eagle3,sd_eagle",
    prompts: Annotated[int, typer.Option(help="prompts per measurement (split into chunks of the batch size)")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per row at most (stop at <eos>)")] = 64,
    k: Annotated[int, typer.Option(help="draft chain length on both sides")] = 4,
    repeats: Annotated[int, typer.Option(help="interleaved timed runs per side (median kept)")] = 3,
    threads: Annotated[int, typer.Option(help="compute threads of each engine (CPU)")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    pause_s: Annotated[float, typer.Option(help="idle seconds before each timed run (vLLM's worker spins 1 s "
                                                "after its last step)")] = 1.2,
    vllm_single_process: Annotated[bool, typer.Option(help="vLLM's engine core and worker in this process, on one "
                                                           "thread like respec (default: vLLM's three processes)")]
        = False,
    plot: Annotated[Path | None, typer.Option(help="PNG (default: beside the JSON)")] = None,
) -> None:
    """Tokens per second of respec's engine against vLLM (run it in a venv with vLLM), per batch size,
    without SD and with n-gram / EAGLE drafting; greedy, same prompts, outputs checked equal."""
    from respec.bench.peers import MODES, Settings, run_benchmark
    from respec.bench.peers_report import plot as plot_results
    from respec.bench.peers_report import print_table
    from respec.bench.peers_vllm import VllmMissing
    from respec.bench.sd import write_json

    chosen = tuple(part.strip() for part in modes.split(",") if part.strip())
    if unknown := set(chosen) - set(MODES):
        raise typer.BadParameter(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    settings = Settings(str(model), str(eagle), str(eagle3), tuple(_ints(batches)), chosen, prompts, max_new_tokens,
                        k, repeats, threads, device, pause_s, vllm_single_process)
    try:
        results = run_benchmark(settings, progress=lambda line: typer.echo(line, err=True))
    except VllmMissing as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from None
    print_table(results)
    write_json(results, str(json_file))
    plot = plot or json_file.with_suffix(".png")
    plot_results(results, str(plot))
    typer.echo(f"wrote {json_file} and {plot}")


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    from respec.engine.drafters.base import DraftShape

    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        try:
            DraftShape.parse(name)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
    return names


@app.command()
def prepare(
    out: Annotated[Path, typer.Option(help="where policy/ and eagle/ go")] = Path("models/tiny"),
    sft_steps: Annotated[int, typer.Option(help="supervised steps of the policy")] = 600,
    eagle_steps: Annotated[int, typer.Option(help="distillation steps of the EAGLE head")] = 600,
    seed: Annotated[int, typer.Option()] = 0,
    force: Annotated[bool, typer.Option(help="retrain what already exists")] = False,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default)")] = 0,
    task: Annotated[str, typer.Option(help="the built-in task to train on (default: the embedded one)")] = "",
    task_param: Annotated[list[str], typer.Option(help="KEY=VALUE task parameter (repeatable; replaces the "
                                                       "default task's parameters)")] = [],  # noqa: B006
    head_sampled: Annotated[float, typer.Option(help="share of the head's training completions sampled at "
                                                     "T = 1 (the rest greedy)")] = 0.5,
) -> None:
    """Train the built-in tiny policy (supervised) and its EAGLE head (distilled) from scratch."""
    from respec.prepare import TASK, TASK_PARAMS
    from respec.prepare import prepare as run_prepare

    params = _overrides(task_param) if task_param or task else dict(TASK_PARAMS)
    try:
        report = run_prepare(out, sft_steps, eagle_steps, seed, force, threads, task_name=task or TASK,
                             task_params=params, head_sampled=head_sampled)
    except (ValueError, OSError) as error:  # a bad task parameter, a directory that cannot be written
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report, indent=2))


@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="the policy checkpoint (config.json, safetensors, tokenizer.json)")],
    draft: Annotated[Path | None, typer.Option(help="an EAGLE head directory: speculative decoding with it")] = None,
    shape: Annotated[str, typer.Option(help="auto (the Scheduler's rule), nosd, or a fixed shape like s4_t1_n4")]
        = "auto",
    profile: Annotated[Path | None, typer.Option(help="auto: start from this `respec profile` JSON")] = None,
    host: Annotated[str, typer.Option(help="HTTP address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    max_rows: Annotated[int, typer.Option(help="requests decoded together per replica (KV slots)")] = 16,
    max_len: Annotated[int, typer.Option(help="cache positions per row (0: the model's, at most 2048)")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    threads: Annotated[int, typer.Option(help="torch threads per replica (0: torch's default)")] = 1,
    replicas: Annotated[int, typer.Option(help="model copies (each its own engine)")] = 1,
    num_cpus: Annotated[float, typer.Option(help="CPUs per replica")] = 1.0,
    num_gpus: Annotated[float, typer.Option(help="GPUs per replica")] = 0.0,
    model_name: Annotated[str, typer.Option(help="the model name responses carry (default: MODEL_DIR's name)")] = "",
    ray_address: Annotated[str, typer.Option(help='a Ray cluster to join ("auto", HOST:6379); "" starts one')] = "",
) -> None:
    """Serve MODEL_DIR (with --draft: speculative decoding) on Ray Serve behind OpenAI's
    /v1/completions and /v1/chat/completions, until interrupted."""
    from respec.serve.build import ServeOptions, check_options

    options = ServeOptions(str(model_dir), str(draft or ""), shape, str(profile or ""), max_rows, max_len, device,
                           dtype, threads, model_name=model_name, num_cpus=num_cpus, num_gpus=num_gpus)
    try:
        check_options(options)
    except (ValueError, OSError) as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from None
    _serve_until_interrupted(options, host, port, replicas, ray_address)


def _serve_until_interrupted(options, host: str, port: int, replicas: int, ray_address: str) -> None:
    import time

    try:
        import ray

        from respec.serve.deployment import start
    except ImportError as error:
        typer.secho(f"error: {error}; install the serve extra: pip install 'respec[serve]'", fg="red", err=True)
        raise typer.Exit(2) from None
    ray.init(address=ray_address or None, include_dashboard=False)
    # SIGTERM (a service manager, `kill`) stops it as Ctrl-C does: the deployment is taken down
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        start(options, host, port, num_replicas=replicas)
        typer.echo(f"serving {options.name} at http://{host}:{port}/v1 (Ctrl-C stops)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        from ray import serve as ray_serve

        ray_serve.shutdown()
        ray.shutdown()


def _overrides(pairs: list[str]) -> dict:
    from respec.runtime.graph import load_yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set takes KEY=VALUE, got {pair!r}")
        overrides[key] = load_yaml(value)
    return overrides


def main() -> None:
    app()


if __name__ == "__main__":
    main()


def _rl_bench(which: str):
    def command(
        json_file: Annotated[Path, typer.Option("--json", help="write results here (and a PNG beside it)")]
            = Path(f"runs/bench_{which}.json"),
        steps: Annotated[int, typer.Option(help="RL steps per variant")] = 100,
        lr: Annotated[float, typer.Option(help="the trainer's learning rate (0: the run file's)")] = 0.0,
        config: Annotated[Path, typer.Option(help="the asynchronous SD run file the variants change")]
            = Path("configs/tiny.yaml"),
        variants: Annotated[str, typer.Option(help="comma-separated variants to run (default: all)")] = "",
        seeds: Annotated[str, typer.Option(help="e2e only: comma-separated run seeds, every variant runs once "
                                                  "per seed (accuracy within noise over seeds); empty: the file's")]
            = "",
        set_: Annotated[list[str], typer.Option("--set", help="override a key in every variant: "
                                                "--set actors.trainer.params.device=cuda:1")] = [],  # noqa: B006
    ) -> None:
        from respec.bench import rl_runs

        extra = {**({"actors.trainer.params.lr": lr} if lr else {}), **_overrides(set_)}
        if seeds and which != "e2e":
            raise typer.BadParameter("--seeds is for `respec bench e2e` only", param_hint="--seeds")
        try:
            repeat = {"seeds": tuple(int(s) for s in seeds.split(","))} if seeds else {}
        except ValueError:
            raise typer.BadParameter(f"not a comma-separated list of whole numbers: {seeds!r}",
                                     param_hint="--seeds") from None
        try:
            only = tuple(name.strip() for name in variants.split(",") if name.strip())
            getattr(rl_runs, f"bench_{which}")(json_file, steps, extra, config, only, **repeat)
        except ValueError as error:
            typer.secho(f"error: {error}", fg="red", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"wrote {json_file} and {json_file.with_suffix('.png')}")

    command.__doc__ = {
        "staleness": "Acceptance over RL steps: frozen drafter, online KD, reward-weighted KD (ReSpec Fig. 4).",
        "quality": "Reward curves of no-SD and SD with each distillation mode, same seed (ReSpec Fig. 10).",
        "interval": "Reward-weighted distillation every I in {1, 3, 5} policy versions (ReSpec Fig. 15).",
        "e2e": "Wall-clock to N RL steps: sync no-SD baseline, async no-SD, async SD, full respec.",
    }[which]
    return command


for _which in ("staleness", "quality", "interval", "e2e"):
    bench_app.command(_which)(_rl_bench(_which))
