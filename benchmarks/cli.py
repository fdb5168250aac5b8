"""`huse-bench BUNDLE` and `huse-bench compare A.json B.json`: a thin click layer."""

from __future__ import annotations

import shutil
import sys
import tempfile

import click

from huse.benchmarks.serve import SYSTEMS
from huse.benchmarks.suite import MODES
from huse.runtime.bundle import EXPORT_FLAGS
from huse.runtime.cli import run_cli


class _DefaultRun(click.Group):
    """`huse-bench BUNDLE ...` means `huse-bench run BUNDLE ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultRun, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Benchmark a bundle against the PyTorch baseline, or compare two benchmark results."""


def _ints(ctx, param, value: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers, refused before anything runs."""
    try:
        out = tuple(int(v) for v in value.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise click.BadParameter(f"comma-separated positive integers, e.g. 1,8,64; got {value!r}")
    return out


def _names(*choices: str):
    """A click callback: a comma-separated list of some of `choices`."""
    def check(ctx, param, value: str | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        names = tuple(v.strip() for v in value.split(","))
        bad = [n for n in names if n not in choices]
        if bad:
            raise click.BadParameter(f"{bad[0]!r} is not one of {', '.join(choices)} (comma-separated)")
        return names
    return check


@main.command(context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="bench-results", type=click.Path(file_okay=False), help="Folder for result.json, result.md, PNGs.")
@click.option("--batches", default="1,8,32,128", callback=_ints, help="Comma-separated batch sizes.")
@click.option("--modes", default="image,text,fused", callback=_names(*MODES))
@click.option("--precisions", callback=_names("fp32", *EXPORT_FLAGS),
              help="Comma-separated (default: every precision in the bundle).")
@click.option("--repeats", default=3, help="Interleaved rounds per configuration (their spread is reported).")
@click.option("--seconds", default=0.5, help="Time budget of one configuration in one round.")
@click.option("--eval-size", default=1000, help="Held-out products for the accuracy of each configuration.")
@click.option("--threads", type=int, help="Intra-op threads for onnxruntime and torch (default: all cores).")
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="Training run for the PyTorch baseline (default: the bundle's source run).")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch baseline.")
@click.option("--torch-compile", is_flag=True, help="Also measure torch.compile (minutes of compilation on small CPUs).")
@click.option("--no-cold-start", is_flag=True, help="Skip the fresh-process cold-start measurements.")
@click.option("--shared-threads", is_flag=True, help="Run every onnxruntime session on one shared thread pool "
              "(huse.runtime.share_threads); the one-core stage costs are then skipped.")
def run(bundle, out, batches, modes, precisions, repeats, seconds, eval_size, threads, run_dir, no_torch, torch_compile,
        no_cold_start, shared_threads) -> None:
    """Measure latency, throughput, memory and accuracy of BUNDLE on every available backend."""
    def body():
        from huse.benchmarks.report import to_markdown
        from huse.benchmarks.suite import BenchConfig, import_time, run_suite, write_outputs

        cfg = BenchConfig(batches=batches, modes=modes, precisions=precisions, repeats=repeats,
                          seconds=seconds, eval_size=eval_size, threads=threads, run=run_dir, torch_baseline=not no_torch,
                          torch_compile=torch_compile, cold_start=not no_cold_start,
                          shared_threads=shared_threads)
        result = run_suite(bundle, cfg)
        result["import_time"] = import_time()
        files = write_outputs(result, out)
        click.echo(to_markdown(result))
        click.echo(f"wrote {', '.join(str(f) for f in files)}")
    run_cli(body)


@main.command()
@click.argument("a", type=click.Path(exists=True, dir_okay=False))
@click.argument("b", type=click.Path(exists=True, dir_okay=False))
@click.option("--floor", default=0.05, show_default=True, help="Smallest slowdown flagged, whatever the spread.")
@click.option("--all", "show_all", is_flag=True, help="Show unchanged configurations too.")
def compare(a, b, floor, show_all) -> None:
    """Ratios B/A per configuration; exit 1 when B regressed by more than the measured spread."""
    def body():
        from huse.benchmarks.compare import compare as cmp, format_compare, load_result, machine_mismatch

        ra, rb = load_result(a), load_result(b)
        for warning in machine_mismatch(ra, rb):
            click.echo(f"warning: {warning}", err=True)
        rows = cmp(ra, rb, floor=floor)
        click.echo(format_compare(rows, only_changes=not show_all))
        if any(r.regression for r in rows):
            sys.exit(1)
    run_cli(body)


@main.command(context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="bench-results/serve", type=click.Path(file_okay=False),
              help="Folder for result.json, result.md, throughput_p99.png and the server logs.")
@click.option("--concurrency", default="1,8,32,64,128", callback=_ints, help="Comma-separated closed-loop concurrency levels.")
@click.option("--seconds", default=10.0, help="Measured seconds per level.")
@click.option("--warmup", default=3.0, help="Seconds of load before each server's first level (discarded).")
@click.option("--rounds", default=3, help="Every system once per round; medians, and ratios with their range.")
@click.option("--systems", default="max-batch-1,batching,triton", callback=_names(*SYSTEMS), help="Which servers: max-batch-1, batching, triton.")
@click.option("--precision", default="fp32")
@click.option("--max-batch", default=64, help="Both batchers' largest batch.")
@click.option("--max-delay-ms", default=3.0, help="Both batchers' longest wait for a batch to fill.")
@click.option("--threads", type=int, help="onnxruntime threads of every server and the offline engine (default: all cores).")
@click.option("--items", default=32, help="Distinct real products cycled through the requests.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="Catalog with image,name columns (default: fashion-products, exported once into --out).")
@click.option("--overload-seconds", default=30.0, help="Length of the overload run (0: skip it).")
@click.option("--overload-factor", default=4.0, help="Overload rate as a multiple of the best sustained rate.")
@click.option("--deadline", default=2.0, help="huse serve --timeout during the overload run (seconds).")
@click.option("--venv", type=click.Path(file_okay=False), help="PyTriton venv (default ~/.cache/huse/pytriton-venv; "
              "created on first use).")
@click.option("--spin/--no-spin", default=True, help="huse serve's onnxruntime thread spinning (its --spin/--no-spin).")
def serve(bundle, out, concurrency, seconds, warmup, rounds, systems, precision, max_batch, max_delay_ms, threads, items,
          data, overload_seconds, overload_factor, deadline, venv, spin) -> None:
    """`huse serve` under load from wrk/hey on loopback, beside --max-batch 1, Triton (PyTriton) and the offline ceiling."""
    def body():
        from huse.benchmarks.serve import ServeBenchConfig, run_serve_bench, to_markdown, write_outputs

        cfg = ServeBenchConfig(concurrency=concurrency, seconds=seconds, warmup=warmup, rounds=rounds,
                               systems=systems, precision=precision, max_batch=max_batch,
                               max_delay_ms=max_delay_ms, threads=threads, items=items, data=data,
                               overload_seconds=overload_seconds, overload_factor=overload_factor, deadline_s=deadline,
                               venv=venv, spin=spin, say=click.echo)
        # Server logs, wrk scripts and request bodies are scratch (the overload log alone is megabytes): a
        # temporary folder, removed on success and kept (and named) when the run fails.
        work = tempfile.mkdtemp(prefix="huse-bench-serve-")
        try:
            result = run_serve_bench(bundle, cfg, work)
        except BaseException:
            click.echo(f"server logs and scripts kept in {work}", err=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
        files = write_outputs(result, out)
        click.echo(to_markdown(result))
        click.echo(f"wrote {', '.join(str(f) for f in files)}")
    run_cli(body)


from huse.benchmarks.retrieval import main as _retrieval  # noqa: E402  (light at import: torch only inside the backbone baseline)

main.add_command(_retrieval, "retrieval")


if __name__ == "__main__":
    main()
