#!/usr/bin/env bash
# Everything a lent GPU should tell us, in under 8 minutes of wall time, as one markdown report + raw JSON.
#
#   bash scripts/gpu_check.sh [--out DIR] [--cifar PATH]   # on the device (DIR defaults to $OUT, else ./gpu_check)
#   bash scripts/gpu_check.sh --cpu-dry-run --out DIR       # here: the same parts at tiny sizes on the CPU
#
# Parts, each stopped at its own time limit (seconds) so that a hang in one still returns the others:
#   env 10 | gpu_tests 100 | kernels_bench 110 | roofline 10 | aot_device 30 (registers / spills the driver
#   reports, beside kernels.aot's table) | train_resnet18 40 | train_mobilenet 40 | moco_batch_aug 80 (a 60 s
#   main_moco.py --batch-aug run on CIFAR-10, img/s per epoch) | swav_fsdp 50
# (470 s if every part hits its limit). Uses the device's own torch/triton (installs nothing). CIFAR-10 comes from
# --cifar: an ImageFolder tree or ../shared/data/cifar10.tar.gz copied into a carried, git-ignored folder
# (default .gpu_carry/cifar10.tar.gz). Writes DIR/report.md, DIR/results.json and DIR/logs.txt.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
OUTDIR=${OUT:-./gpu_check}
CIFAR=.gpu_carry/cifar10.tar.gz
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --out) OUTDIR=$2; shift ;;
    --cifar) CIFAR=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1' (use --cpu-dry-run, --out DIR, --cifar PATH)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUTDIR"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 SMALLSSL_CACHE="$WORK/cache" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# run_part NAME LIMIT CMD...: run with a time limit (TERM, then KILL 5 s later); log, exit code and seconds.
# LIMIT_SCALE multiplies every limit (the dry run defaults to 4: a shared CPU imports torch in ~10 s).
run_part() {
  local name=$1 limit=$(($2 * LIMIT_SCALE)); shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$WORK/progress"
  timeout -k 5 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - t0)) $limit" >"$WORK/$name.status"
  echo "   rc=$rc in $((SECONDS - t0))s" | tee -a "$WORK/progress"
}

if [ $DRY = 1 ]; then
  LIMIT_SCALE=${LIMIT_SCALE:-4}
  DEV=cpu; AMP=none; TESTS=tests/kernels
  BENCH=(--tiny --dtype fp32 --reps 1); R18=(-b 2 --steps 1 --warmup 0); MNV=(-b 2 --steps 1 --warmup 0)
  MOCO=(-b 8 --moco-k 64 -j 0 --epochs 2); SWAV=(-b 2 --size-crops 32 16 --nmb-crops 2 2 --steps 1 --warmup 0 -- --swav-prototypes 16)
  "$PY" - "$WORK/data" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for split in ("train", "val"):
    for c in range(2):
        os.makedirs(f"{sys.argv[1]}/{split}/c{c}", exist_ok=True)
        for j in range(16):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f"{sys.argv[1]}/{split}/c{c}/{j}.png")
EOF
  DATA=$WORK/data
else
  LIMIT_SCALE=${LIMIT_SCALE:-1}
  DEV=cuda; AMP=bf16; TESTS=tests
  BENCH=(--dtype fp32,bf16); R18=(-b 256 --steps 30 --warmup 5); MNV=(-b 128 --steps 20 --warmup 3)
  MOCO=(-b 512 --moco-k 4096 -j 8 --epochs 50); SWAV=(-b 64 --size-crops 160 96 --nmb-crops 2 4 --steps 5 --warmup 2 -- --amp bf16)
  if [ -d "$CIFAR" ]; then DATA=$CIFAR
  else mkdir -p "$WORK/cifar" && tar -xzf "$CIFAR" -C "$WORK/cifar" && DATA=$(dirname "$(find "$WORK/cifar" -maxdepth 3 -type d -name train | head -1)")
  fi
fi

run_part env 10 "$PY" -c "
import json, platform, subprocess, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
cuda = torch.cuda.is_available()
d = dict(python=platform.python_version(), torch=torch.__version__, triton=tv, cuda=cuda,
         device=torch.cuda.get_device_name() if cuda else 'cpu',
         capability=list(torch.cuda.get_device_capability()) if cuda else None,
         sms=torch.cuda.get_device_properties(0).multi_processor_count if cuda else None)
try:
    d['nvidia_smi'] = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.sm',
                                      '--format=csv,noheader'], capture_output=True, text=True, timeout=10).stdout.strip()
except (OSError, subprocess.SubprocessError) as e:
    d['nvidia_smi'] = f'unavailable: {e}'
print(json.dumps(d))"
run_part gpu_tests 100 "$PY" -m pytest -q -p no:cacheprovider -m gpu "$TESTS"
run_part kernels_bench 110 "$PY" -m kernels.bench "${BENCH[@]}" --json "$WORK/kernels_bench.json"
run_part roofline 10 "$PY" -m kernels.bench --roofline --json "$WORK/roofline.json"
run_part aot_device 30 "$PY" -m kernels.aot --on-device --json "$WORK/aot_device.json"
run_part train_resnet18 40 "$PY" -m experiments.bench_train -a resnet18 --image-size 32 --device $DEV --amp $AMP \
  --channels-last "${R18[@]}"
run_part train_mobilenet 40 "$PY" -m experiments.bench_train -a mobilenetv3_small --image-size 224 --device $DEV \
  --amp $AMP --channels-last "${MNV[@]}"
# main_moco.py has no wall-clock limit flag: SIGTERM after 60 s takes its preemption path; finished epochs are
# in log.jsonl (img_per_s per epoch).
run_part moco_batch_aug 80 timeout -s TERM $((60 * LIMIT_SCALE)) "$PY" main_moco.py "$DATA" -a resnet18 \
  --image-size 32 --batch-aug --aug-plus --mlp --cos --device $DEV --amp $AMP --channels-last --ckpt-dir "$WORK/moco" \
  --save-freq 1000 --no-progress "${MOCO[@]}"
cp "$WORK/moco/log.jsonl" "$WORK/moco_log.jsonl" 2>/dev/null
run_part swav_fsdp 50 "$PY" -m experiments.bench_swav -a regnety_400mf --modes fsdp --nproc 1 --device $DEV "${SWAV[@]}"

"$PY" - "$WORK" "$OUTDIR" "$DRY" <<'EOF'
import json, os, sys
work, out, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
parts = ["env", "gpu_tests", "kernels_bench", "roofline", "aot_device", "train_resnet18", "train_mobilenet",
         "moco_batch_aug", "swav_fsdp"]
ok_rc = {"moco_batch_aug": (0, 124)}  # 124: the 60 s stop came first, as intended
results, md, logs = {"dry_run": dry, "parts": {}}, [], []


def read(name):
    p = os.path.join(work, name)
    return open(p, errors="replace").read() if os.path.exists(p) else ""


for part in parts:
    status = read(f"{part}.status").split()
    rc, secs, limit = (int(x) for x in status) if len(status) == 3 else (-1, 0, 0)
    log = read(f"{part}.log")
    ok = rc in ok_rc.get(part, (0,))
    entry = {"rc": rc, "seconds": secs, "limit_s": limit, "ok": ok, "log_tail": log[-4000:]}
    for raw in ("kernels_bench.json", "roofline.json", "aot_device.json"):
        if part == raw[:-5] and read(raw):
            entry["rows"] = json.loads(read(raw))
    if part == "env" and log.strip():
        entry["info"] = json.loads(log.strip().splitlines()[-1])
    if part == "moco_batch_aug":
        lines = [json.loads(line) for line in read("moco_log.jsonl").splitlines() if line.startswith("{")]
        entry["epochs"] = [r for r in lines if "img_per_s" in r]
    results["parts"][part] = entry
    logs.append(f"===== {part} rc={rc} {secs}s\n{log}")
env = results["parts"]["env"].get("info", {})
md.append(f"# gpu_check {'(CPU dry run)' if dry else ''}\n\ndevice: {env.get('device')}; torch {env.get('torch')}; "
          f"triton {env.get('triton')}; {env.get('nvidia_smi', '')}\n")
md.append("| part | status | seconds | limit |\n|---|---|---|---|")
for part, e in results["parts"].items():
    md.append(f"| {part} | {'ok' if e['ok'] else 'FAILED rc=' + str(e['rc'])} | {e['seconds']} | {e['limit_s']} |")
for part, e in results["parts"].items():
    if part == "env":
        continue
    tables = [ln for ln in e["log_tail"].splitlines() if ln.startswith(("|", "#", "SwAV"))]
    body = "\n".join(tables) if tables else "```\n" + "\n".join(e["log_tail"].splitlines()[-15:]) + "\n```"
    if part == "moco_batch_aug":
        body = "\n".join(f"epoch {r.get('epoch')}: {r.get('img_per_s', float('nan')):.0f} img/s, loss "
                         f"{r.get('loss', float('nan')):.3f}" for r in e["epochs"]) or body
    md.append(f"\n## {part}\n\n{body}")
open(os.path.join(out, "report.md"), "w").write("\n".join(md) + "\n")
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1)
open(os.path.join(out, "logs.txt"), "w").write("\n".join(logs)[-8_000_000:])
print("\n".join(md[:12 + len(parts)]))
sys.exit(0 if all(e["ok"] for e in results["parts"].values()) else 1)
EOF
