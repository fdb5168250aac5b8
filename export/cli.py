"""`huse-export`: a thin click layer over huse.export.api."""

from __future__ import annotations

import click

from huse.runtime.cli import run_cli


def _batch(value: str) -> tuple[int, int, int]:
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
@click.option("--calib-size", default=512, help="Train-split products used for INT8 calibration.")
@click.option("--calib-method", type=click.Choice(["entropy", "percentile", "minmax"]),
              help="Activation range method (default: percentile for onnxruntime, minmax for modelopt: measured best).")
@click.option("--int8-exclude", multiple=True, help="ONNX node names to keep in float (repeatable); default: "
              "the fewest early convolutions (+ the shared classifier) that pass the gate, found by measurement.")
@click.option("--quantizer", type=click.Choice(["ort", "modelopt"]), default="ort", help="onnxruntime.quantization, or nvidia-modelopt when installed.")
@click.option("--eval-size", default=2000, help="Held-out products for the accuracy gate (0: the whole split).")
@click.option("--no-accuracy-gate", is_flag=True, help="Keep a precision even when its gate fails (reported, not silent).")
@click.option("--engine", type=click.Choice(["auto", "require", "skip"]), default="auto",
              help="TensorRT engines: build where TensorRT and a GPU are usable; require: fail otherwise.")
@click.option("--batch", default="1:8:64", help="TensorRT optimisation profile MIN:OPT:MAX batch.")
@click.option("--workspace-mib", type=int, help="TensorRT builder workspace (default 1024: fits Jetson Orin Nano).")
@click.option("--dla-core", type=int, help="Build for this DLA core with GPU fallback (Jetson AGX Orin / Orin NX).")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@click.option("--sign", "sign", type=click.Path(dir_okay=False), help="Sign manifest.json with this Ed25519 private "
              "key (PEM, from `huse keygen`), as manifest.sig; needs the sign extra.")
def main(src, out, fp16, int8, int8_cpu, calib_size, calib_method, int8_exclude, quantizer, eval_size, no_accuracy_gate,
         engine, batch, workspace_mib, dla_core, force, sign) -> None:
    """Export a training run (or extend a bundle) into a verified ONNX/TensorRT bundle."""
    def body():
        from huse.export.api import ExportOptions, export

        opts = ExportOptions(fp16=fp16, int8=int8, int8_cpu=int8_cpu, calib_size=calib_size, calib_method=calib_method,
                             int8_exclude=tuple(int8_exclude), quantizer=quantizer, accuracy_gate=not no_accuracy_gate,
                             eval_size=eval_size, engine=engine, batch=_batch(batch), workspace_mib=workspace_mib,
                             dla_core=dla_core, force=force, sign=sign, say=click.echo)
        manifest = export(src, out, opts)
        click.echo(f"bundle ready: {out or src} (precisions: {', '.join(sorted(manifest['models']))}; "
                   f"{len(manifest['files'])} files, sha256 in manifest.json"
                   + ("; signed: manifest.sig)" if sign else ")"))
    run_cli(body)


if __name__ == "__main__":
    main()
