#!/usr/bin/env bash
# Builds each libFuzzer harness with clang (ASan+UBSan) under build/fuzz/.
# Run one with: build/fuzz/fuzz_NAME -max_total_time=120 tests/fuzz/corpus/NAME
set -euo pipefail
mkdir -p build/fuzz/obj
flags=(-g -O1 -std=c11 -D_GNU_SOURCE -Ilib $(pkg-config --cflags yaml-0.1 jansson openblas libzstd libpcre2-8 ompi-c)
       -fsanitize=fuzzer-no-link,address,undefined)
libs=($(pkg-config --libs yaml-0.1 jansson openblas libzstd sentencepiece libpcre2-8 ompi-c) -lstdc++ -lm -pthread)
objs=()
for src in lib/*.c lib/*/*.c; do
    o=build/fuzz/obj/$(echo "$src" | tr / _).o
    clang "${flags[@]}" -c "$src" -o "$o"
    objs+=("$o")
done
for src in lib/*/*.cc; do
    [ -e "$src" ] || continue
    o=build/fuzz/obj/$(echo "$src" | tr / _).o
    clang++ -g -O1 -std=c++17 -Ilib -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize=vptr -c "$src" -o "$o"
    objs+=("$o")
done
for h in "$@"; do
    name=$(basename "$h" .c)
    clang "${flags[@]}" -fsanitize=fuzzer "$h" "${objs[@]}" "${libs[@]}" -o "build/fuzz/$name"
    echo "built build/fuzz/$name"
done
