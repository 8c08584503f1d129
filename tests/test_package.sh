#!/usr/bin/env bash
# Packaging: kvq as a consumer project would take it. `make install PREFIX=...` and
# `cmake --install` each into a fresh prefix, then a small program built through
# pkg-config, through find_package(kvq) after each install, and through
# add_subdirectory on the source tree; each must build and run. Ends with the
# "N passed, N failed" line run_all.sh reads.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-build/package}
rm -rf "$work" && mkdir -p "$work" && work=$(cd "$work" && pwd)
passed=0; failed=0
step() { # name, command...
    local name=$1; shift
    if "$@" >"$work/$name.log" 2>&1; then passed=$((passed + 1)); echo "ok: $name"
    else failed=$((failed + 1)); echo "FAIL: $name (log: $work/$name.log)"; tail -n 20 "$work/$name.log"; fi
}

mkdir -p "$work/app"
cat >"$work/app/main.c" <<'C'
#define KVQ_IMPLEMENTATION
#include "kvq.h"
#include <stdio.h>
#include <string.h>
int main(void) {
    kvq_config cfg = kvq_default_config(64, 2, 300);
    kvq_cache *c = NULL;
    float k[2 * 64], v[2 * 64], q[4 * 64], o[4 * 64];
    kvq_attn_params ap = {4, 1, 0.0f};
    int i, t;
    for (i = 0; i < 2 * 64; i++) { k[i] = (float)(i % 7) - 3.0f; v[i] = (float)(i % 5) * 0.5f; }
    for (i = 0; i < 4 * 64; i++) q[i] = (float)(i % 3) * 0.1f;
    if (kvq_cache_create(&c, &cfg) != KVQ_OK) return 1;
    for (t = 0; t < 200; t++)
        if (kvq_cache_append(c, k, v, 1) != KVQ_OK) return 2;
    if (kvq_attention(c, q, o, &ap) != KVQ_OK) return 3;
    kvq_cache_destroy(c);
    if (strcmp(KVQ_VERSION_STRING, "0.0.0") <= 0 || kvq_version_number() != KVQ_VERSION_NUMBER) return 4;
    printf("kvq %s: %d tokens, out[0] %.4f\n", KVQ_VERSION_STRING, 200, (double)o[0]);
    return 0;
}
C
cat >"$work/app/CMakeLists.txt" <<'CM'
cmake_minimum_required(VERSION 3.13)
project(kvq_consumer C)
if(KVQ_SOURCE)
  add_subdirectory(${KVQ_SOURCE} kvq)
else()
  find_package(kvq @KVQ_MAJOR_MINOR@ REQUIRED)
endif()
add_executable(app main.c)
target_link_libraries(app PRIVATE kvq::kvq)
CM
# the version asked for is this kvq.h's MAJOR.MINOR
mm=$(sed -n 's/^#define KVQ_VERSION_STRING "\([0-9]*\.[0-9]*\)\..*/\1/p' "$here/kvq.h")
sed "s/@KVQ_MAJOR_MINOR@/$mm/" "$work/app/CMakeLists.txt" > "$work/app/CMakeLists.v" && mv "$work/app/CMakeLists.v" "$work/app/CMakeLists.txt"

# 1. make install, then pkg-config and find_package against it
step make-install make -C "$here" -s install PREFIX="$work/prefix-make"
step pkg-config-build sh -c "PKG_CONFIG_PATH='$work/prefix-make/share/pkgconfig' && export PKG_CONFIG_PATH &&
    cc -std=c99 -O1 \$(pkg-config --cflags kvq) '$work/app/main.c' -o '$work/app-pc' \$(pkg-config --libs kvq) &&
    '$work/app-pc' && test \"\$(pkg-config --modversion kvq)\" = \"\$(sed -n 's/^#define KVQ_VERSION_STRING \"\\(.*\\)\".*/\\1/p' '$here/kvq.h')\""
step find-package-make sh -c "cmake -S '$work/app' -B '$work/b1' -DCMAKE_PREFIX_PATH='$work/prefix-make' &&
    cmake --build '$work/b1' && '$work/b1/app'"
# 2. cmake --install, then find_package against it; a version kvq is not must be refused
step cmake-install sh -c "cmake -S '$here' -B '$work/kvq-build' -DCMAKE_INSTALL_PREFIX='$work/prefix-cmake' &&
    cmake --install '$work/kvq-build'"
step find-package-cmake sh -c "cmake -S '$work/app' -B '$work/b2' -DCMAKE_PREFIX_PATH='$work/prefix-cmake' &&
    cmake --build '$work/b2' && '$work/b2/app'"
step find-package-refuses-9 sh -c "sed 's/find_package(kvq [0-9.]* REQUIRED)/find_package(kvq 9.0 REQUIRED)/' '$work/app/CMakeLists.txt' > '$work/app/CMakeLists.9' &&
    mkdir -p '$work/app9' && cp '$work/app/main.c' '$work/app9/' && cp '$work/app/CMakeLists.9' '$work/app9/CMakeLists.txt' &&
    ! cmake -S '$work/app9' -B '$work/b9' -DCMAKE_PREFIX_PATH='$work/prefix-cmake'"
# 3. add_subdirectory on the source tree
step add-subdirectory sh -c "cmake -S '$work/app' -B '$work/b3' -DKVQ_SOURCE='$here' && cmake --build '$work/b3' && '$work/b3/app'"

echo "test_package: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
