"""benchmarks/prepare_ebhi_pool.py never lets a test image or a test patient's tissue into the pretraining pool;
benchmarks/accuracy.py takes extra backbone rows and keeps hand-written sections of the file it rewrites."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import accuracy
from prepare_ebhi_pool import case_id, patient_id, pixel_hash, plan, pool_name


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_names_cases_and_patients() -> None:
    assert pool_name("High-grade IN", "GTXC2110585-1-400-001.png") == "High-grade-IN_GTXC2110585-1-400-001.png"
    assert case_id("GTxc2012789-1-400-003.png") == "GTXC2012789-1"  # the release spells GTxc and GTXC
    assert patient_id("GT2012508-3-400-001.png") == "GT2012508"
    with pytest.raises(SystemExit, match="not an EBHI-Seg file name"):
        case_id("readme.png")


def test_pool_leaves_out_test_and_train_images_their_cases_and_patients() -> None:
    images = [("Polyp", "GT1-1-400-001.png"),         # a test image
              ("Polyp", "GT1-1-400-002.png"),         # same case as a test image
              ("Normal", "GT1-2-400-001.png"),        # another section of a test patient
              ("Polyp", "GT2-1-400-001.png"),         # a training image
              ("Polyp", "GT2-1-400-002.png"),         # same case as a training image: kept (unlabelled)
              ("High-grade IN", "gt3-1-400-001.png"),  # the test image's pixels under another name
              ("High-grade IN", "GT4-1-400-001.png")]  # unrelated
    pixels = {"GT1-1-400-001.png": 10, "gt3-1-400-001.png": 10, "GT9-1-400-001.png": 20}
    test = ["Polyp_GT1-1-400-001.png", "Serrated-adenoma_GT9-1-400-001.png"]
    train = ["Polyp_GT2-1-400-001.png"]

    def read(cat: str, name: str) -> bytes:
        return _png(pixels.get(name, 100 + len(name) + len(cat)))

    hashes = {pixel_hash(_png(10)), pixel_hash(_png(20))}
    keep, left = plan(images, test, train, hashes, read, case_only=False)
    assert keep == [("Polyp", "GT2-1-400-002.png"), ("High-grade IN", "GT4-1-400-001.png")]
    assert left == {"test image": ["Polyp_GT1-1-400-001.png"], "train image": ["Polyp_GT2-1-400-001.png"],
                    "test pixels": ["High-grade-IN_gt3-1-400-001.png"], "test case": ["Polyp_GT1-1-400-002.png"],
                    "test patient": ["Normal_GT1-2-400-001.png"]}
    keep, left = plan(images, test, train, hashes, read, case_only=True)
    assert ("Normal", "GT1-2-400-001.png") in keep and not left["test patient"]


def test_accuracy_backbone_row_and_kept_sections(tmp_path: Path) -> None:
    folder = tmp_path / "my-backbone"
    folder.mkdir()
    row = accuracy.backbone_row(f"ft={folder}")
    assert row.key == "ft" and row.backbone == str(folder.resolve()) and row.options == {"head": "context"}
    for bad in ("ft", f"small={folder}", f"ft={tmp_path / 'missing'}"):
        with pytest.raises(argparse.ArgumentTypeError):
            accuracy.backbone_row(bad)

    accuracy.ROWS["ft"] = row
    try:
        md, js = tmp_path / "ACCURACY.md", tmp_path / "accuracy.json"
        md.write_text(f"# old table\n\n{accuracy.KEEP_MARKER}\n\n## Fine-tuning, written by hand\n\n0.8\n")
        runs = [{"row": r, "case": "ebhi", "seed": 0, "n_train": "all", "score": s, "miou": s, "train_s": 1.0,
                 "evaluate_s": 1.0, "per_class_dice": {"Gland": s, "Other": s}}
                for r, s in (("small-context", 0.7), ("ft", 0.75))]
        meta = {"quick": False, "rows": ["small-context", "ft"], "cases": ["ebhi"], "seeds": [0], "subsets": 0,
                "machine": "test", "generated": "now"}
        accuracy.write_docs(runs, meta, md, js)
        text = md.read_text()
        assert "# old table" not in text and text.count(accuracy.KEEP_MARKER) == 1
        assert text.rstrip().endswith("## Fine-tuning, written by hand\n\n0.8")
        assert "`ft` − `small --head context` = +0.050" in text
    finally:
        del accuracy.ROWS["ft"]


@pytest.mark.slow  # builds, saves and reloads a (tiny) backbone
def test_checkpoint_backbone_exports_the_ema_unet_of_that_step(tmp_path: Path) -> None:
    import torch
    from checkpoint_backbone import export

    from pdseg_qupath.backbone.model import build_backbone
    from pdseg_qupath.backbone.spec import load_backbone
    from pdseg_qupath.learn.pretrain import save_state

    bb = build_backbone("tiny", "cpu")
    ema = {k: v + 0.5 for k, v in bb.unet.state_dict().items()}  # differs from the live UNet
    save_state(tmp_path / "state", {"settings": {"config": "tiny", "from_spec": None}, "stage": "unet", "step": 7,
                                    "vq": bb.vq.state_dict(), "unet": bb.unet.state_dict(), "ema": ema,
                                    "hist": {"unet_heldout": [[7, 0.3]]}, "info": {"seconds": {"unet": 1.0}}})
    rec = export(tmp_path / "state", tmp_path / "bb")
    out = load_backbone(tmp_path / "bb")
    assert rec["step"] == 7 and rec["unet"]["heldout_eps_loss"] == 0.3 and not out.random_weights
    assert all(torch.equal(out.unet.state_dict()[k], v) for k, v in ema.items())
    assert all(torch.equal(out.vq.state_dict()[k], v) for k, v in bb.vq.state_dict().items())
