#!/usr/bin/env bash
# Open MPI: the same recipe under `mpirun` with 2 and 4 ranks gives the thread run's losses
# bit for bit and the same checkpoint (LoRA's adapters too); a device count that the ranks
# cannot share is an error.
. tests/cli/lib.inc

# As root Open MPI wants these; the leak checker of a sanitized binary gets Open MPI's own
# allocations suppressed (their libraries only).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export LSAN_OPTIONS="suppressions=$PWD/tests/lsan-mpi.supp:fast_unwind_on_malloc=0:print_suppressions=0"
mpi() { mpirun --oversubscribe -n "$@"; }

{
    tiny_recipe
    cat <<YAML
  max_steps: 5
  log_interval: 1
flavor: {device: cpu, devices: 4, memory_gb: 1}
parallel: {dp: 1, pp: 2, tp: 2, num_micro_batches: 2, distribute_param: true}
YAML
} >"$TMP/r.yaml"
losses() { sed -n 's/^\[Step \([0-9]*\)\/5\] | Loss: \([^ ]*\) .*/\1 \2/p' "$1"; }

"$MOAI_BIN" -q --set "training.save_dir=$TMP/threads" "$TMP/r.yaml" >"$TMP/t.out" 2>"$TMP/t.err"
expect_eq "threads: status" 0 $?
for n in 2 4; do
    mpi $n "$MOAI_BIN" -q --set "training.save_dir=$TMP/mpi$n" "$TMP/r.yaml" >"$TMP/m$n.out" 2>"$TMP/m$n.err"
    expect_eq "mpirun -n $n: status" 0 $?
    expect_eq "mpirun -n $n: the thread run's losses" "$(losses "$TMP/t.out")" "$(losses "$TMP/m$n.out")"
    expect_eq "mpirun -n $n: one set of step lines" 5 "$(grep -c '^\[Step' "$TMP/m$n.out")"
    cmp -s "$TMP/threads/model.safetensors" "$TMP/mpi$n/model.safetensors" && ok ||
        fail "mpirun -n $n: the checkpoint differs from the thread run's"
done

# Stopped after 3 steps and resumed under mpirun: steps 4 and 5 are the thread run's.
mpi 2 "$MOAI_BIN" -q --set "training.save_dir=$TMP/mpi-r" --set training.max_steps=3 \
    --set training.warmup_steps=0 "$TMP/r.yaml" >/dev/null 2>&1
expect_eq "mpirun, 3 steps: status" 0 $?
mpi 2 "$MOAI_BIN" -q --set "training.save_dir=$TMP/mpi-r" --set training.warmup_steps=0 \
    "$TMP/r.yaml" >"$TMP/mr.out" 2>"$TMP/mr.err"
expect_eq "mpirun, resumed: status" 0 $?
"$MOAI_BIN" -q --set "training.save_dir=$TMP/threads-r" --set training.warmup_steps=0 "$TMP/r.yaml" \
    >"$TMP/tr.out" 2>/dev/null
expect_eq "mpirun, resumed: steps 4 and 5 as the thread run's" \
    "$(losses "$TMP/tr.out" | grep -E '^[45] ')" "$(losses "$TMP/mr.out")"

mpi 3 "$MOAI_BIN" -q --set "training.save_dir=$TMP/mpi3" "$TMP/r.yaml" >/dev/null 2>"$TMP/m3.err"
expect_eq "mpirun -n 3: status" 2 $?
grep -q "4 devices cannot be shared out over 3 MPI ranks" "$TMP/m3.err" && ok ||
    fail "mpirun -n 3: message: $(head -c 300 "$TMP/m3.err")"
# Devices too small for the pinned plan: rank 0 prints the OUT_OF_MEMORY report, exit 3.
mpi 2 "$MOAI_BIN" -q --set "training.save_dir=$TMP/mpi-oom" \
    --set 'flavor={device: cpu, devices: 4, memory_gb: 0.001}' "$TMP/r.yaml" >/dev/null 2>"$TMP/oom.err"
expect_eq "mpirun, too small: status" 3 $?
expect_eq "mpirun, too small: one report" 1 "$(grep -c '^moai-finetune: error: Error Code 4: OUT_OF_MEMORY$' "$TMP/oom.err")"
[ ! -e "$TMP/mpi-oom" ] && ok || fail "mpirun, too small: no output directory"
# SIGTERM to rank 1 alone stops both ranks, saved; each says so in one line.
timeout 300 mpirun --oversubscribe -n 2 "$MOAI_BIN" -q --set "training.save_dir=$TMP/mpi-sig" \
    --set training.max_steps=100000 \
    "$TMP/r.yaml" >"$TMP/sig.out" 2>"$TMP/sig.err" &
mp=$!
for _ in $(seq 300); do grep -q '^\[Step' "$TMP/sig.out" 2>/dev/null && break; sleep 0.1; done
rank1=
for p in $(pgrep -f "save_dir=$TMP/mpi-sig"); do
    grep -qz '^OMPI_COMM_WORLD_RANK=1$' "/proc/$p/environ" 2>/dev/null && rank1=$p
done
if [ -n "$rank1" ]; then kill -TERM "$rank1"; else fail "rank 1 not found"; kill -TERM $mp; fi
wait $mp
expect_eq "mpirun, SIGTERM to rank 1: status" 130 $?
step=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$TMP/mpi-sig/trainer_state.json" 2>/dev/null)
expect_eq "mpirun, SIGTERM to rank 1: messages" "moai-finetune: error: interrupted by a signal to another MPI rank: checkpoint saved in '$TMP/mpi-sig' after step $step
moai-finetune: rank 1: error: interrupted by SIGTERM: checkpoint saved in '$TMP/mpi-sig' after step $step" "$(grep '^moai-finetune' "$TMP/sig.err" | sort)"

# LoRA (dropout on): 2 ranks train the adapters to the thread run's losses and adapter file.
lora='lora={rank: 4, alpha: 8, dropout: 0.1}'
"$MOAI_BIN" -q --set "$lora" --set "training.save_dir=$TMP/lora-t" "$TMP/r.yaml" \
    >"$TMP/lt.out" 2>/dev/null
expect_eq "lora threads: status" 0 $?
mpi 2 "$MOAI_BIN" -q --set "$lora" --set "training.save_dir=$TMP/lora-m" "$TMP/r.yaml" \
    >"$TMP/lm.out" 2>/dev/null
expect_eq "lora mpirun -n 2: status" 0 $?
expect_eq "lora threads: 5 steps" 5 "$(losses "$TMP/lt.out" | wc -l)"
expect_eq "lora mpirun -n 2: the thread run's losses" "$(losses "$TMP/lt.out")" "$(losses "$TMP/lm.out")"
cmp -s "$TMP/lora-t/adapter_model.safetensors" "$TMP/lora-m/adapter_model.safetensors" && ok ||
    fail "lora mpirun -n 2: the adapter differs from the thread run's"
finish
