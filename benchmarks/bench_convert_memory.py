"""Peak RAM of convert-backbone on a full-size (pathsegdiff-brca-20x) checkpoint in the original layout.

    python benchmarks/bench_convert_memory.py --work /tmp/convmem

Builds a random-weight Lightning checkpoint with the original CompVis key names (UNet + VQ-f4 + SSL
embedder, ~1.8 GB) in a child process, then converts it in a fresh child process and reports that
process's peak RSS next to the checkpoint size. The inverse key map comes from the converter tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = r"""
import sys, torch, yaml
sys.path.insert(0, str(ROOT / "tests"))
from test_backbone_convert import unet_to_ldm, vq_to_ldm
from pdseg_qupath.backbone.model import build_backbone
bb = build_backbone("pathsegdiff-brca-20x")
sd = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(bb.unet.state_dict(), bb.config.unet).items()}
sd.update({"first_stage_model." + k: v for k, v in vq_to_ldm(bb.vq.state_dict(), bb.config.vq).items()})
sd.update({"cond_stage_model." + k: v for k, v in bb.conditioner.state_dict().items()})
torch.save({"state_dict": sd, "epoch": 1}, WORK / "paper.ckpt")
"""

YAML = {"model": {"params": {
    "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
    "unet_config": {"params": {"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
                               "attention_resolutions": [8, 4, 2], "num_res_blocks": 2,
                               "channel_mult": [1, 2, 3, 5], "num_heads": 1, "use_spatial_transformer": True,
                               "transformer_depth": 1, "context_dim": 512}},
    "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 8192, "ddconfig": {
            "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": []}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.SSLEmbedder", "params": {
        "patch_embed_dim": 384, "region_embed_dim": 768, "normalize_ssl": True}}}}}

CONVERT = r"""
import json, resource, time
from pdseg_qupath.backbone.convert import convert_checkpoint
t = time.time()
rec = convert_checkpoint(WORK / "paper.ckpt", WORK / "paper.yaml", WORK / "out")
print(json.dumps({"convert_s": round(time.time() - t, 1), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "converted_keys": rec["converted_keys"]}))
"""


def main() -> int:
    import shutil

    import yaml

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/pdseg-convmem")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "paper.yaml").write_text(yaml.safe_dump(YAML))
    pre = f"from pathlib import Path\nROOT = Path({str(ROOT)!r})\nWORK = Path({str(work)!r})\n"
    subprocess.run([sys.executable, "-c", pre + BUILD], check=True, cwd=ROOT)
    size = (work / "paper.ckpt").stat().st_size
    out = subprocess.run([sys.executable, "-c", pre + CONVERT], check=True, cwd=ROOT, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["ckpt_gib"] = size / 2**30
    r["peak_over_ckpt"] = r["peak_rss_gib"] / r["ckpt_gib"]
    print(json.dumps(r, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
