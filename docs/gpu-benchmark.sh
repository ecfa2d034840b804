#!/usr/bin/env bash
# The README's GPU row: the full Table II protocol's teacher and Multi-Part KD student at the
# paper's settings (50 epochs each, batch 64, 112 px, logits stored every 5 epochs) on a generated
# 5000-tile stand-in (not tissue), eager and with --compile, on one CUDA GPU:
#
#     bash docs/gpu-benchmark.sh
#
# prints, per run, the wall time, epoch 1 apart (compilation in it is reported separately and is not
# in any img/s), the median img/s of epochs 2 and later, the peak GPU memory and the precision, with
# the GPU's name and the torch version, and writes them to gpu-benchmark/summary.json. The same
# lines run on the CPU for a trial at small settings (the tests do not run this script):
#
#     EPOCHS=2 PER_CLASS=20 DEVICE=cpu bash docs/gpu-benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
EPOCHS=${EPOCHS:-50}
PER_CLASS=${PER_CLASS:-625}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu-benchmark}
SAVE_EVERY=$(( EPOCHS >= 10 ? EPOCHS / 10 : 1 ))
mkdir -p "$OUT"
"$PY" -c "import mpkd; mpkd.make_standin('$OUT/standin', per_class=$PER_CLASS)"
: > "$OUT/wall.txt"
for mode in eager compile; do
  flags=(--data "$OUT/standin" --epochs "$EPOCHS" --device "$DEVICE")
  [ "$mode" = compile ] && flags+=(--compile)
  rm -f "$OUT/$mode".*  # a fresh run each time: no state to resume, no log to append to
  start=$(date +%s.%N)
  "$PY" train_teacher.py "${flags[@]}" --no-pretrained --save-every "$SAVE_EVERY" \
    --out "$OUT/$mode.teacher.pt" --logits-out "$OUT/$mode.teacher_logits.pt"
  middle=$(date +%s.%N)
  "$PY" distill.py "${flags[@]}" --multipart --teacher-logits "$OUT/$mode.teacher_logits.pt" \
    --out "$OUT/$mode.student.pt"
  end=$(date +%s.%N)
  echo "$mode teacher $start $middle" >> "$OUT/wall.txt"
  echo "$mode student $middle $end" >> "$OUT/wall.txt"
done
"$PY" - "$OUT" "$DEVICE" <<'EOF'
import json, statistics, sys
from pathlib import Path

import torch

out, device = Path(sys.argv[1]), sys.argv[2]
gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "no GPU (CPU trial)"
rows = []
for line in (out / "wall.txt").read_text().splitlines():
    mode, role, start, end = line.split()
    log = [json.loads(x) for x in (out / f"{mode}.{role}.log.jsonl").read_text().splitlines()]
    later = [r["images_per_s"] for r in log[1:]]
    rows.append({"run": f"{role}, {mode}", "wall_s": float(end) - float(start),
                 "epoch1_s": log[0]["seconds"], "compile_s": sum(r.get("compile_seconds", 0) for r in log),
                 "img_per_s_epoch1": log[0]["images_per_s"],
                 "img_per_s_later": statistics.median(later) if later else None,
                 "peak_memory_mb": max((r.get("peak_memory_mb", 0) for r in log), default=0) or None,
                 "precision": log[0]["precision"], "epochs": len(log)})
summary = {"gpu": gpu, "torch": torch.__version__, "runs": rows}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(f"\n{gpu}, torch {torch.__version__}")
print(f"{'run':<18}{'wall (s)':>10}{'epoch 1 (s)':>13}{'compiling (s)':>15}{'img/s, epochs 2+':>18}"
      f"{'peak memory (MB)':>18}{'precision':>11}")
for r in rows:
    later = f"{r['img_per_s_later']:.0f}" if r["img_per_s_later"] else "-"
    peak = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] else "-"
    print(f"{r['run']:<18}{r['wall_s']:>10.1f}{r['epoch1_s']:>13.1f}{r['compile_s']:>15.1f}{later:>18}"
          f"{peak:>18}{r['precision']:>11}")
for mode in ("eager", "compile"):
    total = sum(r["wall_s"] for r in rows if r["run"].endswith(mode))
    print(f"teacher + Multi-Part KD student, {mode}: {total:.1f} s ({total / 60:.1f} min)")
EOF
