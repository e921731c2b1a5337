"""Tests for mlaas.compat.mlaas4hep: MLaaS4HEP params/files/labels/preproc -> pipeline spec."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import mlaas.spec
from mlaas.cli import app
from mlaas.compat.mlaas4hep import Conversion, convert, convert_files, translate_expression
from mlaas.data import RootDataset, sources
from mlaas.errors import SpecError
from mlaas.expr import parse

FILES = Path(__file__).parent / "files"
OLD = FILES / "mlaas4hep"
HZZ_KINDS = {"NMuon": "flat", "Muon_Px": "jagged", "Muon_Py": "jagged", "MET_px": "flat",
             "MET_py": "flat", "NPrimaryVertices": "flat", "Jet_Px": "jagged",
             "Jet_Py": "jagged", "Jet_ID": "jagged"}


@pytest.fixture(scope="module")
def sample() -> Conversion:
    """The realistic sample set under tests/files/mlaas4hep, first file read for kinds."""
    return convert_files(OLD / "params.json", OLD / "files.txt", OLD / "labels.txt",
                         OLD / "preproc.json")


def note_about(notes: list[str], text: str) -> list[str]:
    return [n for n in notes if text in n]


# --------------------------------------------------------------------------- the sample set


def test_sample_spec_fields(sample: Conversion) -> None:
    data = sample.spec["data"]
    assert sample.spec["version"] == 1
    assert data["tree"] == "events"
    assert data["redirector"] == "root://cms-xrd-global.cern.ch"
    assert data["sources"] == [
        {"files": ["../uproot-HZZ.root"], "label": 1},
        {"files": ["../uproot-HZZ.root"], "label": 0},
    ]
    # Muon_Px/Py and MET_px/py went with keys_to_remove, Muon_E with the jagged cut's
    # remove; jagged branches were recognised in the real file; new branches come last.
    assert data["features"] == [
        "NMuon", {"branch": "Muon_Pz"}, "NPrimaryVertices", {"branch": "Muon_Pt"}, "MET_pt",
    ]
    assert "exclude" not in data
    assert "identifiers" not in data  # "" meant run,event,luminosityBlock: our default too
    assert data["derived"] == {
        "Muon_Pt": "sqrt(Muon_Px**2 + Muon_Py**2)",
        "MET_pt": "hypot(MET_px, MET_py)",
    }
    assert data["cut"] == ("(1 <= NPrimaryVertices <= 40) & (all(Muon_E > 0)) & "
                           "(any(Muon_Pt > 5)) & (all(Muon_Pt < 1000)) & (MET_pt >= 0)")
    assert data["normalize"] == "minmax"
    assert data["step_size"] == 500
    assert data["max_events"] == 1000


def test_sample_notes(sample: Conversion) -> None:
    notes = sample.notes
    assert sample.spec["train"] == {"epochs": 5, "batch_size": 100}  # mapped, so no note
    for key in ("epochs=", "batch_size=", "shuffle="):  # shuffle=True is what mlaas does
        assert not note_about(notes, key), notes
    for key in ("learning_rate", "model_dir"):
        assert len(note_about(notes, f"unknown params key {key!r}")) == 1, notes
    assert note_about(notes, "hist='pdfs'") and note_about(notes, "verbose=1")
    assert note_about(notes, "'log_nvtx'") and note_about(notes, "log1p")
    assert note_about(notes, "nevts=1000 was a total over all files")
    assert note_about(notes, "relative to the working directory")
    assert note_about(notes, "95th percentile")
    assert not note_about(notes, "not a local file") and not note_about(notes, "could not be read")
    assert not note_about(notes, "tree does not have")
    assert all(n.endswith(".") for n in notes), notes


def test_sample_loads(sample: Conversion) -> None:
    pipeline = mlaas.spec.load(sample.spec, base_dir=OLD)
    assert pipeline.data.max_events == 1000
    assert pipeline.data.normalize.default == "minmax"


@pytest.mark.parametrize("params,train,note", [
    ({"epochs": 0, "batch_size": 64}, {"batch_size": 64}, "epochs=0 is not a positive"),
    ({"batch_size": "big"}, {}, "batch_size='big' is not a positive"),
    ({"shuffle": False, "epochs": 3}, {"epochs": 3}, "mlaas always shuffles training"),
])
def test_training_keys_become_the_train_section(params: dict, train: dict, note: str) -> None:
    result = convert(params, [str(FILES / "uproot-HZZ.root")], [1])
    assert result.spec.get("train", {}) == train
    assert note_about(result.notes, note), result.notes
    mlaas.spec.load(result.spec)  # a valid pipeline, train section included


def test_sample_yaml_round_trip(sample: Conversion) -> None:
    text = sample.yaml()
    assert text.startswith("# Converted from an MLaaS4HEP configuration")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("verbose=1" in line for line in header)  # the notes head the file
    assert yaml.safe_load(text) == sample.spec
    mlaas.spec.load(yaml.safe_load(text), base_dir=OLD)


def test_sample_lists_one_file_under_two_labels_and_says_mlaas_refuses_it(
        sample: Conversion) -> None:
    (note,) = note_about(sample.notes, "is listed with labels 1, 0")
    assert "uproot-HZZ.root" in note and "keep it under one label" in note
    with pytest.raises(SpecError, match=r"is in two sources, data\.sources\[0\] and "):
        RootDataset(mlaas.spec.load(sample.spec, base_dir=OLD), split="all")


def test_a_file_twice_under_one_label_is_read_once_not_refused() -> None:
    hzz = str(FILES / "uproot-HZZ.root")
    result = convert({}, [hzz, hzz, "root://127.0.0.1:1094//store/a.root"], [1, 1, 0])
    (note,) = note_about(result.notes, "is listed 2 times with label 1")
    assert "mlaas reads them once" in note
    assert not note_about(result.notes, "refuses")
    # remote names as written: normpath made root://h//store/a.root and root:/h/store/a.root one
    result = convert({}, ["root://127.0.0.1:1094//store/a.root",
                          "root://127.0.0.1:1094/store/a.root"], [1, 0])
    assert not note_about(result.notes, "is listed with labels"), result.notes



def test_names_of_one_file_are_compared_as_mlaas_reads_them() -> None:
    # /store/ names go through the redirector, and a doubled slash is the same file to XRootD
    redirector = {"redirector": "root://127.0.0.1:1094"}
    result = convert(redirector, ["/store/a.root", "/store//a.root"], [1, 1])
    (note,) = note_about(result.notes, "is listed 2 times with label 1")
    assert note.startswith("root://127.0.0.1:1094//store/a.root ")
    result = convert(redirector, ["/store/a.root", "root://127.0.0.1:1094//store/a.root"], [1, 0])
    assert note_about(result.notes, "is listed with labels 1, 0"), result.notes
    with pytest.raises(SpecError, match=r"is in two sources"):  # as mlaas does
        sources.resolve_files(mlaas.spec.load(result.spec))


@pytest.mark.filterwarnings("ignore:.*copies of one file")  # the stand-in is a copy, meant
def test_sample_iterates_on_hzz(sample: Conversion, tmp_path: Path) -> None:
    # the sample's background is HZZ again (a stand-in): a copy of it, for one file per source
    spec = copy.deepcopy(sample.spec)
    shutil.copy(FILES / "uproot-HZZ.root", tmp_path / "background.root")
    spec["data"]["sources"][1]["files"] = [str(tmp_path / "background.root")]
    pipeline = mlaas.spec.load(spec, base_dir=OLD)
    dataset = RootDataset(pipeline, split="all", shuffle=False, batch_size=512, prefetch=False)
    events = 0
    for batch in dataset:
        assert batch["x"].shape[1] == len(dataset.feature_names)
        events += len(batch["y"])
    assert 0 < events <= 2 * 1000
    assert dataset.feature_names[0] == "NMuon"
    assert "MET_pt" in dataset.feature_names
    assert any(name.startswith("Muon_Pt_") for name in dataset.feature_names)


def test_cli_import(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(app, [
        "import-mlaas4hep", "--params", str(OLD / "params.json"),
        "--files", str(OLD / "files.txt"), "--labels", str(OLD / "labels.txt"),
        "--preproc", str(OLD / "preproc.json"), "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    loaded = yaml.safe_load(out.read_text())
    assert loaded["data"]["tree"] == "events"
    mlaas.spec.load(loaded, base_dir=OLD)


# --------------------------------------------------------------------------- convert()


def base_params(**extra: object) -> dict[str, object]:
    return {"branch": "events", "selected_branches": ["NMuon", "MET_px"], **extra}


def test_sources_grouped_by_label_in_first_seen_order() -> None:
    result = convert(base_params(), ["s1.root", "b1.root", "s2.root", "b2.root", "x.root"],
                     ["1", "0", "1", 0.0, "2.5"])
    assert result.spec["data"]["sources"] == [
        {"files": ["s1.root", "s2.root"], "label": 1},
        {"files": ["b1.root", "b2.root"], "label": 0},
        {"files": ["x.root"], "label": 2.5},
    ]
    mlaas.spec.load(result.spec)


def test_label_count_mismatch_names_both_files(tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text(json.dumps(base_params()))
    files = tmp_path / "files.txt"
    files.write_text("a.root\nb.root\n# c.root\nc.root\n")
    labels = tmp_path / "labels.txt"
    labels.write_text("1\n0\n")
    with pytest.raises(SpecError) as info:
        convert_files(params, files, labels)
    message = str(info.value)
    assert str(files) in message and str(labels) in message
    assert "3 file(s)" in message and "2 label(s)" in message


def test_label_must_be_a_number() -> None:
    with pytest.raises(SpecError, match="'signal' in labels.txt is not a number"):
        convert(base_params(), ["a.root"], ["signal"])


def test_unparseable_def_becomes_a_note() -> None:
    preproc = {"new_branch": {"weird": {"def": "foo(MET_px) +", "type": "flat",
                                        "cut": "weird > 1", "remove": "False"}}}
    result = convert(base_params(), ["a.root"], ["1"], preproc, tree_kinds=HZZ_KINDS)
    data = result.spec["data"]
    assert "derived" not in data and "cut" not in data
    assert data["features"] == ["NMuon", "MET_px"]
    assert note_about(result.notes, "new_branch 'weird': def 'foo(MET_px) +'")
    assert note_about(result.notes, "its cuts (cut) were left out")
    mlaas.spec.load(result.spec)


def test_cut_on_an_untranslated_new_branch_is_dropped() -> None:
    preproc = {"new_branch": {"bad": {"def": "np.log1p(MET_px)", "type": "flat"}},
               "flat_cut": {"bad": {"cut": "bad > 0", "remove": "False"},
                            "NMuon": {"cut": "NMuon > 0", "remove": "False"}}}
    result = convert(base_params(), ["a.root"], ["1"], preproc, tree_kinds=HZZ_KINDS)
    assert result.spec["data"]["cut"] == "NMuon > 0"
    assert note_about(result.notes, "cut 'bad > 0' uses 'bad'")
    assert not note_about(result.notes, "tree does not have")


def test_names_missing_from_the_tree_are_notes() -> None:
    preproc = {"new_branch": {"pt": {"def": "hypot(Muon_px, Muon_Py)", "type": "jagged"}},
               "jagged_cut": {"Elec_E": {"cut": ["Elec_E > 1", "any"], "remove": "False"}}}
    result = convert(base_params(), ["a.root"], ["1"], preproc, tree_kinds=HZZ_KINDS)
    assert note_about(result.notes, "preproc uses 'Elec_E', 'Muon_px', which the first file")
    mlaas.spec.load(result.spec)


def test_exclude_patterns_are_kept_as_patterns_without_the_tree() -> None:
    params = {"selected_branches": "", "exclude_branches": ["Jet_*", "MET_py"]}
    result = convert(params, ["root://eos.example//a.root"], ["1"])  # no tree to expand with
    assert result.spec["data"]["exclude"] == ["Jet_*", "MET_py"]
    assert not note_about(result.notes, "pattern 'Jet_*' needs the first file")
    mlaas.spec.load(result.spec)


def test_a_numpy_reduction_over_all_events_is_noted_for_what_it_is() -> None:
    preproc = {"new_branch": {"dMET": {"def": "MET_px - np.mean(MET_px)", "type": "flat"}}}
    result = convert(base_params(), ["a.root"], ["1"], preproc, tree_kinds=HZZ_KINDS)
    assert note_about(result.notes, "np.mean reduced over all the events of a chunk there")
    assert "dMET" not in result.spec["data"].get("derived", {})


def test_a_selected_new_branch_keeps_its_declared_type_and_runs_on_hzz() -> None:
    # found by an audit: a jagged new branch in selected_branches became a flat feature
    # with a false "not in the first file's tree" note; a flat one's [cond, any] cut
    # became any(...) of a flat value, which does not load
    params = base_params(selected_branches=["NMuon", "Muon_Pt", "MET_px"])
    preproc = {"new_branch": {
        "Muon_Pt": {"def": "np.sqrt(Muon_Px**2 + Muon_Py**2)", "type": "jagged",
                    "cut": ["Muon_Pt > 5", "any"]},
        "MET": {"def": "np.sqrt(MET_px**2 + MET_py**2)", "type": "flat",
                "cut": ["MET > 10", "any"]}}}
    result = convert(params, [str(FILES / "uproot-HZZ.root")], [1], preproc,
                     tree_kinds=HZZ_KINDS)
    data = result.spec["data"]
    assert data["features"] == ["NMuon", {"branch": "Muon_Pt"}, "MET_px", "MET"]
    assert data["cut"] == "(any(Muon_Pt > 5)) & (MET > 10)"
    assert not note_about(result.notes, "'Muon_Pt' is not in the first file")
    ds = RootDataset(mlaas.spec.load(result.spec), split="all", shuffle=False)
    assert "Muon_Pt_0" in ds.feature_names and ds.num_events > 0


def test_features_all_with_exclude_patterns_and_removed_branches() -> None:
    params = {"branch": "events", "selected_branches": "", "identifier": "run,event",
              "exclude_branches": ["Jet_*", "MET_py"], "nevts": -1, "chunk_size": -1}
    preproc = {"new_branch": {"MET_pt": {"def": "np.hypot(MET_px, MET_py)", "type": "flat",
                                         "remove": "True", "keys_to_remove": ["MET_px"]}},
               "flat_cut": {"NMuon": {"cut": "NMuon >= 1", "remove": "True"}}}
    result = convert(params, ["a.root"], ["1"], preproc, tree_kinds=HZZ_KINDS)
    data = result.spec["data"]
    assert data["features"] == "all"
    assert data["exclude"] == ["Jet_Px", "Jet_Py", "Jet_ID", "MET_py", "NMuon", "MET_pt",
                               "MET_px"]
    assert data["identifiers"] == ["run", "event"]
    assert data["derived"] == {"MET_pt": "hypot(MET_px, MET_py)"}
    assert data["cut"] == "NMuon >= 1"
    assert "max_events" not in data and "step_size" not in data
    assert note_about(result.notes, "chunk_size=-1")
    mlaas.spec.load(result.spec)


def test_selected_without_kinds_notes_jagged_and_ignores_exclude() -> None:
    params = base_params(selected_branches="NMuon, Muon_Px", exclude_branches=["MET_px"])
    result = convert(params, ["root://eos.example//a.root"], ["1"])
    assert result.spec["data"]["features"] == ["NMuon", "Muon_Px"]
    assert "exclude" not in result.spec["data"]
    assert note_about(result.notes, "{branch: NAME}")
    assert note_about(result.notes, "exclude_branches is ignored")
    assert not note_about(result.notes, "relative to the working directory")


def test_unopenable_first_file_is_a_note(tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text(json.dumps(base_params(selected_branches=["NMuon"])))
    (tmp_path / "files.txt").write_text("root://eos.example//store/a.root\n")
    (tmp_path / "labels.txt").write_text("1\n")
    result = convert_files(params, tmp_path / "files.txt", tmp_path / "labels.txt")
    assert "not a local file" in result.notes[0]
    assert result.spec["data"]["features"] == ["NMuon"]


def test_exclude_branches_from_a_file(tmp_path: Path) -> None:
    """MLaaS4HEP also took exclude_branches as the name of a file, one branch per line."""
    (tmp_path / "exclude.txt").write_text("Jet_Px\n# comment\nJet_Py\n")
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"branch": "events", "selected_branches": "",
                                  "exclude_branches": "exclude.txt"}))
    (tmp_path / "files.txt").write_text(f"{FILES / 'uproot-HZZ.root'}\n")
    (tmp_path / "labels.txt").write_text("1\n")
    result = convert_files(params, tmp_path / "files.txt", tmp_path / "labels.txt")
    assert result.spec["data"]["features"] == "all"
    assert result.spec["data"]["exclude"] == ["Jet_Px", "Jet_Py"]
    assert result.notes == []
    assert "# Everything was mapped." in result.yaml()


@pytest.mark.parametrize(("value", "expected", "noted"), [
    ("root://cms-xrd-global.cern.ch", "root://cms-xrd-global.cern.ch", False),
    ("cms-xrd-global.cern.ch", "root://cms-xrd-global.cern.ch", True),
    ("https://example.org", None, True),
    ("", None, False),
])
def test_redirector(value: str, expected: str | None, noted: bool) -> None:
    result = convert(base_params(redirector=value), ["a.root"], ["1"])
    assert result.spec["data"].get("redirector") == expected
    assert bool(note_about(result.notes, "redirector")) is noted
    mlaas.spec.load(result.spec)


def test_unknown_preproc_keys_are_notes() -> None:
    preproc = {"new_cut": {}, "flat_cut": {"NMuon": {"cut": "NMuon > 0", "remove": "False",
                                                     "weight": 2}}}
    result = convert(base_params(), ["a.root"], ["1"], preproc)
    assert note_about(result.notes, "unknown preproc key 'new_cut'")
    assert note_about(result.notes, "flat_cut.NMuon key 'weight' is unknown")
    assert result.spec["data"]["cut"] == "NMuon > 0"


@pytest.mark.parametrize(("source", "expected"), [
    ("np.log(x)", "log(x)"),
    ("numpy.sqrt(a**2 + b**2)", "sqrt(a**2 + b**2)"),
    ("np.absolute(x) * np.pi", "abs(x) * 3.141592653589793"),
    ("fabs(x)", "abs(x)"),
    ("a > 1 && !(b < 2)", "a > 1 and not (b < 2)"),
    ("a != 1 || b", "a != 1 or b"),
])
def test_translate_expression(source: str, expected: str) -> None:
    assert translate_expression(source) == expected


def test_numpy_reductions_are_not_taken_for_ours() -> None:
    """np.max(x) was a maximum over all events; our max(x) is one per event."""
    preproc = {"new_branch": {"top": {"def": "np.max(Muon_Px)", "type": "flat"}}}
    result = convert(base_params(), ["a.root"], ["1"], preproc)
    assert "derived" not in result.spec["data"]
    assert note_about(result.notes, "new_branch 'top': def 'np.max(Muon_Px)'")


def test_root_logic_keeps_its_precedence() -> None:
    """``&&`` binds looser than ``>`` in ROOT; a plain ``&`` here would not."""
    text = translate_expression("MET_px > 1 && NMuon < 2")
    env = {"MET_px": np.array([0.0, 5.0, 5.0]), "NMuon": np.array([1, 1, 3])}
    assert parse(text).evaluate(env).tolist() == [False, True, False]


# --------------------------------------------------------------------------- audit fixes


@pytest.mark.parametrize(("source", "expected"), [
    ("np.sum(Jet_pt, axis=1)", "sum(Jet_pt)"),
    ("np.max(Muon_Px, axis=-1)", "max(Muon_Px)"),
    ("numpy.amin(x, 1) + np.mean(np.abs(x), axis = 1)", "min(x) + mean(abs(x))"),
    ("np.count_nonzero(Jet_pt > 30, axis=1)", "sum((Jet_pt > 30) != 0)"),
    ("np.any(x > 1, axis=1) && np.all(x < 9, axis=-1)", "any(x > 1) and all(x < 9)"),
])
def test_numpy_reductions_along_axis_1_are_ours_per_event(source: str, expected: str) -> None:
    """axis=1 (or -1) reduces each event's list, which is exactly what ours do."""
    assert translate_expression(source) == expected
    parse(expected)


@pytest.mark.parametrize("source", [
    "np.sum(Jet_pt)", "np.sum(Jet_pt, axis=0)", "np.max(Jet_pt, axis=None)",
    "np.count_nonzero(Jet_pt)", "np.sum(Jet_pt, axis=1, keepdims=True)",
])
def test_numpy_reductions_over_events_stay_refused(source: str) -> None:
    preproc = {"new_branch": {"HT": {"def": source, "type": "flat", "cut": "HT > 100"}}}
    result = convert(base_params(), ["a.root"], ["1"], preproc, tree_kinds=HZZ_KINDS)
    assert "derived" not in result.spec["data"] and "cut" not in result.spec["data"]
    assert note_about(result.notes, f"new_branch 'HT': def {source!r} could not be")


def test_a_per_event_numpy_sum_keeps_its_branch_and_cut_and_runs_on_hzz() -> None:
    # found by an audit: np.sum(x, axis=1) was called a reduction over all events and its
    # branch and cut were dropped
    preproc = {"new_branch": {"HT": {"def": "np.sum(Muon_Px, axis=1)", "type": "flat",
                                     "cut": "HT > 10", "remove": "False"}}}
    result = convert(base_params(), [str(FILES / "uproot-HZZ.root")], [1], preproc,
                     tree_kinds=HZZ_KINDS)
    data = result.spec["data"]
    assert data["derived"] == {"HT": "sum(Muon_Px)"}
    assert data["cut"] == "HT > 10"
    assert data["features"] == ["NMuon", "MET_px", "HT"]
    assert not note_about(result.notes, "could not be translated"), result.notes
    ds = RootDataset(mlaas.spec.load(result.spec), split="all", shuffle=False)
    assert "HT" in ds.feature_names and ds.num_events > 0


@pytest.mark.parametrize(("params", "data", "train"), [
    ({"epochs": "5", "batch_size": " 64 "}, {}, {"epochs": 5, "batch_size": 64}),
    ({"nevts": "1000", "chunk_size": "500"}, {"max_events": 1000, "step_size": 500}, {}),
    ({"nevts": "-1", "chunk_size": "-1"}, {}, {}),
])
def test_numeric_strings_are_whole_numbers_as_int_read_them(
        params: dict, data: dict, train: dict) -> None:
    # found by an audit: "epochs": "5" (JSON configs often quote numbers) was refused
    result = convert(params, [str(FILES / "uproot-HZZ.root")], [1])
    assert {k: v for k, v in result.spec["data"].items() if k in data} == data
    assert result.spec.get("train", {}) == train
    for key in ("epochs=", "batch_size=", "nevts="):
        assert not note_about(result.notes, key), result.notes
    mlaas.spec.load(result.spec)


@pytest.mark.parametrize(("key", "value"), [
    ("epochs", "5.5"), ("batch_size", "big"), ("nevts", "5.5"), ("epochs", "-3"),
    ("chunk_size", "big"),
])
def test_strings_that_are_not_whole_numbers_are_still_refused(key: str, value: str) -> None:
    result = convert({key: value}, [str(FILES / "uproot-HZZ.root")], [1])
    assert note_about(result.notes, f"{key}={value!r} is not a positive"), result.notes
    assert key not in result.spec.get("train", {})
    assert "max_events" not in result.spec["data"] and "step_size" not in result.spec["data"]


def write_old_config(directory: Path, files: str, selected: list[str]) -> tuple[Path, ...]:
    """params.json, files.txt and labels.txt (one label per line of ``files``)."""
    params = directory / "params.json"
    params.write_text(json.dumps({"branch": "events", "selected_branches": selected}))
    (directory / "files.txt").write_text(files)
    labels = "".join("1\n" for line in files.splitlines() if line.strip())
    (directory / "labels.txt").write_text(labels)
    return params, directory / "files.txt", directory / "labels.txt"


def test_a_glob_first_file_is_expanded_to_learn_the_kinds(tmp_path: Path) -> None:
    # found by an audit: data/sig*.root was "not a local file here"
    (tmp_path / "data").mkdir()
    for name in ("sig1.root", "sig2.root"):
        shutil.copy(FILES / "uproot-HZZ.root", tmp_path / "data" / name)
    paths = write_old_config(tmp_path, "data/sig*.root\n", ["NMuon", "Muon_Px"])
    result = convert_files(*paths)  # the working directory is not tmp_path
    assert not note_about(result.notes, "not a local file"), result.notes
    data = result.spec["data"]
    assert data["sources"] == [{"files": ["data/sig*.root"], "label": 1}]  # kept a glob
    assert data["features"] == ["NMuon", {"branch": "Muon_Px"}]
    pipeline = mlaas.spec.load(result.spec, base_dir=tmp_path)
    assert len(sources.resolve_files(pipeline)) == 2


def test_a_glob_matching_no_local_file_is_a_note(tmp_path: Path) -> None:
    paths = write_old_config(tmp_path, "data/sig*.root\n", ["NMuon"])
    result = convert_files(*paths)
    assert "matches no local file" in result.notes[0], result.notes
    assert result.spec["data"]["sources"] == [{"files": ["data/sig*.root"], "label": 1}]


def test_derived_jagged_names_of_two_collections_read_on_datagen(tmp_path: Path) -> None:
    """The predecessor's docs name new branches log_Jet_pt, log_Muon_pt (<prefix>_<input>).

    Grouped by the text before the first ``_``, both were one collection 'log'
    whose multiplicities differ, and pass 1 failed; a derived name now takes
    the collection of the branches it is computed from.
    """
    from mlaas.data import synth

    made = synth.generate(tmp_path / "gen", 2000, seed=1)["files"]
    preproc = tmp_path / "preproc.json"
    preproc.write_text(json.dumps({"new_branch": {
        "log_Jet_pt": {"def": "np.log(Jet_pt)", "type": "jagged", "remove": "False"},
        "log_Muon_pt": {"def": "np.log(Muon_pt)", "type": "jagged", "remove": "False"}}}))
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"selected_branches": ["log_Jet_pt", "log_Muon_pt"]}))
    (tmp_path / "files.txt").write_text(f"{made['signal']}\n{made['background']}\n")
    (tmp_path / "labels.txt").write_text("1\n0\n")
    result = convert_files(params, tmp_path / "files.txt", tmp_path / "labels.txt", preproc)
    assert result.spec["data"]["features"] == [{"branch": "log_Jet_pt"},
                                               {"branch": "log_Muon_pt"}]
    assert not note_about(result.notes, "could not be translated"), result.notes
    ds = RootDataset(mlaas.spec.load(result.spec), split="all")
    assert ds.num_events > 0
    assert {"log_Jet_pt_0", "log_Muon_pt_0"} <= set(ds.feature_names)
