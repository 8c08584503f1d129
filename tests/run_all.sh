#!/usr/bin/env bash
# Runs each test program given, echoes its output, and ends with the total
# "N passed, N failed" line; exits non-zero if any program failed.
set -u
passed=0; failed=0; status=0
for prog in "$@"; do
    out=$($prog 2>&1); rc=$?  # unquoted: a program may come with its runner (qemu)
    printf '%s\n' "$out"
    line=$(printf '%s\n' "$out" | grep -E '[0-9]+ passed, [0-9]+ failed' | tail -n 1)
    if [ -z "$line" ]; then echo "$prog: no result line (exit $rc)"; failed=$((failed + 1)); status=1; continue; fi
    p=$(printf '%s' "$line" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+')
    f=$(printf '%s' "$line" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+')
    passed=$((passed + p)); failed=$((failed + f))
    if [ "$rc" -ne 0 ]; then status=1; [ "$f" -eq 0 ] && failed=$((failed + 1)); fi
done
echo "$passed passed, $failed failed"
exit $status
