"""The published training recipes: each stage of each release as the official scripts ran it (LLaVA-1.5's
scripts/v1_5/*.sh, LLaVA-NeXT's scripts/train/*.sh), as TrainConfig values that `python train.py --recipe NAME`
starts from (flags override them), and the download of a recipe's public data set.

`data_hub` is a dataset repo fetched with huggingface_hub; `data_json` the file in it; images come from
`data_images` (an archive in the repo, unpacked once) or from --image-folder.
"""

import os
from pathlib import Path

from anyres import NEXT_GRIDS
from convert import hub_command

PRETRAIN_558K = dict(data_hub="liuhaotian/LLaVA-Pretrain", data_json="blip_laion_cc_sbu_558k.json",
                     data_images="images.zip")
MIX_665K = dict(data_hub="liuhaotian/LLaVA-Instruct-150K", data_json="llava_v1_5_mix665k.json")
STAGE1_CLIP_VICUNA = dict(stage="1", llm="lmsys/vicuna-7b-v1.5", vision_tower="openai/clip-vit-large-patch14-336",
                          template="plain", image_aspect_ratio="square", lr=1e-3, global_batch_size=256,
                          micro_batch_size=32, max_len=2048, **PRETRAIN_558K)
# LLaVA-1.5's finetune_lora.sh: adapters of rank 128 (alpha 256) on every decoder linear at lr 2e-4, the projector at
# 2e-5, tower frozen; batch 16 per GPU on 8 GPUs
LORA = dict(lr=2e-4, projector_lr=2e-5, freeze_vision_tower=True, lora_rank=128, lora_alpha=256, lora_dropout=0.05)
NEXT_STAGE2 = dict(stage="2", template="vicuna_v1", image_aspect_ratio="anyres", grid_pinpoints=str(NEXT_GRIDS),
                   global_batch_size=128, micro_batch_size=4, max_len=4096, data_hub="lmms-lab/LLaVA-NeXT-Data")
ONEVISION_0_5B = dict(template="qwen_1_5", image_aspect_ratio="anyres_max_9", grid_pinpoints="(1x1),...,(6x6)",
                      lr=1e-5, vision_lr=2e-6, global_batch_size=256, micro_batch_size=1)

RECIPES = {
    "llava-v1.5-stage1": STAGE1_CLIP_VICUNA,
    "llava-v1.5-stage2": dict(stage="2", template="vicuna_v1", image_aspect_ratio="pad", lr=2e-5,
                              global_batch_size=128, micro_batch_size=16, max_len=2048, freeze_vision_tower=True,
                              **MIX_665K),
    "llava-v1.5-lora": dict(stage="2", template="vicuna_v1", image_aspect_ratio="pad", global_batch_size=128,
                            micro_batch_size=16, max_len=2048, **LORA, **MIX_665K),
    "llava-next-stage1": STAGE1_CLIP_VICUNA,  # LLaVA-NeXT reuses LLaVA-1.5's alignment stage
    "llava-next-stage2": dict(NEXT_STAGE2, lr=2e-5, vision_lr=2e-6),
    # the same LoRA settings on LLaVA-NeXT's stage 2 (not an official script: NeXT's release trained the full model)
    "llava-next-stage2-lora": dict(NEXT_STAGE2, **LORA),
    "onevision-0.5b-stage1": dict(stage="1", llm="Qwen/Qwen2-0.5B-Instruct",
                                  vision_tower="google/siglip-so400m-patch14-384", template="plain",
                                  image_aspect_ratio="square", lr=1e-3, global_batch_size=256, micro_batch_size=16,
                                  max_len=8192, **PRETRAIN_558K),
    "onevision-0.5b-stage1.5": dict(ONEVISION_0_5B, stage="1.5", max_len=8192),
    "onevision-0.5b-stage2": dict(ONEVISION_0_5B, stage="2", max_len=32768),
    # NeXT-Interleave: continue a stage-2 model (--model) on M4-Instruct with the tower frozen (the Interleave blog),
    # several images per sample padded to squares, in the interleaved and the in-the-front formats mixed half and half
    "interleave-continue": dict(stage="2", template="qwen_1_5", lr=1e-5, freeze_vision_tower=True,
                                global_batch_size=128, micro_batch_size=1, max_len=32768, image_placement="mixed",
                                data_hub="lmms-lab/M4-Instruct-Data"),
}


def fetch_recipe_data(recipe: dict, image_folder: str = "") -> dict:
    """Download a recipe's dataset repo through huggingface_hub (the cache is reused) and unpack its images once."""
    if "data_hub" not in recipe:
        raise SystemExit("error: this recipe has no public dataset; pass --data and --image-folder")
    if "data_json" not in recipe:
        raise SystemExit(f"error: {recipe['data_hub']} has no single JSON file in the LLaVA format that this recipe "
                         f"can name; download it (README, 'Training') and pass --data / --image-folder")
    from huggingface_hub import snapshot_download

    patterns = [recipe["data_json"]] + ([recipe["data_images"]] if "data_images" in recipe else [])
    try:
        folder = Path(snapshot_download(recipe["data_hub"], repo_type="dataset", allow_patterns=patterns))
    except Exception as e:
        raise SystemExit(f"error: could not download {recipe['data_hub']} ({type(e).__name__}); run "
                         f"`{hub_command(recipe['data_hub'], '--repo-type', 'dataset')}` where there is network") from e
    if image_folder or "data_images" not in recipe:
        return {"data": str(folder / recipe["data_json"]), "image_folder": image_folder or str(folder)}
    unpacked = unpack_once(folder / recipe["data_images"], folder / "unpacked")
    return {"data": str(folder / recipe["data_json"]), "image_folder": str(unpacked)}


def unpack_once(archive: Path, unpacked: Path) -> Path:
    """Unpack a zip into `unpacked` unless that is there. Every rank of a torchrun job calls this before the process
    group exists, so the first to take the lock unpacks (into a temporary folder, renamed when whole) and the rest
    wait for it, then find the folder."""
    import fcntl
    import shutil
    import zipfile

    with open(unpacked.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not unpacked.exists():
            tmp = unpacked.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)  # what a killed unpacking left
            print(f"unpacking {archive.name} into {unpacked} (once)", flush=True)
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
            os.replace(tmp, unpacked)
    return unpacked
