#!/usr/bin/env bash
# The small-scale grid behind RESULTS.md: dense; TT at three ranks; DPQ-SX and DPQ-VQ at
# two settings each (sentiment: also TT r=12, DPQ-VQ with commitment 0.25 and more seeds
# of dense and of the >= 100x settings); one CPU thread per run. A run counts as done only
# when its folder has results.json (written at the end of a run): such runs are skipped
# (delete results.json or the folder to run one again). A run without it (never started, or
# crashed: log.txt but no results.json) is started again; the tasks with long training
# loops (lstm_lm, transfo_xl_lm, nmt, bert_mlm) get --resume and continue from the train_state.pt of the
# crashed run. A run being trained by another invocation (it holds the folder's .lock,
# flock) is skipped. A crashed run's log is kept as log.txt.1, log.txt.2, ...
#   recipes/grid_small.sh sentiment|ctr|lstm_lm|transfo_xl_lm|nmt|nmt_fairseq|bert_mlm [RUNS_DIR]     (JOBS=2 runs two at a time)
# then: python -m recipes.report RUNS_DIR --out RESULTS.md --plots recipes/plots
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:?usage: recipes/grid_small.sh sentiment|ctr|lstm_lm|transfo_xl_lm|nmt|nmt_fairseq|bert_mlm [RUNS_DIR]}
runs=${2:-runs/small}
PYTHON=${PYTHON:-.venv/bin/python}
case "$task" in
  sentiment)
    grid=("dense:--method dense"
          "dense-s1:--method dense --seed 1"
          "tt-r8:--method tt --rank 8"
          "tt-r16:--method tt --rank 16"
          "tt-r32:--method tt --rank 32"
          "tt-r12:--method tt --rank 12"
          "dpq-sx-k32-d8:--method dpq --variant sx --num-codes 32 --num-groups 8"
          "dpq-sx-k32-d32:--method dpq --variant sx --num-codes 32 --num-groups 32"
          "dpq-vq-k32-d8:--method dpq --variant vq --num-codes 32 --num-groups 8"
          "dpq-vq-k32-d32:--method dpq --variant vq --num-codes 32 --num-groups 32"
          "dpq-vq-k32-d8-beta0.25:--method dpq --variant vq --num-codes 32 --num-groups 8 --commitment 0.25"
          "dense-s2:--method dense --seed 2"
          "tt-r12-s1:--method tt --rank 12 --seed 1"
          "dpq-sx-k32-d8-s1:--method dpq --variant sx --num-codes 32 --num-groups 8 --seed 1") ;;
  ctr)
    grid=("dense:--method dense"
          "dense-s1:--method dense --seed 1"
          "dense-s2:--method dense --seed 2"
          "tt-r4:--method tt --rank 4"
          "tt-r8:--method tt --rank 8"
          "tt-r16:--method tt --rank 16"
          "dpq-sx-k64-d8:--method dpq --variant sx --num-codes 64 --num-groups 8"
          "dpq-sx-k16-d4:--method dpq --variant sx --num-codes 16 --num-groups 4"
          "dpq-vq-k64-d8:--method dpq --variant vq --num-codes 64 --num-groups 8"
          "dpq-vq-k16-d4:--method dpq --variant vq --num-codes 16 --num-groups 4") ;;
  lstm_lm)
    # one epoch of PTB (about 1,330 steps): the full small scale (6 epochs) takes ~40 min a run here
    grid=("dense:--method dense --epochs 1"
          "tt-r8:--method tt --rank 8 --epochs 1"
          "tt-r16:--method tt --rank 16 --epochs 1"
          "tt-r32:--method tt --rank 32 --epochs 1"
          "dpq-sx-k32-d20:--method dpq --variant sx --num-codes 32 --num-groups 20 --epochs 1"
          "dpq-sx-k64-d100:--method dpq --variant sx --num-codes 64 --num-groups 100 --epochs 1"
          "dpq-vq-k32-d20:--method dpq --variant vq --num-codes 32 --num-groups 20 --epochs 1"
          "dpq-vq-k64-d100:--method dpq --variant vq --num-codes 64 --num-groups 100 --epochs 1"
          "dense-untied:--method dense --output untied --epochs 1"
          "tt-r32-untied:--method tt --rank 32 --output untied --epochs 1"
          "dpq-sx-k64-d100-untied:--method dpq --variant sx --num-codes 64 --num-groups 100 --output untied --epochs 1"
          "dense-dense-softmax:--method dense --output dense --epochs 1"
          "tt-r32-dense-softmax:--method tt --rank 32 --output dense --epochs 1"
          "dpq-sx-k32-d20-dense-softmax:--method dpq --variant sx --num-codes 32 --num-groups 20 --output dense --epochs 1"
          "dpq-sx-k64-d100-dense-softmax:--method dpq --variant sx --num-codes 64 --num-groups 100 --output dense --epochs 1"
          "dpq-vq-k64-d100-dense-softmax:--method dpq --variant vq --num-codes 64 --num-groups 100 --output dense --epochs 1"
          "dpq-vq-k64-d50:--method dpq --variant vq --num-codes 64 --num-groups 50 --epochs 1"
          "dpq-vq-k128-d50:--method dpq --variant vq --num-codes 128 --num-groups 50 --epochs 1"
          "dpq-vq-k32-d100:--method dpq --variant vq --num-codes 32 --num-groups 100 --epochs 1"
          "dense-s1:--method dense --epochs 1 --seed 1"
          "dpq-vq-k32-d100-s1:--method dpq --variant vq --num-codes 32 --num-groups 100 --epochs 1 --seed 1") ;;
  transfo_xl_lm)
    # 250 steps of 16 x 35 PTB tokens (~15% of an epoch) a run; the "-1000" runs take 1,000
    # steps (a table of their own in RESULTS.md)
    grid=("dense:--method dense"
          "tt-r8:--method tt --rank 8"
          "tt-r16:--method tt --rank 16"
          "tt-r32:--method tt --rank 32"
          "dpq-sx-k32-d32:--method dpq --variant sx --num-codes 32 --num-groups 32"
          "dpq-sx-k32-d128:--method dpq --variant sx --num-codes 32 --num-groups 128"
          "dpq-vq-k32-d32:--method dpq --variant vq --num-codes 32 --num-groups 32"
          "dpq-vq-k32-d128:--method dpq --variant vq --num-codes 32 --num-groups 128"
          "dense-untied:--method dense --output untied"
          "tt-r32-untied:--method tt --rank 32 --output untied"
          "dpq-sx-k32-d128-untied:--method dpq --variant sx --num-codes 32 --num-groups 128 --output untied"
          "tt-r32-dense-softmax:--method tt --rank 32 --output dense"
          "dpq-sx-k32-d128-dense-softmax:--method dpq --variant sx --num-codes 32 --num-groups 128 --output dense"
          "dense-untied-s1:--method dense --output untied --seed 1"
          "dpq-sx-k32-d128-dense-softmax-s1:--method dpq --variant sx --num-codes 32 --num-groups 128 --output dense --seed 1"
          "dpq-vq-k32-d128-dense-softmax:--method dpq --variant vq --num-codes 32 --num-groups 128 --output dense"
          "dpq-vq-k32-d128-untied:--method dpq --variant vq --num-codes 32 --num-groups 128 --output untied"
          "dpq-vq-k8-d256-dense-softmax:--method dpq --variant vq --num-codes 8 --num-groups 256 --output dense"
          "dpq-sx-k8-d256-dense-softmax:--method dpq --variant sx --num-codes 8 --num-groups 256 --output dense"
          "dense-untied-1000:--method dense --output untied --max-steps 1000"
          "tt-r32-dense-softmax-1000:--method tt --rank 32 --output dense --max-steps 1000"
          "dpq-sx-k32-d128-dense-softmax-1000:--method dpq --variant sx --num-codes 32 --num-groups 128 --output dense --max-steps 1000"
          "dpq-vq-k32-d128-dense-softmax-1000:--method dpq --variant vq --num-codes 32 --num-groups 128 --output dense --max-steps 1000") ;;
  nmt)
    # 600 steps of 32 verse pairs (d 128, 2+2 layers); the "-3000" runs take 3,000 steps (a
    # table of their own in RESULTS.md); the fairseq route: recipes.nmt_fairseq
    grid=("dense:--method dense"
          "tt-r8:--method tt --rank 8"
          "tt-r16:--method tt --rank 16"
          "tt-r32:--method tt --rank 32"
          "dpq-sx-k64-d32:--method dpq --variant sx --num-codes 64 --num-groups 32"
          "dpq-sx-k32-d16:--method dpq --variant sx --num-codes 32 --num-groups 16"
          "dpq-vq-k64-d32:--method dpq --variant vq --num-codes 64 --num-groups 32"
          "dpq-vq-k32-d16:--method dpq --variant vq --num-codes 32 --num-groups 16"
          "dense-untied:--method dense --output untied"
          "tt-r16-untied:--method tt --rank 16 --output untied"
          "dpq-sx-k32-d16-untied:--method dpq --variant sx --num-codes 32 --num-groups 16 --output untied"
          "dense-3000:--method dense --max-steps 3000"
          "tt-r16-3000:--method tt --rank 16 --max-steps 3000"
          "dpq-vq-k64-d32-3000:--method dpq --variant vq --num-codes 64 --num-groups 32 --max-steps 3000"
          "dpq-sx-k64-d32-3000:--method dpq --variant sx --num-codes 64 --num-groups 32 --max-steps 3000") ;;
  nmt_fairseq)
    grid=("dense:--method dense" "tt-r16:--method tt --rank 16") ;;
  bert_mlm)
    # 1,200 steps of 32 x 64 tokens; then recipes.bert_sentiment --pretrained on the runs
    grid=("dense:--method dense"
          "tt-r8:--method tt --rank 8"
          "tt-r16:--method tt --rank 16"
          "tt-r32:--method tt --rank 32"
          "dpq-sx-k32-d16:--method dpq --variant sx --num-codes 32 --num-groups 16"
          "dpq-sx-k32-d32:--method dpq --variant sx --num-codes 32 --num-groups 32"
          "dpq-vq-k32-d16:--method dpq --variant vq --num-codes 32 --num-groups 16"
          "dpq-vq-k32-d32:--method dpq --variant vq --num-codes 32 --num-groups 32"
          "dense-untied:--method dense --output untied"
          "tt-r32-dense-softmax:--method tt --rank 32 --output dense"
          "dpq-sx-k32-d32-dense-softmax:--method dpq --variant sx --num-codes 32 --num-groups 32 --output dense"
          "tt-r32-untied:--method tt --rank 32 --output untied"
          "dpq-sx-k32-d32-untied:--method dpq --variant sx --num-codes 32 --num-groups 32 --output untied"
          "dense-s1:--method dense --seed 1"
          "tt-r32-s1:--method tt --rank 32 --seed 1"
          "dpq-sx-k32-d16-s1:--method dpq --variant sx --num-codes 32 --num-groups 16 --seed 1") ;;
  *) echo "unknown task $task (sentiment, ctr, lstm_lm, transfo_xl_lm, nmt, nmt_fairseq or bert_mlm)" >&2; exit 2 ;;
esac
case "$task" in
  lstm_lm|transfo_xl_lm|nmt|bert_mlm) resume=--resume ;;
  *) resume= ;;
esac
for entry in "${grid[@]}"; do
  name=${entry%%:*}
  out="$runs/$task/$name"
  if [ -f "$out/results.json" ]; then
    echo "skip $out (done: has results.json)" >&2
    continue
  fi
  mkdir -p "$out"
  echo "recipes/grid_run.sh $out $PYTHON -m recipes.$task --scale small --threads 1 --no-progress ${entry#*:} $resume --out $out"
done | xargs -P "${JOBS:-1}" -I{} sh -c "{}"
