#!/usr/bin/env bash
# DINOv2-style training on JUMP Cell Painting streamed by prefetchd. See --help and docs/training.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
DEFAULT_LOCAL_DIR="demo-data/cpg0000-jump-pilot/source_4/images"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [options] [key=value ...]

DINOv2-style self-supervised training (DINO + iBOT + KoLeo, ViT-S/8 by default) on JUMP Cell Painting
fields streamed from S3 by the prefetchd daemon. The run is named after the config file unless
--wandb-name is given: logs in checkpoints/<run>/logs/log.txt, checkpoints in checkpoints/<run>/ckpt/.

Options:
  --config FILE          training config (default: configs/dinov3_vits8_jump_s3_multiview.yaml)
  --no-s3 [DIR]          train from a local copy (aws s3 sync layout) as JUMPLocal:root=DIR
                         (default DIR: $DEFAULT_LOCAL_DIR, what \`prefetchd demo --data-dir demo-data\` keeps)
  --no-wandb             do not log to Weights & Biases
  --wandb-project P      wandb project (default: prefetchd-dino)
  --wandb-name N         run name: wandb run and checkpoints/<N> (default: the config's name, e.g.
                         dinov3_vits8_jump_s3_multiview); an existing run is never reused without --resume
  --nproc-per-node K     training processes on this node, through torchrun (default: 1); a resumed
                         run may use another count (the data position is a global sample count)
  --resume [RUN]         continue a run (name, directory or checkpoint; default: the run of --wandb-name
                         or --config, else the newest run)
  --socket PATH          prefetchd control socket (default: \$PREFETCHD_SOCKET or the per-user socket)
  -h, --help             this help
  key=value              config overrides, e.g. optim.epochs=10 train.batch_size_per_gpu=16 s3.cache_size=400

Data: if a daemon answers \`prefetchd status\` it is used; otherwise one is started for this run
(its decode workers = s3.num_workers) and stopped afterwards. The S3 endpoint follows the AWS
variables (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL) for MinIO, SeaweedFS or a mirror.
wandb: online when logged in, offline with a notice when not (\`wandb sync\` later), off with --no-wandb.

Examples:
  $(basename "$0") --no-wandb optim.epochs=1
  $(basename "$0") --no-s3 /data/jump --nproc-per-node 2 --wandb-name vits8-local
  $(basename "$0") --resume vits8-local
USAGE
}

die() { echo "error: $*" >&2; exit 2; }

CONFIG=""
LOCAL_DIR=""
WANDB_ARGS=()
NPROC=1
RESUME=()
RUN_NAME=()
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --config) [[ $# -ge 2 ]] || die "--config needs a file"; CONFIG="$2"; shift 2 ;;
    --no-s3)
      if [[ $# -ge 2 && "$2" != -* && "$2" != *=* ]]; then LOCAL_DIR="$2"; shift 2
      else LOCAL_DIR="$DEFAULT_LOCAL_DIR"; shift; fi ;;
    --no-wandb) WANDB_ARGS+=(--no-wandb); shift ;;
    --wandb-project) [[ $# -ge 2 ]] || die "--wandb-project needs a name"; WANDB_ARGS+=(--wandb-project "$2"); shift 2 ;;
    --wandb-name) [[ $# -ge 2 ]] || die "--wandb-name needs a name"; RUN_NAME=(--run-name "$2"); shift 2 ;;
    --nproc-per-node) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node needs a positive integer"
      NPROC="$2"; shift 2 ;;
    --resume)
      if [[ $# -ge 2 && "$2" != -* && "$2" != *=* ]]; then RESUME=(--resume "$2"); shift 2
      else RESUME=(--resume); shift; fi ;;
    --socket) [[ $# -ge 2 ]] || die "--socket needs a path"; export PREFETCHD_SOCKET="$2"; shift 2 ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# A resumed run continues with its own saved config unless --config is given.
if [[ -z "$CONFIG" && ${#RESUME[@]} -eq 0 ]]; then CONFIG="$REPO/configs/dinov3_vits8_jump_s3_multiview.yaml"; fi
CONFIG_ARGS=()
if [[ -n "$CONFIG" ]]; then
  [[ -r "$CONFIG" ]] || die "cannot read config file $CONFIG"
  CONFIG_ARGS=(--config "$CONFIG")
fi
if [[ -n "$LOCAL_DIR" ]]; then
  [[ -d "$LOCAL_DIR" ]] || die "--no-s3: $LOCAL_DIR is not a directory (run \`prefetchd demo --data-dir demo-data\` or \`aws s3 sync\` first)"
  if [[ -d "$LOCAL_DIR/cpg0000-jump-pilot/source_4/images" ]]; then LOCAL_DIR="$LOCAL_DIR/cpg0000-jump-pilot/source_4/images"; fi
  OVERRIDES+=("train.dataset_path=JUMPLocal:root=$(cd "$LOCAL_DIR" && pwd)")
fi

# Validate the config (and read the daemon's worker count) before starting anything.
DECODE_WORKERS="$("$PYTHON" -m trainer.config "${CONFIG_ARGS[@]}" --no-require --get s3.num_workers "${OVERRIDES[@]}")" || exit 2

DAEMON_PID=""
DAEMON_LOG=""
stop_daemon() {
  if [[ -n "$DAEMON_PID" ]]; then
    "$PYTHON" -m prefetchd stop >/dev/null 2>&1 || kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=""
  fi
}

start_daemon() {
  DAEMON_LOG="$(mktemp "${TMPDIR:-/tmp}/prefetchd-launch.XXXXXX.log")"
  "$PYTHON" -m prefetchd serve --set "decode.workers=$DECODE_WORKERS" >"$DAEMON_LOG" 2>&1 &
  DAEMON_PID=$!
  trap stop_daemon EXIT
  trap 'exit 130' INT TERM
  # Readiness is the socket answering; the loop ends early if the daemon exits.
  local deadline=$((SECONDS + 120))
  until "$PYTHON" -m prefetchd status >/dev/null 2>&1; do
    if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
      wait "$DAEMON_PID" 2>/dev/null || true
      DAEMON_PID=""
      die "no prefetchd daemon is running and starting one failed: $(grep -v '^\s*$' "$DAEMON_LOG" | tail -n 1) (full log: $DAEMON_LOG)"
    fi
    (( SECONDS < deadline )) || die "prefetchd did not start within 120 s (log: $DAEMON_LOG)"
    sleep 0.2
  done
  echo "prefetchd: no daemon was running; started one for this run (pid $DAEMON_PID, log $DAEMON_LOG)" >&2
}

if "$PYTHON" -m prefetchd status >/dev/null 2>&1; then
  echo "prefetchd: using the running daemon" >&2
else
  start_daemon
fi

TRAIN_ARGS=("${CONFIG_ARGS[@]}" "${RUN_NAME[@]}" "${RESUME[@]}" "${WANDB_ARGS[@]}" "${OVERRIDES[@]}")
if [[ "$NPROC" -gt 1 ]]; then
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m trainer.train "${TRAIN_ARGS[@]}"
else
  "$PYTHON" -m trainer.train "${TRAIN_ARGS[@]}"
fi
