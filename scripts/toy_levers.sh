#!/usr/bin/env bash
# What speeds learning in the toy world: one short protocol, each lever alone against the same baseline
# (README "What speeds learning"). Every run is stage 2 of one recipe for STEPS steps at batch 32 on the
# 24 000-sample training world, scored on the validation world (seed 555 — never the held-out seed 777).
#
#   OMP_NUM_THREADS=1 bash scripts/toy_levers.sh                       # ip2p, every lever below
#   RECIPE=insightedit LEVERS="base mask5 ema" bash scripts/toy_levers.sh
#   OMP_NUM_THREADS=1 LEVERS="base ema" bash scripts/toy_levers.sh & OMP_NUM_THREADS=1 LEVERS="mask5" bash ...
#
# insightedit and mindedit run their stage 1 once (ALIGN steps) and every lever's stage 2 starts from it. A
# finished run or evaluation is skipped, so the script can be stopped and started again; the table is printed at
# the end (python3 scripts/results_table.py OUT/results/*.json prints it at any time).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/levers}
RECIPE=${RECIPE:-ip2p}
STEPS=${STEPS:-1500}
ALIGN=${ALIGN:-300}
BASE=${BASE:-assets/toy/base}            # its sd/unet is the text-to-image toy UNet
RANDOM_SD=${RANDOM_SD:-$OUT/random-sd}   # the same bases with a random UNet (made below): the "no prior" lever
T2I_F1=${T2I_F1:-$OUT/t2i-f1}            # the factor-1 bases with a text-to-image UNet (made below): lever vae1-t2i
LEVERS=${LEVERS:-"base random-unet ema minsnr mask5 lr1e-3 fresh textenc xattn16 vae1"}  # also srchalf, batchN, vpred, explicit, forced, papers
TOY_SAMPLES=${TOY_SAMPLES:-24000}        # training world (as scripts/train_toy.sh)
VAL_N=${VAL_N:-3000}                     # validation world: its eval split (10 %) is scored
mkdir -p "$OUT/results"

lever_flags() {  # the overrides that make each lever; everything else is the toy preset
  case $1 in
    base)        echo "" ;;
    random-unet) echo "--sd_path=$RANDOM_SD/sd" ;;            # editing UNet from random weights, not text-to-image
    ema)         echo "--ema_decay=0.995" ;;                   # sample with the EMA of the weights
    minsnr)      echo "--snr_gamma=5" ;;                       # Min-SNR-γ loss weighting
    mask5)       echo "--mask_loss_weight=5" ;;                # 5× loss weight inside the edit mask (ablation)
    srchalf)     echo "--unet_source_init=half" ;;             # conv_in's source channels start at W/2, not 0 (ablation)
    lr1e-3)      echo "--lr=1e-3" ;;
    batch[0-9]*) echo "--batch_size=${1#batch}" ;;             # the budget split: batch N for STEPS × 32 / N steps
    vpred)       # MIND-Edit's stage 2 on the vision head's v_insight instead of CLIP_image(I_tar) (teacher forcing)
                 [ "$RECIPE" = mindedit ] || { echo "error: vpred needs RECIPE=mindedit" >&2; exit 2; }
                 echo "--mind_image_prompt=predicted" ;;
    fresh)       echo "--toy_samples=$((STEPS * 32))" ;;   # a world as large as the run's draws: no sample seen twice
    textenc)     # CLIP's text encoder trained with the UNet (an ablation: the papers freeze it)
                 [ "$RECIPE" = ip2p ] || [ "$RECIPE" = mindedit ] ||
                   { echo "error: textenc needs RECIPE=ip2p or mindedit" >&2; exit 2; }
                 echo "--train_text_encoder=true" ;;
    xattn16)     # cross-attention at the 16×16 level too (an architecture change: ip2p only, as stage 1 fixes it)
                 [ "$RECIPE" = ip2p ] || { echo "error: xattn16 needs RECIPE=ip2p" >&2; exit 2; }
                 echo "--sd_path=$RANDOM_SD-x16/sd --unet_cross_attn_blocks=True,True,True" ;;
    vae1)        # VAE downsampling factor 1 (32×32 latents, 4× the UNet's compute; its VAE is made below)
                 [ "$RECIPE" = ip2p ] || { echo "error: vae1 needs RECIPE=ip2p" >&2; exit 2; }
                 echo "--sd_path=$RANDOM_SD-f1/sd --vae_channels=32" ;;
    vae1-t2i)    # factor 1 again, from a text-to-image UNet pretrained at 32×32 latents on that VAE (made below)
                 [ "$RECIPE" = ip2p ] || { echo "error: vae1-t2i needs RECIPE=ip2p" >&2; exit 2; }
                 echo "--sd_path=$T2I_F1/sd --vae_channels=32" ;;
    explicit)    # the Q-Former also aligned with CLIP_text(optimized_instruction) in stage 2 (an ablation)
                 [ "$RECIPE" = insightedit ] || [ "$RECIPE" = smartedit ] ||
                   { echo "error: explicit needs RECIPE=insightedit or smartedit" >&2; exit 2; }
                 echo "--qformer_explicit_weight=1 --qformer_teacher_forcing=0" ;;
    papers)      # the papers' stage 2: neither switch (the toy InsightEdit preset has both on)
                 echo "--qformer_explicit_weight=0 --qformer_teacher_forcing=0" ;;
    forced)      # ... and every such row's UNet condition teacher-forced to that target (an ablation)
                 [ "$RECIPE" = insightedit ] || [ "$RECIPE" = smartedit ] ||
                   { echo "error: forced needs RECIPE=insightedit or smartedit" >&2; exit 2; }
                 echo "--qformer_explicit_weight=1 --qformer_teacher_forcing=1" ;;  # = base for insightedit; 0.5 did not ground
    *) echo "error: unknown lever $1 — choose from base random-unet ema minsnr mask5 srchalf lr1e-3 fresh textenc xattn16 vae1 vae1-t2i batchN vpred explicit forced papers" >&2
       exit 2 ;;
  esac
}

VAL="$OUT/val-world/eval.jsonl"
[ -f "$OUT/val-world/meta.json" ] || python3 -m minedit.toy --out "$OUT/val-world" --n "$VAL_N" --seed 555
# Random-UNet bases: the shipped bases with sd/unet replaced by a freshly initialised one (with and without
# cross-attention at the 16×16 level; with a factor-1 VAE), so those levers change the UNet's start and nothing
# else. The factor-1 VAE (one block, no downsampling) is trained here like the shipped one, for VAE1_STEPS steps.
VAE1_STEPS=${VAE1_STEPS:-1500}
for x16 in "" "-x16" $([[ " $LEVERS " == *" vae1"* ]] && echo "-f1"); do
  [ -d "$RANDOM_SD$x16/sd/unet" ] && continue
  python3 - "$BASE" "$RANDOM_SD$x16" "$x16" "$VAE1_STEPS" <<'EOF'
import shutil, sys, torch
from minedit import build
from minedit.presets import preset
base, out, x16, vae1_steps = sys.argv[1:]
shutil.copytree(base, out, dirs_exist_ok=True)
cfg = preset("insightedit", "toy")
if x16 == "-x16":
    cfg.unet_cross_attn_blocks = (True, True, True)
torch.manual_seed(0)
shutil.rmtree(f"{out}/sd/unet")
build.build_unet(cfg).save_pretrained(f"{out}/sd/unet")
if x16 == "-f1":
    sys.path.insert(0, "scripts")
    import pretrain_toy_bases as ptb
    from minedit.toy.world import cached_world
    cfg.vae_channels = (32,)
    root = ptb.Path(cached_world(seed=0, n=6000, size=cfg.resolution))
    train, ev = ptb.read_jsonl(root / "captions.jsonl"), ptb.read_jsonl(root / "eval.jsonl")
    images = ptb.load_images(root, sorted({r["image"] for r in train}))
    vae, m = ptb.train_vae(cfg, images, ptb.load_images(root, [r["source"] for r in ev]), int(vae1_steps), 16,
                           2e-3, 16, torch.Generator().manual_seed(0))
    print("factor-1 vae:", m)
    shutil.rmtree(f"{out}/sd/vae")
    vae.save_pretrained(f"{out}/sd/vae")
EOF
done

# The toy "Stable Diffusion" at factor 1: the text-to-image pretraining of the shipped sd/unet, on the factor-1 VAE.
[[ " $LEVERS " != *" vae1-t2i "* ]] || [ -d "$T2I_F1/sd/unet" ] ||
  python3 scripts/pretrain_toy_unet.py --base "$RANDOM_SD-f1" --out "$T2I_F1"

BASES="--mllm_path=$BASE/mllm --sd_path=$BASE/sd --clip_path=$BASE/clip"
COMMON="--toy_samples=$TOY_SAMPLES --save_every=500 --sample_every=500 --log_every=50"
INIT=""
if [ "$RECIPE" = insightedit ] || [ "$RECIPE" = mindedit ]; then
  [ -f "$OUT/$RECIPE-s1/latest" ] ||
    python3 train.py --recipe "$RECIPE" --stage 1 --out "$OUT/$RECIPE-s1" --max-steps "$ALIGN" $BASES \
      --toy_samples="$TOY_SAMPLES" --log_every=50
  INIT="--init $OUT/$RECIPE-s1"
fi
for lever in $LEVERS; do
  run="$OUT/$RECIPE-$lever"
  flags=$(lever_flags "$lever")
  steps=$STEPS
  [[ $lever == batch* ]] && steps=$((STEPS * 32 / ${lever#batch}))  # every run draws STEPS × 32 samples
  if [ -f "$run/latest" ] && [ ! -f "$run/ckpt-$(printf %07d "$steps")/weights.safetensors" ]; then
    python3 train.py --out "$run" --resume                   # stopped earlier: continue it
  elif [ ! -f "$run/latest" ]; then
    python3 train.py --recipe "$RECIPE" --stage 2 --out "$run" ${INIT:-$BASES} $COMMON --max-steps "$steps" $flags
  fi
  [ -f "$OUT/results/$RECIPE-$lever.json" ] ||
    python3 evaluate.py --ckpt "$run" --data "$VAL" --out "$OUT/results/$RECIPE-$lever.json"
done
python3 scripts/results_table.py "$OUT"/results/"$RECIPE"-*.json
