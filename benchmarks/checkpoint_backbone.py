"""An intermediate ``pretrain`` checkpoint as a backbone folder (a mid-run point of a fine-tune, for benchmarks).

``pdseg-qupath pretrain`` keeps its resume state in ``<out>.pretrain-state/`` (``checkpoint.json`` +
``checkpoint.safetensors``, overwritten every 100 steps). Copy that folder when the step you want is reached,
then turn it into a backbone folder usable as ``--backbone DIR``: the autoencoder and the EMA UNet of that step,
as ``pretrain`` itself saves them at the end. The learning rate at that step is that of the longer schedule
(not annealed), so this is a point on the way, not the result of a shorter run.

    python benchmarks/checkpoint_backbone.py /work/data/small-ebhi-step100-state /work/data/small-ebhi-step100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def export(state_dir: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    from pdseg_qupath.backbone.folder import save_backbone
    from pdseg_qupath.backbone.model import build_backbone
    from pdseg_qupath.backbone.spec import load_backbone
    from pdseg_qupath.core.fileio import sha256_file
    from pdseg_qupath.learn.pretrain import CHECKPOINT, TENSORS

    meta = json.loads((state_dir / CHECKPOINT).read_text())
    if sha256_file(state_dir / TENSORS) != meta["tensors_sha256"]:
        sys.exit(f"{state_dir}: {TENSORS} does not belong to {CHECKPOINT}")
    state, tensors = meta["state"], load_file(str(state_dir / TENSORS))
    s = state["settings"]
    bb = load_backbone(s["from_spec"]) if s["from_spec"] else build_backbone(s["config"], "cpu")
    for part, module in (("vq", bb.vq), ("ema", bb.unet)):
        prefix = f"/{part}/"
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sd, strict=True)
    bb.random_weights = False
    bb.source = f"pdseg-qupath pretrain ({s['config']}), checkpoint at {state['stage']} step {state['step']}"
    heldout = state["hist"]["unet_heldout"]
    record = {"kind": "pdseg-pretrain-checkpoint/1", "config": s["config"], "from": s["from_spec"], "settings": s,
              "stage": state["stage"], "step": state["step"], "unet_heldout": heldout,
              "unet": {"steps_done": state["step"], "heldout_eps_loss": heldout[-1][1] if heldout else None},
              "seconds": state["info"]["seconds"]}
    save_backbone(bb, out, record, random_weights=False)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("state_dir", type=Path, help="a copy of <out>.pretrain-state/")
    ap.add_argument("out", type=Path, help="backbone folder to write")
    args = ap.parse_args()
    rec = export(args.state_dir, args.out)
    print(f"{args.out}: {rec['stage']} step {rec['step']}, held-out ε-loss history {rec['unet_heldout']}")


if __name__ == "__main__":
    main()
