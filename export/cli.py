"""`huse-export`: a thin click layer over huse.export.api."""

from __future__ import annotations

from pathlib import Path

import click

from huse.export.api import ExportOptions
from huse.runtime.cli import run_cli


def _batch(value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        lo, opt, hi = (int(v) for v in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected MIN:OPT:MAX, e.g. 1:8:64") from None
    return lo, opt, hi


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Bundle directory (default: SRC when SRC is a bundle).")
@click.option("--fp16", is_flag=True, help="Add FP16 graphs (float32 IO), gated on top-1 agreement >= 99.9% "
                                              "(multi-label: mean Jaccard of the predicted label sets).")
@click.option("--int8", is_flag=True, help="Add INT8 Q/DQ graphs, gated on top-1 drop <= 0.5 points and agreement >= 99% "
                                              "(multi-label: micro-F1 drop and label-set agreement).")
@click.option("--int8-cpu", is_flag=True, help="Add INT8 graphs for onnxruntime on CPUs (uint8 activations: faster "
              "there, not for TensorRT), with the same gate.")
@click.option("--calib-size", default=ExportOptions.calib_size, help="Training items (photos with their titles) used for "
              "INT8 calibration.")
@click.option("--calib-method", type=click.Choice(["entropy", "percentile", "minmax"]),
              help="Activation range method (default: percentile for onnxruntime, minmax for modelopt: measured best).")
@click.option("--int8-exclude", multiple=True, help="ONNX node names to keep in float (repeatable); default: "
              "the fewest early convolutions (+ the shared classifier) that pass the gate, found by measurement.")
@click.option("--quantizer", type=click.Choice(["ort", "modelopt"]), default=ExportOptions.quantizer, help="onnxruntime.quantization, or nvidia-modelopt when installed.")
@click.option("--eval-size", default=ExportOptions.eval_size, help="Held-out items (photos with their titles) the accuracy "
              "gates run on (0: the whole split).")
@click.option("--no-accuracy-gate", is_flag=True, help="Keep a precision even when its gate fails (reported, not silent).")
@click.option("--engine", type=click.Choice(["auto", "require", "skip"]), default=ExportOptions.engine,
              help="TensorRT engines: build where TensorRT and a GPU are usable; require: fail otherwise.")
@click.option("--batch", help="TensorRT optimisation profile MIN:OPT:MAX batch (default 1:8:64; with --dla-core a "
              "fixed N:N:N, default 8:8:8).")
@click.option("--workspace-mib", type=int, help="TensorRT builder workspace (default 1024: fits Jetson Orin Nano).")
@click.option("--dla-core", type=int, help="Build the FP16/INT8 engines for this DLA core with GPU fallback (Jetson "
              "AGX Orin / Orin NX; TensorRT 10.0-10.7 or 11.4.1+): needs --fp16 or --int8 and a fixed batch.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@click.option("--triton", "triton", type=click.Path(file_okay=False), help="Also write a Triton Inference Server model "
              "repository here: the ONNX graphs and TensorRT plans, and Python-backend models `huse` and `huse_embed` "
              "(the lean runtime on photo bytes and titles). Max batch: --batch's MAX. A bundle SRC with nothing to "
              "add is only read.")
@click.option("--triton-precision", default="fp32", help="Precision the Python-backend models run.")
@click.option("--triton-instances", default=1, help="instance_group count of every Triton model.")
@click.option("--triton-delay-us", default=3000, help="Triton dynamic batcher's max_queue_delay_microseconds.")
@click.option("--sign", "sign", type=click.Path(dir_okay=False), help="Sign manifest.json with this Ed25519 private "
              "key (PEM, from `huse keygen`), as manifest.sig; needs the sign extra.")
def main(src, out, fp16, int8, int8_cpu, calib_size, calib_method, int8_exclude, quantizer, eval_size, no_accuracy_gate,
         engine, batch, workspace_mib, dla_core, force, triton, triton_precision, triton_instances, triton_delay_us,
         sign) -> None:
    """Export a training run (or extend a bundle) into a verified ONNX/TensorRT bundle; --triton REPO also writes
    a Triton model repository."""
    def body():
        from huse.export.api import ExportOptions, export
        from huse.export.triton import TritonOptions
        from huse.runtime.files import MANIFEST

        profile = _batch(batch)  # None: TritonOptions' default max batch (the MAX of the default 1:8:64)
        # Checked before the export's work, not after it.
        triton_opts = TritonOptions(max_delay_us=triton_delay_us, instances=triton_instances, precision=triton_precision,
                                    force=force, **({"max_batch": profile[2]} if profile else {})) if triton else None
        nothing_to_add = not (out or fp16 or int8 or int8_cpu or sign or engine == "require")
        if triton and nothing_to_add and (Path(src) / MANIFEST).is_file():
            _triton(src, triton_opts)
            return

        opts = ExportOptions(fp16=fp16, int8=int8, int8_cpu=int8_cpu, calib_size=calib_size, calib_method=calib_method,
                             int8_exclude=tuple(int8_exclude), quantizer=quantizer, accuracy_gate=not no_accuracy_gate,
                             eval_size=eval_size, engine=engine, batch=profile, workspace_mib=workspace_mib,
                             dla_core=dla_core, force=force, sign=sign, say=click.echo)
        manifest = export(src, out, opts)
        click.echo(f"bundle ready: {out or src} (precisions: {', '.join(sorted(manifest['models']))}; "
                   f"{len(manifest['files'])} files, sha256 in manifest.json"
                   + ("; signed: manifest.sig)" if sign else ")"))
        if triton:
            _triton(out or src, triton_opts)

    def _triton(bundle, opts):
        from huse.export.triton import write_repository

        repo = write_repository(bundle, triton, opts)
        click.echo(f"Triton repository ready: {triton} (models: {', '.join(sorted(repo['models']))}; "
                   f"{len(repo['files'])} files, sha256 in manifest.json). Serve it with "
                   f"`tritonserver --model-repository {Path(triton).resolve()}` where huse-edge is installed in "
                   "Triton's Python (README: Triton)")
    run_cli(body)


if __name__ == "__main__":
    main()
