#!/usr/bin/env bash
# Progress while training: in a real terminal (a pty made by script(1)) a bar for loading the
# weights and a step bar with ETA, loss and learning rate, redrawn in place and erased around
# the step lines; when standard error is not a terminal, no bar, one plain line per phase.
. tests/cli/lib.inc

{
    tiny_recipe | sed -e 's|^  config: {.*|  path: models/tiny-llama|' -e '/^           num_key_value_heads/d' \
        -e '/^           bos_token_id/d' -e 's|^  init: random|  init: pretrained|'
    printf '  max_steps: 6\n  log_interval: 2\n  save_dir: %s\n' "$TMP/out"
    printf 'flavor: {device: cpu, devices: 1, memory_gb: 1}\n'
} >"$TMP/a.yaml"

# In a terminal: standard output and error both go to the pty, script copies it to a file.
script -qfec "$MOAI_BIN --set training.save_dir=$TMP/out-tty $TMP/a.yaml" /dev/null </dev/null >"$TMP/tty.out"
expect_eq "terminal: status" 0 $?
python3 - "$TMP/tty.out" <<'PY' && ok || fail "terminal: the bars and the lines between them"
import re, sys
raw = open(sys.argv[1], "rb").read().decode()
# the step bar, redrawn in place: each drawing starts with \r and erases the rest of the line
bars = re.findall(r"\rTraining: +(\d+)%\|[^|]*\| (\d)/6 \[(\d\d:\d\d)<(\d\d:\d\d|\?), [0-9.]+ steps/s((?:, loss [0-9.]+, lr 1\.00e-03)?)\]\x1b\[K", raw)
assert [b[1] for b in bars][-1] == "6" and len(bars) >= 3, bars
assert bars[0][1] == "0" and bars[0][4] == "", bars  # drawn before the first step ends
assert all(b[4] for b in bars[1:]), bars  # then with the loss and learning rate
loads = re.findall(r"\rLoading weights: +(\d+)%\|[^|]*\| (\d+)/(\d+) \[", raw)
assert loads and loads[-1][1] == loads[-1][2] and loads[-1][0] == "100", loads
# with the bars' drawings and erasures removed, the step lines are whole lines
text = re.sub(r"\r(Training|Loading weights): [^\r\n]*?\x1b\[K", "", raw).replace("\r\x1b[K", "")
lines = [l.strip("\r") for l in text.split("\n")]
steps = [l for l in lines if l.startswith("[Step")]
assert [l.split("/")[0] for l in steps] == ["[Step 1", "[Step 2", "[Step 4", "[Step 6"], steps
assert all(re.fullmatch(r"\[Step \d/6\] \| Loss: [0-9.]+ \| Duration: [0-9.]+ \| Throughput: [0-9.]+ tokens/sec", l) for l in steps), steps
assert "Training Done" in lines and "Model saved in '%s'" % sys.argv[1].replace("tty.out", "out-tty") in lines, lines[-5:]
PY

# Not a terminal: no bar drawn, no carriage return; one plain log line per phase.
"$MOAI_BIN" --set "training.save_dir=$TMP/out-pipe" "$TMP/a.yaml" 2>"$TMP/pipe.err" | cat >"$TMP/pipe.out"
expect_eq "piped: no carriage return or erase" 0 "$(grep -c $'\r\|\x1b' "$TMP/pipe.err" "$TMP/pipe.out" | awk -F: '{s += $2} END {print s}')"
expect_eq "piped: one plain line for the steps" 1 "$(grep -cE '^\[[0-9 :.-]+\] \[info\] Training: 100%\|[^|]*\| 6/6 \[' "$TMP/pipe.err")"
expect_eq "piped: one plain line for the weights" 1 "$(grep -cE '^\[[0-9 :.-]+\] \[info\] Loading weights: 100%\|' "$TMP/pipe.err")"
expect_eq "piped: standard output is the documented lines only" "4 0" \
    "$(grep -c '^\[Step' "$TMP/pipe.out") $(grep -vcE '^\[Step|^Training Done$|^Saving Model\.\.\.$|^Model saved in ' "$TMP/pipe.out")"

# -q in a terminal: no bar (only warnings and errors on standard error).
script -qfec "$MOAI_BIN -q --set training.save_dir=$TMP/out-q $TMP/a.yaml" /dev/null </dev/null >"$TMP/q.out"
expect_eq "terminal -q: status" 0 $?
expect_eq "terminal -q: no bar" 0 "$(grep -ac 'Training:' "$TMP/q.out")"
finish
