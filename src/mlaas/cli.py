"""``mlaas``: the one command-line entry point.

A thin shell: each command parses its options, calls one library function
and prints the result. The only ``except`` is for :class:`MlaasError`, shown
as ``TypeName: message`` on stderr with exit code 1, never as a traceback.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlaas._progress import console, err_console, event_progress
from mlaas.errors import BadValues, MlaasError

app = typer.Typer(
    name="mlaas",
    help="Machine Learning as a Service for HEP: ROOT files in, trained and served models out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Spec = Annotated[Path, typer.Argument(metavar="SPEC", help="Pipeline spec, YAML or JSON.",
                                      exists=True, dir_okay=False)]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@app.command()
def datagen(
    outdir: Annotated[Path, typer.Argument(metavar="OUTDIR", help="Directory for signal.root and background.root.")],
    events: Annotated[int, typer.Option("--events", "-n", min=1, help="Events per file.")] = 100_000,
    compression: Annotated[str, typer.Option(help="zlib, lz4, zstd, lzma or none.")] = "zlib",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same events.")] = 0,
) -> None:
    """Write a NanoAOD-like signal/background pair (tree Events) for demos, tests and benchmarks.

    Signal has more and harder jets, more b-tags, more MET and more leptons;
    the classes overlap, so a good classifier stays well below AUC 1.
    """
    from mlaas.data import synth

    if compression.strip().lower() not in synth.COMPRESSIONS:  # before the bar is drawn
        raise typer.BadParameter(f"{compression!r} is not one of {', '.join(synth.COMPRESSIONS)}",
                                 param_hint="--compression")
    _make_dir(outdir, "'OUTDIR'")  # before the bar: a file in the way is a usage error
    with event_progress("datagen", 2 * events) as advance:
        summary = synth.generate(outdir, events, compression=compression, seed=seed,
                                 progress=advance)
    console.print_json(json.dumps(summary, default=str))


@app.command()
def inspect(
    file: Annotated[str, typer.Argument(metavar="FILE", help="Local path, root://host:port//path or https:// URL.")],
    tree: Annotated[Optional[str], typer.Option(help="Only this tree.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show trees, entries, compression and every branch: type, flat or jagged, multiplicity."""
    from mlaas.data.inspect import inspect_file

    try:
        info = inspect_file(file, tree)
    except MlaasError as exc:
        if as_json:  # a script reading stdout gets the error as JSON too (and exit code 1)
            print(json.dumps(exc.to_dict()))
        raise
    if as_json:
        console.print_json(json.dumps(info))
        return
    console.print(f"[bold]{escape(info['file'])}[/]  compression: {info['compression']}")
    for name, t in info["trees"].items():
        console.print(_tree_table(name, t))
    for name, cls in info.get("rntuples", {}).items():
        console.print(f"{escape(name)} is an RNTuple ({escape(cls)}), which mlaas does not "
                      "read yet; convert it to a TTree to use it")


def _tree_table(name: str, t: dict[str, Any]) -> Table:
    """One tree of ``mlaas inspect``: names whole (folded), and where multiplicity comes from.

    Names were cut to "HLT_VeryLongTriggerP…" at 80 columns, so two
    branches looked alike; multiplicities come from the first ``sample``
    entries only, which the table did not say.
    """
    table = Table(title=f"tree {escape(name)}: {t['entries']:,} entries", title_justify="left")
    jagged = any("multiplicity_mean" in b for b in t["branches"])
    if jagged and t["sample"] < t["entries"]:
        table.caption = (f"multiplicity over the first {t['sample']:,} of {t['entries']:,} "
                         "entries")
        table.caption_justify = "left"
    table.add_column("branch", overflow="fold")
    for col in ("type", "kind", "compressed", "mult. mean", "mult. max"):
        table.add_column(col, justify="right" if col.startswith(("comp", "mult")) else "left")
    for b in t["branches"]:
        mean = f"{b['multiplicity_mean']:.2f}" if "multiplicity_mean" in b else ""
        table.add_row(escape(b["name"]), escape(b["type"]), b["kind"],
                      f"{b['compressed_bytes']:,}", mean, str(b.get("multiplicity_max", "")))
    return table


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

    if output:
        _check_output_file(output)  # before pass 1, which its file would otherwise lose
    pipeline = load(spec)
    # the data layer's warnings (skipped branches, zero variance) are printed once,
    # in the table's style, not also by Python's warning display
    failed: BadValues | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layout, files, plan = prepare(pipeline)
        total = sum(c.entries for c in plan)
        with event_progress("pass 1", total, progress) as advance:
            try:
                result = pass1.compute(pipeline, layout, files, plan, advance)
            except BadValues as exc:  # NaN/inf under nan: error: show the counts, then fail
                if exc.stats is None:
                    raise
                result, failed = exc.stats, exc
    unsaved = _save(output, result.save) if output else None
    _print_stats(result, [str(w.message) for w in caught], layout, pipeline.data.label)
    if unsaved:  # the tables were printed first, so pass 1's result is not lost
        err_console.print(f"[red]error:[/] {escape(unsaved)} (the tables above were not saved)")
    if failed is not None:
        raise failed
    if unsaved:
        raise typer.Exit(1)


def _check_output_file(path: Path, option: str = "'-o' / '--output'") -> None:
    """Refuse a file that cannot be written, before the work whose result it would hold.

    ``mlaas stats -o`` wrote its file only after pass 1, so a missing
    directory, or a directory given as the file, lost the whole pass to a
    traceback (FileNotFoundError, IsADirectoryError).
    """
    problem = _file_problem(path)
    if problem:
        raise typer.BadParameter(f"cannot write {str(path)!r}: {problem}", param_hint=option)


def _file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file, checked without writing; None if it can."""
    parent = path.parent
    if path.is_dir():
        return "it is a directory; name a file in it"
    if not parent.exists():
        return f"directory {str(parent)!r} does not exist"
    if not parent.is_dir():
        return f"{str(parent)!r} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {str(parent)!r} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return "the file is not writable"
    return None


def _make_dir(path: Path, option: str = "'-o' / '--output'") -> None:
    """Create the output directory ``path`` now, or say in one line why it cannot be.

    Later, deep in a command, the same failure was a traceback
    (NotADirectoryError for a path under a file, FileNotFoundError under /proc).
    The reason is :func:`mlaas.data.synth.output_dir`'s, which datagen's
    library callers get as a SourceError.
    """
    from mlaas.data.synth import output_dir
    from mlaas.errors import SourceError

    try:
        output_dir(path)
    except SourceError as exc:
        raise typer.BadParameter(exc.message, param_hint=option) from exc


def _save(path: Path, write: Callable[[Path], None]) -> str | None:
    """Write ``path`` with ``write``; why that failed (disk full, /proc...) or None."""
    try:
        write(path)
    except OSError as exc:
        return f"cannot write {str(path)!r}: {exc.strerror or exc}"
    return None


def _print_stats(result: Any, caught: list[str], layout: Any, label: str | None) -> None:
    """The tables of ``mlaas stats``: features, sources, and the label's values."""
    table = Table(title="features (pass 1)", title_justify="left")
    longest = max((len(name) for name in result.features), default=7)
    table.add_column("feature", no_wrap=True, min_width=min(longest, 24))
    for col in ("count", "NaN", "inf", "min", "max", "mean", "std", "max_len"):
        table.add_column(col, justify="right")
    collection = {f.name: f.collection for f in layout.features}
    for name, f in result.features.items():
        d = f.to_dict()
        table.add_row(escape(name), f"{d['count']:,}", str(d["nan"]), str(d["inf"]),
                      _g(d["min"]), _g(d["max"]), _g(d["mean"]), _g(d["std"]),
                      _lengths(result.max_len.get(collection.get(name) or ""),
                               d.get("multiplicity_p95")))
    _print_whole(table)
    src = Table(title="sources", title_justify="left")
    weighted = any("sum_weights" in s for s in result.sources)
    for col in ("source", "label", "entries", "selected", "train", "validation", "test",
                *(("sum of weights",) if weighted else ())):
        src.add_column(col, justify="left" if col == "source" else "right")
    for s in result.sources:
        src.add_row(escape(s["name"]), escape(label) if label else _g(s["label"]),
                    f"{s['entries']:,}", f"{s['selected']:,}",
                    *(f"{s['splits'][k]:,}" for k in ("train", "validation", "test")),
                    *((_g(s.get("sum_weights", 0.0)),) if weighted else ()))
    _print_whole(src)  # the sum of weights made 80 columns cut "validation" short
    counts = result.label.get("counts")
    if counts:  # few distinct values: a classification's classes
        parts = [f"{escape(value)}: {n:,}" for value, n in counts.items()]
        console.print("label values (selected events): " + ", ".join(parts))
    else:
        console.print(f"label: mean {_g(result.label.get('mean'))}, "
                      f"std {_g(result.label.get('std'))}")
    for w in dict.fromkeys([*caught, *result.warnings]):  # each once, in order
        err_console.print(f"[yellow]warning:[/] {escape(w)}")


def _print_whole(table: Table) -> None:
    """Print ``table`` with every number whole, rather than cut to "-49.…".

    rich fits a table to the console's width by truncating cells. On a
    terminal the first column (names) folds onto more lines instead, so the
    table still fits; in a pipe (80 columns) or when even folding cannot
    make it fit, a wider console of its own prints it whole, one line per
    row, as grep and a wide window want it.
    """
    wide = _width(table)
    if wide <= console.width:
        console.print(table)
        return
    if console.is_terminal and _fold_first_column(table, console.width):
        console.print(table)
        return
    Console(file=console.file, width=wide, soft_wrap=True,
            force_terminal=console.is_terminal, no_color=console.no_color).print(table)


def _width(table: Table) -> int:
    return console.measure(table, options=console.options.update(max_width=10_000)).maximum


def _fold_first_column(table: Table, width: int) -> bool:
    """Let the first column fold to fit ``width``, the others kept on one line; False if it can't."""
    first, narrowest = table.columns[0], 8
    first.no_wrap, first.overflow, first.min_width = False, "fold", None
    for column in table.columns[1:]:
        column.no_wrap = True
    first.max_width = narrowest
    spare = width - _width(table)
    if spare < 0:
        first.max_width = None
        return False
    first.max_width = narrowest + spare
    return True


def _lengths(used: int | None, p95: int | None) -> str:
    """A jagged feature's slots, and the 95th percentile of its multiplicity if it differs.

    The percentile is the default of ``max_len``; a ``max_len`` from the spec
    is what the padding uses, so it comes first.
    """
    if used is None:
        return ""
    return str(used) if p95 is None or p95 == used else f"{used} (p95 {p95})"


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


_DEMO_EVENTS = [{"MET_pt": 80.0, "MET_phi": 0.3, "PV_npvs": 31, "nJet": 5,
                 "Jet_pt": [180.0, 95.5, 60.1, 41.0, 30.2], "Jet_eta": [0.1, -1.2, 0.8, 2.0, -0.4],
                 "Jet_btagDeepB": [0.9, 0.7, 0.1, 0.05, 0.2], "Muon_pt": [45.0], "Electron_pt": []},
                {"MET_pt": 12.0, "MET_phi": -2.0, "PV_npvs": 25, "nJet": 2,
                 "Jet_pt": [40.0, 28.0], "Jet_eta": [2.5, -3.1], "Jet_btagDeepB": [0.02, 0.1],
                 "Muon_pt": [], "Electron_pt": []}]


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where data, spec, server data and downloads are written.")] = Path("build/run"),
    events: Annotated[int, typer.Option("--events", "-n", min=1000, help="Events per class.")] = 100_000,
    port: Annotated[Optional[int], typer.Option(help="Port of the demo server on 127.0.0.1 (default: 8080 if free, else a free one).")] = None,
    follow: Annotated[bool, typer.Option(help="Stream the job's log instead of a status line.")] = False,
) -> None:
    """The README's main job: start `mlaas server`, submit a pipeline over HTTP, wait, predict.

    Generates signal/background ROOT files, starts `mlaas server` on
    127.0.0.1 with its data in WORKDIR/server, submits the example pipeline
    through the HTTP API (the data files are uploaded to the workspace), waits
    for the job (training one epoch after another), downloads its artifacts
    to WORKDIR/job, scores two events with the registered model, prints the
    test AUC, the model version and a curl line for a prediction, and stops
    the server.
    """
    from mlaas._local_server import LocalServer, free_port, port_is_free
    from mlaas.cli_client import wait_with_status
    from mlaas.client import Client
    from mlaas.data import synth
    from mlaas.errors import PlatformError

    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "pipeline.yaml"
    with resources.as_file(resources.files("mlaas.examples") / "datagen.yaml") as src:
        shutil.copyfile(src, spec_path)
    with event_progress("datagen", 2 * events) as advance:
        synth.generate(workdir / "data", events, progress=advance)
    events_path = workdir / "events.json"
    events_path.write_text(json.dumps(_DEMO_EVENTS, indent=1))
    port = port or (8080 if port_is_free(8080) else free_port())
    server = LocalServer(workdir / "server", port=port, log=workdir / "server.log")
    err_console.print(f"starting mlaas server on {server.url} (log: {server.log_path})")
    started = time.perf_counter()
    with server, Client(server.url) as client:
        job = client.submit(spec_path)
        err_console.print(f"submitted job {job['id']} ({escape(job['name'])}); waiting for it")
        if follow:
            for text in client.logs(job["id"], follow=True):
                sys.stderr.write(text)
                sys.stderr.flush()
            final = client.wait(job["id"])
        else:
            final = wait_with_status(client, job["id"])
        if final["state"] != "succeeded":
            raise PlatformError(f"demo job {final['id']!r} ended {final['state']}: "
                                f"{final.get('reason') or 'see its log'} (log: mlaas logs "
                                f"{final['id']} --server {server.url})", job_id=final["id"])
        metrics = json.loads(client.artifact(final["id"], "metrics.json"))
        history = client.metrics(final["id"])
        downloaded = client.download(final["id"], workdir / "job")
        name, version = final["model_name"], final["model_version"]
        scores = client.predict(name, _DEMO_EVENTS, version=version)
    test = metrics.get("test", {})
    auc = test.get("roc_auc")
    predict_url = f"{server.url}/api/models/{name}/predict?version={version}"
    summary = {
        "server": server.url, "job": final["id"], "state": final["state"],
        "epochs": len(history),
        "test_roc_auc": None if auc is None else round(auc, 4),
        "model": name, "model_version": version,
        "predict_example": [None if s is None else round(float(s), 4) for s in scores],
        "artifacts": str(workdir / "job"), "files": len(downloaded),
        "seconds": round(time.perf_counter() - started, 1),
        "serve_again": f"mlaas server --data-dir {workdir / 'server'} --port {port}",
        "curl": f"curl -s -X POST '{predict_url}' -H 'Content-Type: application/json' "
                f"-d @{events_path}",
    }
    console.print_json(json.dumps(summary))
    console.print(f"test AUC {summary['test_roc_auc']}, model {name} version {version}; "
                  f"to predict again: `{summary['serve_again']}` then\n  {summary['curl']}",
                  markup=False, highlight=False, soft_wrap=True)


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
    from mlaas.spec import load
    from mlaas.train.run import run as run_pipeline

    pipeline = load(spec)  # first: a spec that does not validate leaves no empty run directory
    _make_dir(output)
    result = run_pipeline(pipeline, output, resume=resume, progress=progress)
    test = result.metrics.get("test", result.metrics)
    summary = {"outdir": str(result.outdir), "bundle": str(result.bundle),
               "stopped": result.stopped, "epochs": result.epochs_run,
               "test": {k: v for k, v in test.items() if isinstance(v, (int, float))}}
    console.print_json(json.dumps(summary))


@app.command()
def predict(
    target: Annotated[str, typer.Argument(
        metavar="BUNDLE_OR_MODEL",
        help="A local bundle (directory or .tar.gz), else the name of a model on the server.")],
    input: Annotated[Path, typer.Option("--input", "-i", help="Events as JSON: rows or columns "
                                        "(- for stdin).", dir_okay=False)],
    server: Annotated[str, typer.Option("--server", envvar="MLAAS_SERVER", show_envvar=True,
                                        help="Server for a model name (token from MLAAS_TOKEN).")
                      ] = "http://127.0.0.1:8080",
    version: Annotated[Optional[int], typer.Option(min=1, help="Server model version "
                                                   "(default: alias production, else latest).")] = None,
    alias: Annotated[Optional[str], typer.Option(help="Server model alias, e.g. production.")] = None,
) -> None:
    """Score raw events from a JSON file with a local bundle or a model on the server.

    Events are rows ([{"MET_pt": 20.1, "Jet_pt": [50.2, 31.0]}, ...]) or
    columns ({"MET_pt": [...], "Jet_pt": [[...], ...]}); the bundle's own
    preprocessing pads them. Events failing the cut score NaN (printed as null).
    If BUNDLE_OR_MODEL is an existing path it is scored here; otherwise it is
    a model name and the server scores the events.
    """
    if str(input) != "-" and not input.is_file():
        raise typer.BadParameter(f"events file {str(input)!r} does not exist",
                                 param_hint="'--input'")
    if Path(target).exists():
        if version is not None or alias is not None:
            raise typer.BadParameter("--version and --alias choose a server model version; "
                                     f"{target!r} is a local bundle", param_hint="'--version'")
        from mlaas.bundle import predict_file

        console.print_json(json.dumps(predict_file(target, input)))
        return
    from mlaas.cli_client import predict_remote

    console.print_json(json.dumps(predict_remote(target, input, server, version, alias)))


@app.command()
def apply(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle directory or .tar.gz.", exists=True)],
    files: Annotated[list[str], typer.Argument(metavar="FILES", help="ROOT files: paths or root:// URLs.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for friend files.")],
    name: Annotated[str, typer.Option(help="Branch name of the score.")] = "score",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Score whole ROOT files with a bundle, writing friend trees.

    One friend file per input, with a tree of the same name, the same entries
    in the same order and one branch per output; events failing the cut get NaN.
    """
    from mlaas.apply import apply_files

    _make_dir(output)
    for path in apply_files(bundle, files, output, name=name, progress=progress):
        console.print(escape(str(path)))


@app.command()
def serve(
    models: Annotated[Path, typer.Option("--models", help="Model registry directory (created).")],
    host: Annotated[str, typer.Option(help="Address to bind; keep 127.0.0.1 behind a proxy.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    max_batch_size: Annotated[int, typer.Option(help="Dynamic batching: events per batch.")] = 256,
    max_delay_ms: Annotated[float, typer.Option(help="Dynamic batching: longest wait, ms.")] = 2.0,
    get: Annotated[Optional[str], typer.Option("--get", help="Answer one GET in-process, print it, exit 0 only on 200.")] = None,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request (uvicorn's access log; off by default: it costs each request a log record).")] = False,
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

    uvicorn.run(server, host=host, port=port, log_level="info", proxy_headers=False,
                access_log=access_log)


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

    _check_output_file(output)
    result = convert_files(params, files, labels, preproc)
    unsaved = _save(output, lambda path: path.write_text(result.yaml()))
    if unsaved:
        raise typer.BadParameter(unsaved, param_hint="'-o' / '--output'")
    console.print(f"wrote {escape(str(output))}")
    for note in result.notes:
        err_console.print(f"[yellow]not mapped:[/] {escape(note)}")


@app.command()
def server(
    config: Annotated[Optional[Path], typer.Option("--config", help="Settings file: YAML, TOML or JSON.", exists=True, dir_okay=False)] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Platform storage and SQLite file (default: ~/.local/share/mlaas).")] = None,
    db: Annotated[Optional[str], typer.Option("--db", help="Database URL, e.g. postgresql://user@host/db (default: SQLite in the data dir).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default: 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to listen on (default: 8080).")] = None,
    cpus: Annotated[Optional[int], typer.Option(help="CPU slots: jobs running at once (default: all CPUs).")] = None,
    gpu_devices: Annotated[Optional[str], typer.Option("--gpu-devices", help="GPU ids for jobs, e.g. 0,1.")] = None,
    gpu_flavor: Annotated[Optional[str], typer.Option("--gpu-flavor", help="Flavor of the --gpu-devices, e.g. nvidia-t4 (default: gpu).")] = None,
    executor: Annotated[Optional[str], typer.Option("--executor", help="Where jobs run: local (this machine) or ray (a Ray cluster's nodes).")] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", metavar="HOST:PORT", help="The Ray head's GCS address, for --executor ray.")] = None,
    oidc_issuer: Annotated[Optional[list[str]], typer.Option("--oidc-issuer", metavar="URL", help="Accepted OIDC issuer URL, as tokens' iss spells it (repeatable); turns on multi-user mode.")] = None,
    oidc_audience: Annotated[Optional[str], typer.Option("--oidc-audience", metavar="AUD", help="Required aud of OIDC tokens.")] = None,
    admin_group: Annotated[Optional[str], typer.Option("--admin-group", metavar="GROUP", help="Members of this group are admins, e.g. /mlaas/admins.")] = None,
    trust_proxy_from: Annotated[Optional[list[str]], typer.Option("--trust-proxy-from", metavar="CIDR", help="CIDR of a reverse proxy whose X-Forwarded-User/-Groups/-Access-Token are trusted (repeatable).")] = None,
    rate_limit: Annotated[Optional[int], typer.Option("--rate-limit", metavar="N", help="Job submissions, and separately inference requests, per user per minute (default: unlimited).")] = None,
    pass_token_to_jobs: Annotated[Optional[bool], typer.Option("--pass-token-to-jobs/--no-pass-token-to-jobs", help="Hand the submitter's OIDC token to jobs as BEARER_TOKEN_FILE (see docs/auth.md).")] = None,
) -> None:
    """Run the platform: jobs and files over HTTP, the model server, /metrics.

    Users submit pipelines (POST /api/jobs) that run as queued jobs; finished
    bundles are registered and served (POST /api/models/NAME/predict). State
    is durable: restart on the same data dir and queued jobs stay queued,
    interrupted ones resume from their checkpoint. Without --oidc-issuer or
    --trust-proxy-from it is single-user (every request is the local admin).
    """
    from mlaas.platform.config import load_config
    from mlaas.platform.server import run_server

    auth = {"oidc_issuers": oidc_issuer or None, "audience": oidc_audience,
            "admin_group": admin_group, "trusted_proxies": trust_proxy_from or None,
            "rate_limit_per_minute": rate_limit, "pass_token_to_jobs": pass_token_to_jobs}
    settings = load_config(config, data_dir=data_dir, db_url=db, host=host, port=port,
                           cpus=cpus, gpu_devices=gpu_devices, gpu_flavor=gpu_flavor,
                           executor=executor, ray_address=ray_address, auth=auth)
    run_server(settings)


from mlaas import cli_client  # noqa: E402  (submit, jobs, status, logs, ... against a server)

cli_client.register(app)

from mlaas import cli_token  # noqa: E402  (mlaas token create|list|revoke)

cli_token.register(app)

from mlaas import cli_simulate  # noqa: E402  (mlaas simulate: the farm simulator)

cli_simulate.register(app)

from mlaas import cli_node  # noqa: E402  (mlaas node join: a Ray worker node)

cli_node.register(app)

from mlaas import cli_farm  # noqa: E402  (mlaas queues, mlaas nodes)

cli_farm.register(app)

from mlaas import cli_usage  # noqa: E402  (mlaas usage: accounting from a server)

cli_usage.register(app)


def main() -> None:
    """Console-script entry point: MlaasError becomes a one-line message and exit code 1."""
    try:
        app()
    except MlaasError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
