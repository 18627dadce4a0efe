#!/usr/bin/env bash
# Every GPU figure of this project in a few commands, on a GPU machine without network whose
# Python has torch, torchvision, lightning, transformers and torchmetrics (a PyTorch image).
#
#   bash benchmarks/gpu_session.sh wheels            # where pip reaches a registry: what the image
#                                                    # lacks, as wheels in .whl/ (git-ignored), at
#                                                    # the versions of this project's .venv
#   bash benchmarks/gpu_session.sh STAGE [STAGE...]  # on the GPU machine, with .whl copied along
#
# Stages, in the order of a short lease (most wanted first), with the seconds each may take
# (stage_limit reads them here):
#   check       the GPU, library versions, every project module imports            (60)
#   tests       pytest -m gpu: the workflows end to end on CUDA                     (300)
#   throughput  benchmarks/gpu_throughput.py: plain diffusers vs ours, FLOP bound   (360)
#   smoke       make smoke: every stage at SD-1.5 shapes, time and peak memory      (420)
#   storage     benchmarks/cache_storage.py: features vs latents, bytes and speed   (240)
#   compile     the same with the UNet under torch.compile (inductor), fp16, batch 8 (300)
#   dit         benchmarks/dit_synthesis.py: tiny DiTs at 1024 px vs diffusers, + joint attention, + ConceptAttention (300)
#   memory      benchmarks/memory_check.py: the memory planner vs max_memory_allocated   (180)
# Without CUDA, throughput and compile check the script on the tiny model instead.
#
# BUDGET=SECONDS bounds the whole run: a stage gets at most what is left of it (less 20 s for
# the table), is stopped when that runs out, and is skipped when under 30 s are left, so the
# table always prints inside the budget. A failing check stops the run (nothing else can work);
# any other failing stage does not stop the next. Logs go to $OUT if set, else
# outputs/gpu_session/; a table of the stages, their exit codes and times is printed last.
# PYTHON is the interpreter (default python3), WHEELS_DIR the wheels' folder (default .whl).
# W&B is not among the wheels: other CLI runs there need --trainer.logger false.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SELF=$REPO/benchmarks/$(basename "$0")
PY=${PYTHON:-python3}
WHL=${WHEELS_DIR:-.whl}
LOGS=${OUT:-$REPO/outputs/gpu_session}
STAGES="check tests throughput smoke storage compile dit memory"
BUDGET=${BUDGET:-}
# Seconds kept for the table, and the least a stage is started with (tests set them smaller).
TABLE_SECONDS=${TABLE_SECONDS:-20}
MIN_STAGE_SECONDS=${MIN_STAGE_SECONDS:-30}
# The image lacks these (and the project needs them), or they are what those need.
# tests/test_gpu_session.py checks that, with benchmarks/gpu_image_packages.txt, they hold every
# requirement of the project and of each other.
WHEELS=(diffusers importlib_metadata lazy_importer jsonargparse docstring_parser typeshed_client omegaconf
        open_clip_torch ftfy wcwidth pycocotools)

download_wheels() {
    local venv=$REPO/.venv/bin/python pins
    [ -x "$venv" ] || { echo "error: no .venv; run 'make install' first (the wheels take its versions)"; exit 2; }
    pins=$("$venv" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))' "${WHEELS[@]}") || exit 2
    rm -rf .whl && mkdir .whl
    # The image's Python: CPython 3.12 on x86-64 Linux.
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $pins 2> >(grep -v 'is ignored' >&2) || exit 2
    echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1), in .whl/"
}

# The wheels go to /tmp/site; with none, the machine must have the libraries already.
use_wheels() {
    if ls "$WHL"/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 2
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    elif ! "$PY" -c "import diffusers, jsonargparse, omegaconf, open_clip, pycocotools" 2>/dev/null; then
        echo "error: $PY lacks the project's libraries and $WHL/ holds no wheels; run 'bash $0 wheels' where pip reaches a registry, and bring .whl along"
        exit 2
    fi
}

stage_command() {
    local cuda=$1 stage=$2 check_script="--tiny --steps 4 --batches 1 2"
    case $stage in
        check) echo "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; $PY benchmarks/environment.py" ;;
        tests) echo "$PY -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu.py" ;;
        smoke) echo "$PY benchmarks/sd15_smoke.py --dir outputs/gpu_session/smoke" ;;
        # The paper's batch: 8 over 2 GPUs (experiments/pascal_split1.yaml), 4 per GPU.
        storage) echo "$PY benchmarks/cache_storage.py --dir outputs/gpu_session/storage$([ "$cuda" = 1 ] && echo ' --batch 4')" ;;
        throughput) [ "$cuda" = 1 ] && echo "$PY benchmarks/gpu_throughput.py" || echo "$PY benchmarks/gpu_throughput.py $check_script" ;;
        compile) [ "$cuda" = 1 ] && echo "$PY benchmarks/gpu_throughput.py --compile inductor --dtypes float16 --batches 8" \
                     || echo "$PY benchmarks/gpu_throughput.py $check_script --compile aot_eager" ;;
        # No SD3 / FLUX weights offline: the tiny transformers at 1024 px (a 64x64 token grid, as
        # the real models' attention sizes), bfloat16, batch 4.
        dit) local options="--dtype bfloat16 --batch 4 --image-size 1024"
             [ "$cuda" = 1 ] || options="--batch 2 --steps 4 --repeats 1"
             for model in tiny-sd3 tiny-flux tiny-flux2; do
                 printf '%s' "$PY benchmarks/dit_synthesis.py --model-id embedded/$model $options && "
             done
             echo true ;;
        memory) echo "$PY benchmarks/memory_check.py --batch 4" ;;
        *) return 1 ;;
    esac
}

# The most seconds a stage may take: the number in brackets in the header above, the one place
# it is written (an estimate on one H200, with room to spare).
stage_limit() {
    sed -n "s/^#   $1 .*(\([0-9][0-9]*\))\$/\1/p" "$SELF"
}

[ $# -gt 0 ] || { sed -n '2,/^[^#]/{/^#/p}' "$SELF"; exit 2; }
if [ "$1" = wheels ]; then download_wheels; exit; fi
for stage in "$@"; do
    stage_command 0 "$stage" >/dev/null || { echo "error: unknown stage '$stage' (stages: $STAGES; or 'wheels' alone)"; exit 2; }
done
for stage in $STAGES; do
    [ -n "$(stage_limit "$stage")" ] || { echo "error: the header of $SELF gives no limit '(SECONDS)' for the stage '$stage'"; exit 2; }
done
[[ -z $BUDGET || $BUDGET =~ ^[0-9]+$ ]] || { echo "error: BUDGET must be a number of seconds, not '$BUDGET'"; exit 2; }
use_wheels
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))") || exit 2
mkdir -p "$LOGS"

summary=()
ran=()
for stage in "$@"; do
    limit=$(stage_limit "$stage")
    if [ -n "$BUDGET" ]; then
        left=$((BUDGET - SECONDS - TABLE_SECONDS))
        if [ "$left" -lt "$MIN_STAGE_SECONDS" ]; then summary+=("| $stage | skipped: under $MIN_STAGE_SECONDS s of BUDGET left | 0 |"); continue; fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    command=$(stage_command "$cuda" "$stage")
    echo "=== $stage (at most $limit s): $command"
    start=$SECONDS
    timeout --kill-after=10 "$limit" bash -c "$command" 2>&1 | tee "$LOGS/$stage.log"
    code=${PIPESTATUS[0]}
    [ "$code" = 124 ] || [ "$code" = 137 ] && code="$code: stopped after $limit s"
    summary+=("| $stage | $code | $((SECONDS - start)) |")
    ran+=("$stage")
    if [ "$stage" = check ] && [ "$code" != 0 ]; then
        echo "error: check failed, so no other stage can work; its output: $LOGS/check.log"
        break
    fi
done

# Each script prints its table last: those tails, then one line per stage.
for stage in "${ran[@]}"; do
    echo; echo "--- $stage ($LOGS/$stage.log)"; tail -n 12 "$LOGS/$stage.log"
done
echo; echo "| stage | exit code | seconds |"; echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
