"""``mlaas``: the one command-line entry point.

A thin shell: each command parses its options, calls one library function
and prints the result. The only ``except`` is for :class:`MlaasError`, shown
as ``TypeName: message`` on stderr with exit code 1, never as a traceback.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from mlaas._progress import console, err_console, event_progress
from mlaas.errors import MlaasError

app = typer.Typer(
    name="mlaas",
    help="Machine Learning as a Service for HEP: ROOT files in, trained and served models out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Spec = Annotated[Path, typer.Argument(help="Pipeline spec, YAML or JSON.", exists=True,
                                      dir_okay=False)]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@app.command()
def datagen(
    outdir: Annotated[Path, typer.Argument(help="Directory for signal.root and background.root.")],
    events: Annotated[int, typer.Option("--events", "-n", min=1, help="Events per file.")] = 100_000,
    compression: Annotated[str, typer.Option(help="zlib, lz4, zstd, lzma or none.")] = "zlib",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same events.")] = 0,
) -> None:
    """Write a NanoAOD-like signal/background pair (tree Events) for demos, tests and benchmarks.

    Signal has more and harder jets, more b-tags, more MET and more leptons;
    the classes overlap, so a good classifier stays well below AUC 1.
    """
    from mlaas.data import synth

    with event_progress("datagen", 2 * events) as advance:
        summary = synth.generate(outdir, events, compression=compression, seed=seed,
                                 progress=lambda n: advance(n, 0))
    console.print_json(json.dumps(summary, default=str))


@app.command()
def inspect(
    file: Annotated[str, typer.Argument(help="Local path, root://host:port//path or https:// URL.")],
    tree: Annotated[Optional[str], typer.Option(help="Only this tree.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show trees, entries, compression and every branch: type, flat or jagged, multiplicity."""
    from mlaas.data.inspect import inspect_file

    info = inspect_file(file, tree)
    if as_json:
        console.print_json(json.dumps(info))
        return
    console.print(f"[bold]{info['file']}[/]  compression: {info['compression']}")
    for name, t in info["trees"].items():
        table = Table(title=f"tree {name}: {t['entries']:,} entries", title_justify="left")
        for col in ("branch", "type", "kind", "compressed", "mult. mean", "mult. max"):
            table.add_column(col, justify="right" if col.startswith(("comp", "mult")) else "left")
        for b in t["branches"]:
            mean = f"{b['multiplicity_mean']:.2f}" if "multiplicity_mean" in b else ""
            table.add_row(b["name"], b["type"], b["kind"], f"{b['compressed_bytes']:,}", mean,
                          str(b.get("multiplicity_max", "")))
        console.print(table)


@app.command()
def stats(
    spec: Spec,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write stats.json here.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Pass 1: streaming statistics of every feature and selected events per source.

    Per feature: count, NaN/inf, min, max, mean, std, and for jagged branches
    the multiplicity histogram; per source: entries, selected after the cut,
    and events per split. These constants normalise the features.
    """
    from mlaas.data import stats as pass1
    from mlaas.data.loader import prepare
    from mlaas.spec import load

    pipeline = load(spec)
    layout, files, plan = prepare(pipeline)
    total = sum(c.entries for c in plan)
    with event_progress("pass 1", total, progress) as advance:
        result = pass1.compute(pipeline, layout, files, plan, advance)
    if output:
        result.save(output)
    _print_stats(result)


def _print_stats(result: Any) -> None:
    table = Table(title="features (pass 1)", title_justify="left")
    for col in ("feature", "count", "NaN", "inf", "min", "max", "mean", "std", "p95 len"):
        table.add_column(col, justify="left" if col == "feature" else "right")
    for name, f in result.features.items():
        d = f.to_dict()
        table.add_row(name, f"{d['count']:,}", str(d["nan"]), str(d["inf"]),
                      _g(d["min"]), _g(d["max"]), _g(d["mean"]), _g(d["std"]),
                      str(d.get("multiplicity_p95", "")))
    console.print(table)
    src = Table(title="sources", title_justify="left")
    for col in ("source", "label", "entries", "selected", "train", "validation", "test"):
        src.add_column(col, justify="left" if col == "source" else "right")
    for s in result.sources:
        src.add_row(s["name"], str(s["label"]), f"{s['entries']:,}", f"{s['selected']:,}",
                    *(f"{s['splits'][k]:,}" for k in ("train", "validation", "test")))
    console.print(src)
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/] {w}")


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where data, spec and the run are written.")] = Path("build/run"),
    events: Annotated[int, typer.Option("--events", "-n", min=1000, help="Events per class.")] = 100_000,
) -> None:
    """The README's main job: generate data, pass 1, stream an epoch, train, export, predict.

    Everything lands in WORKDIR: data/, pipeline.yaml, stats.json, and the
    run directory run/ with the bundle, plots and metrics.
    """
    from mlaas.bundle import Bundle
    from mlaas.data import RootDataset, synth
    from mlaas.data import stats as pass1
    from mlaas.data.loader import prepare
    from mlaas.spec import load
    from mlaas.train.run import run as run_pipeline

    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "pipeline.yaml"
    with resources.as_file(resources.files("mlaas.examples") / "datagen.yaml") as src:
        shutil.copyfile(src, spec_path)
    with event_progress("datagen", 2 * events) as advance:
        synth.generate(workdir / "data", events, progress=lambda n: advance(n, 0))
    pipeline = load(spec_path)
    prepared = prepare(pipeline)
    with event_progress("pass 1", sum(c.entries for c in prepared[2])) as advance:
        result = pass1.compute(pipeline, *prepared, advance)
    result.save(workdir / "stats.json")
    _print_stats(result)
    ds = RootDataset(pipeline, "train", batch_size=1024, stats=result, prepared=prepared)
    started, n = time.perf_counter(), 0
    with event_progress("stream one epoch", ds.num_events) as advance:
        for batch in ds:
            n += len(batch["y"])
            advance(len(batch["y"]), 0)
    stream_rate = n / (time.perf_counter() - started)
    outcome = run_pipeline(spec_path, workdir / "run")
    bundle = Bundle.load(outcome.bundle)
    events_json = [{"MET_pt": 80.0, "MET_phi": 0.3, "PV_npvs": 31, "nJet": 5,
                    "Jet_pt": [180.0, 95.5, 60.1, 41.0, 30.2], "Jet_eta": [0.1, -1.2, 0.8, 2.0, -0.4],
                    "Jet_btagDeepB": [0.9, 0.7, 0.1, 0.05, 0.2], "Muon_pt": [45.0], "Electron_pt": []},
                   {"MET_pt": 12.0, "MET_phi": -2.0, "PV_npvs": 25, "nJet": 2,
                    "Jet_pt": [40.0, 28.0], "Jet_eta": [2.5, -3.1], "Jet_btagDeepB": [0.02, 0.1],
                    "Muon_pt": [], "Electron_pt": []}]
    scores = bundle.predict_events(events_json)[:, 0]
    test = outcome.metrics.get("test", {})
    summary = {
        "spec": str(spec_path), "features": ds.n_features, "mask_slots": len(ds.mask_names),
        "train_events": n, "stream_events_per_s": round(stream_rate),
        "epochs": outcome.epochs_run, "stopped": outcome.stopped,
        "test_roc_auc": round(test.get("roc_auc", float("nan")), 4),
        "bundle": str(outcome.bundle), "plots": str(workdir / "run" / "plots"),
        "predict_example": [round(float(s), 4) for s in scores],
        "peak_rss_mb": round(_peak_rss_mb()),
    }
    console.print_json(json.dumps(summary))


@app.command()
def run(
    spec: Spec,
    output: Annotated[Path, typer.Option("-o", "--output", help="Run directory (created).")],
    resume: Annotated[bool, typer.Option(help="Continue from OUTDIR/checkpoint.pt.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Pass 1, training, evaluation and export: a trained model in OUTDIR/bundle.

    Checkpoints go to OUTDIR/checkpoint.pt; on SIGTERM a checkpoint is written
    and the command exits with code 75 (preempted), and `--resume` continues
    exactly where it stopped.
    """
    from mlaas.train.run import run as run_pipeline

    result = run_pipeline(spec, output, resume=resume, progress=progress)
    test = result.metrics.get("test", result.metrics)
    summary = {"outdir": str(result.outdir), "bundle": str(result.bundle),
               "stopped": result.stopped, "epochs": result.epochs_run,
               "test": {k: v for k, v in test.items() if isinstance(v, (int, float))}}
    console.print_json(json.dumps(summary))


@app.command()
def predict(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory or .tar.gz.", exists=True)],
    input: Annotated[Path, typer.Option("--input", "-i", help="Events as JSON: rows or columns.",
                                        exists=True, dir_okay=False)],
) -> None:
    """Score raw events from a JSON file with a bundle.

    Events are rows ([{"MET_pt": 20.1, "Jet_pt": [50.2, 31.0]}, ...]) or
    columns ({"MET_pt": [...], "Jet_pt": [[...], ...]}); the bundle's own
    preprocessing pads them. Events failing the cut score NaN (printed as null).
    """
    from mlaas.bundle import predict_file

    console.print_json(json.dumps(predict_file(bundle, input)))


@app.command()
def apply(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory or .tar.gz.", exists=True)],
    files: Annotated[list[str], typer.Argument(help="ROOT files: paths or root:// URLs.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for friend files.")],
    name: Annotated[str, typer.Option(help="Branch name of the score.")] = "score",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Score whole ROOT files with a bundle, writing friend trees.

    One friend file per input, with a tree of the same name, the same entries
    in the same order and one branch per output; events failing the cut get NaN.
    """
    from mlaas.apply import apply_files

    for path in apply_files(bundle, files, output, name=name, progress=progress):
        console.print(str(path))


@app.command()
def serve(
    models: Annotated[Path, typer.Option("--models", help="Model registry directory (created).")],
    host: Annotated[str, typer.Option(help="Address to bind; keep 127.0.0.1 behind a proxy.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    max_batch_size: Annotated[int, typer.Option(help="Dynamic batching: events per batch.")] = 256,
    max_delay_ms: Annotated[float, typer.Option(help="Dynamic batching: longest wait, ms.")] = 2.0,
    get: Annotated[Optional[str], typer.Option("--get", help="Answer one GET in-process, print it, exit 0 only on 200.")] = None,
) -> None:
    """Serve bundles over HTTP: registry, KServe v2 inference, raw events, TFaaS routes.

    Upload with POST /api/models/NAME (a bundle .tar.gz); infer with
    POST /v2/models/NAME/infer (tritonclient works), POST /api/models/NAME/predict
    (raw events), or the TFaaS-compatible POST /json. Prometheus at /metrics.
    """
    from mlaas.serve.server import create_server

    server = create_server(models, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms)
    if get is not None:
        import warnings

        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from fastapi.testclient import TestClient

        with TestClient(server) as client:
            response = client.get(get)
        console.print(response.text, markup=False, highlight=False)
        raise typer.Exit(0 if response.status_code == 200 else 1)
    import uvicorn

    uvicorn.run(server, host=host, port=port, log_level="info")


@app.command("import-mlaas4hep")
def import_mlaas4hep(
    params: Annotated[Path, typer.Option(help="The predecessor's params.json.", exists=True)],
    files: Annotated[Path, typer.Option(help="files.txt: one ROOT file per line.", exists=True)],
    labels: Annotated[Path, typer.Option(help="labels.txt: one label per line, per file.", exists=True)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Pipeline YAML to write.")],
    preproc: Annotated[Optional[Path], typer.Option(help="preproc.json (new_branch, cuts).", exists=True)] = None,
) -> None:
    """Convert an MLaaS4HEP configuration into a pipeline spec, saying what could not be mapped."""
    from mlaas.compat.mlaas4hep import convert_files

    result = convert_files(params, files, labels, preproc)
    output.write_text(result.yaml())
    console.print(f"wrote {output}")
    for note in result.notes:
        err_console.print(f"[yellow]not mapped:[/] {note}")


from mlaas import cli_client  # noqa: E402  (submit, jobs, status, logs, ... against a server)

cli_client.register(app)


def main() -> None:
    """Console-script entry point: MlaasError becomes a one-line message and exit code 1."""
    try:
        app()
    except MlaasError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
