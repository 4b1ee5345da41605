"""Hostile files stay data: planted pickles, hub ids in model files, altered weights, symlinks, CSV formulas."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from shapely.geometry import box

from pdseg_qupath.backbone.folder import MANIFEST, save_backbone
from pdseg_qupath.backbone.model import build_backbone
from pdseg_qupath.backbone.spec import load_backbone
from pdseg_qupath.core.annotations import Annotation
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import sha256_file
from pdseg_qupath.learn import pretrain as pt
from pdseg_qupath.learn.modelio import META_FILE
from pdseg_qupath.learn.resume import RESUME_DIR, Resume
from pdseg_qupath.outputs.tables import Summary, csv_cell
from pdseg_qupath.sources.base import ImageRecord
from pdseg_qupath.sources.qupath.folder import GeoJSONFolder
from pdseg_qupath.tasks.cohort import _run_lock

from _cohort_data import tiny_model

PACKAGE = Path(__file__).resolve().parent.parent / "pdseg_qupath"


class _Planted:
    """A pickle that, once loaded, would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_no_unsafe_torch_load_in_the_package() -> None:
    for py in PACKAGE.rglob("*.py"):
        assert "weights_only=False" not in py.read_text(), py


def test_planted_pretrain_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    state = tmp_path / "out.pretrain-state"
    state.mkdir()
    for name in ("checkpoint.pt", pt.CHECKPOINT, pt.TENSORS):  # the old pickle name and the state's files
        with open(state / name, "wb") as f:
            torch.save({"settings": {}, "x": _Planted(marker)}, f, pickle_module=pickle)
    with pytest.raises(PdsegError, match=str(state / pt.CHECKPOINT)):
        pt.load_checkpoint(state / pt.CHECKPOINT, None)  # type: ignore[arg-type]
    assert not marker.exists()
    source = (PACKAGE / "learn" / "pretrain.py").read_text()
    assert "torch.load" not in source and "torch.save" not in source  # resume state: JSON + safetensors only


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("m") / "model")


def test_a_hub_id_in_a_model_file_never_contacts_the_hub(model: Path, tmp_path: Path, monkeypatch) -> None:
    from pdseg_qupath.backbone import hub
    from pdseg_qupath.learn.modelio import load_model
    from pdseg_qupath.learn.predictor import Predictor

    def no_network(spec):
        raise AssertionError(f"contacted the hub for {spec}")

    monkeypatch.setattr(hub, "fetch_hub_backbone", no_network)
    meta = json.loads((model / META_FILE).read_text())
    meta["backbone"]["spec"] = "someone/evil-backbone"
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "head.safetensors").write_bytes((model / "head.safetensors").read_bytes())
    (planted / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PdsegError, match=r"planted.*'someone/evil-backbone' is a Hugging Face id"):
        Predictor(load_model(planted), device="cpu")
    with pytest.raises(AssertionError, match="contacted the hub"):  # typed by the user: still allowed
        load_backbone("someone/evil-backbone")


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    return save_backbone(build_backbone("tiny"), tmp_path / "bb")


def test_flipped_weights_are_refused_on_every_load(saved: Path) -> None:
    w = saved / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(w)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    raw = bytearray(w.read_bytes())
    at = raw.find(state[key].numpy().tobytes()[:16])
    raw[at:at + 4] = b"\xff\xff\xff\x7f"  # a NaN, same size
    w.write_bytes(bytes(raw))
    with pytest.raises(PdsegError, match=r"unet/diffusion_pytorch_model.safetensors: sha256 does not match"):
        load_backbone(saved)


def test_non_finite_weights_are_refused_even_with_a_matching_manifest(saved: Path) -> None:
    w = saved / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(w)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = float("inf")
    save_file(state, w, metadata={"format": "pt"})
    manifest = json.loads((saved / MANIFEST).read_text())
    rel = "unet/diffusion_pytorch_model.safetensors"
    manifest["files"][rel] = {"sha256": sha256_file(w), "bytes": w.stat().st_size}
    from pdseg_qupath.backbone.folder import _combined_sha

    manifest["sha256"] = _combined_sha({k: v["sha256"] for k, v in manifest["files"].items()})
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PdsegError, match=r"1 weights are not finite"):
        load_backbone(saved)


def test_an_edited_manifest_digest_is_refused(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["sha256"] = "0" * 64
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PdsegError, match="does not match the files it lists"):
        load_backbone(saved)


# ------------------------------------------------------------------------------ symlinks pdseg did not make

def test_run_lock_never_truncates_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".pdseg-run.lock").symlink_to(victim)
    with pytest.raises(PdsegError, match="symbolic link"), _run_lock(out):
        pass
    assert victim.read_text() == "keep me"


def test_folder_write_back_backup_replaces_a_bak_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    root = tmp_path / "images"
    root.mkdir()
    src = GeoJSONFolder(root)
    image = ImageRecord(name="a.png", uri="file:///a.png", width=10, height=10, mpp=0.5)
    ann = [Annotation(box(0, 0, 5, 5), "Tumor")]
    src.write_predictions(image, ann)
    target = src.predictions_path(image)
    bak = target.with_name(target.name + ".bak")
    bak.symlink_to(victim)
    report = src.write_predictions(image, ann)
    assert victim.read_text() == "keep me"
    assert not bak.is_symlink() and json.loads(bak.read_text())["type"] == "FeatureCollection"
    assert report.backup == bak


def test_train_work_folder_symlink_is_refused_and_nothing_foreign_deleted(tmp_path: Path) -> None:
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "features-0123").mkdir()
    (victim / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / RESUME_DIR).symlink_to(victim)
    with pytest.raises(PdsegError, match="symbolic link"):
        Resume(out, ("a" * 16, "b" * 16), True, [])
    assert (victim / "features-0123").is_dir() and (victim / "notes.txt").read_text() == "mine"
    (out / RESUME_DIR).unlink()
    (out / RESUME_DIR).mkdir()
    (out / RESUME_DIR / "notes.txt").write_text("mine too")  # not pdseg's: never deleted
    (out / RESUME_DIR / "features-old").mkdir()  # stale pdseg state: removed
    r = Resume(out, ("a" * 16, "b" * 16), True, [])
    assert not (out / RESUME_DIR / "features-old").exists()
    r.finish(keep_features=False)
    assert (out / RESUME_DIR / "notes.txt").read_text() == "mine too"


# --------------------------------------------------------------------------------------------- CSV formulas

def test_summary_cells_never_start_a_formula_and_read_back_exactly(tmp_path: Path) -> None:
    names = ["=HYPERLINK(\"http://x\")", "+1", "@SUM(A1)", "-cmd", "'quoted", "Tumor"]
    s = Summary(tmp_path, names)
    s.update({"slide": "=evil.svs", "status": "ok", "tissue_mm2": "-0.5", "error": "@x"})
    with open(tmp_path / "summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    for cell in rows[0] + rows[1]:
        assert not cell.startswith(("=", "+", "@")) and not (cell.startswith("-") and cell != "-0.5"), cell
    again = Summary(tmp_path, names)
    assert again.rows["=evil.svs"]["error"] == "@x" and again.rows["=evil.svs"]["tissue_mm2"] == "-0.5"
    assert again.fields == s.fields
    assert csv_cell("-1.5e-3") == "-1.5e-3" and csv_cell("'=x") == "''=x"


def test_a_model_trained_on_a_hub_backbone_records_its_local_folder(saved: Path, monkeypatch) -> None:
    from pdseg_qupath.backbone import hub
    from pdseg_qupath.tasks.train import _backbone_record

    monkeypatch.setattr(hub, "fetch_hub_backbone", lambda spec: saved)  # the snapshot, as if downloaded
    bb = load_backbone("owner/repo")  # typed by the user: fetched
    rec = _backbone_record("owner/repo", bb)
    assert rec["spec"] == str(saved.resolve()) and rec["hub_id"] == "owner/repo"
    assert load_backbone(rec["spec"], allow_hub=False).sha256 == rec["sha256"]
