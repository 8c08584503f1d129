#!/usr/bin/env bash
# bench/overview.c on small sample CSVs (eval.csv and bench.csv as kvq_eval and bench
# write them): the SVG it writes has the expected series and labels, and bad input fails.
# Usage: tests/test_overview.sh build/overview
set -u
bin=${1:?usage: test_overview.sh OVERVIEW_BINARY}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
passed=0; failed=0
ok() { passed=$((passed + 1)); }
bad() { echo "FAIL: $*"; failed=$((failed + 1)); }
has() { if grep -qF -- "$2" "$1"; then ok; else bad "$1 lacks: $2"; fi; }
count() { n=$(grep -oF -- "$2" "$1" | wc -l); if [ "$n" -eq "$3" ]; then ok; else bad "$1: $n x '$2', want $3"; fi; }

cat > "$dir/eval.csv" <<'EOF'
dump,config,layer,bits_steady,bits_actual,k_rel_mse,v_rel_mse,attn_err,kl,kernel_vs_read,queries,seconds
stories260K_gen.kvd,k16v16,all,16.0000,16.0000,4.4e-08,4.3e-08,6.6e-06,5.2e-06,2.7e-13,40960,0.767
stories260K_gen.kvd,k4v4,all,6.5000,8.9,6.5e-04,1.8e-03,1.4e-04,4.1e-04,2.7e-13,40960,1.0
stories260K_gen.kvd,k4v4,0,6.5000,8.9,6.5e-04,1.8e-03,9.9e-01,4.1e-04,2.7e-13,8192,
stories260K_gen.kvd,k2v2,all,4.5000,7.4,1.1e-02,3.6e-02,3.9e-03,1.1e-02,2.7e-13,40960,0.95
stories260K_gen.kvd,k2v2c0,all,4.5000,7.4,1.7e-02,4.6e-02,1.6e-02,2.2e-02,2.9e-13,40960,0.85
minilm_gpl3.kvd,k4v4,all,5.0000,7.8,1.9e-03,4.7e-03,4.4e-04,7.4e-04,5.7e-14,30720,2.1
minilm_gpl3.kvd,k2v2,all,3.0000,6.3,3.1e-02,7.7e-02,1.1e-02,1.5e-02,5.1e-14,30720,2.2
mystery_model.kvd,k3v3,all,4.0000,6.0,1e-02,1e-02,2.0e-03,1e-03,1e-14,100,0.1
EOF
cat > "$dir/bench.csv" <<'EOF'
# cpu: Test CPU 9000
# date: 2030-01-02 03:04 UTC
# kvq: 9.9.9, ISA scalar
kind,config,key_bits,value_bits,n_q_heads,n_kv_heads,head_dim,threads,n_tokens,reps,median_ms,min_ms,ns_per_token,ns_per_token_per_kv_head,bytes_read,bits_per_element,gb_per_s,pct_of_bw,speedup_vs_fp16,out_dev_vs_fp32
bandwidth,stream-sum-start,,,,,,1,,7,49.9,,,,536870912,,10.750,100.0,,
attention,kvq-16,16,16,32,8,128,1,4096,10,1.000000,1.0,1,1,1,16,1,1,1.0,
attention,kvq-2,2,2,32,8,128,1,4096,10,0.800000,0.8,1,1,1,3.4,1,1,1.25,
attention,kvq-4,4,4,32,8,128,1,4096,10,0.900000,0.9,1,1,1,5.3,1,1,1.11,
attention,kvq-16,16,16,32,8,128,1,16384,10,4.000000,4.0,1,1,1,16,1,1,1.0,
attention,kvq-2,2,2,32,8,128,1,16384,10,2.500000,2.5,1,1,1,3.1,1,1,1.60,
attention,kvq-4,4,4,32,8,128,1,16384,10,2.800000,2.8,1,1,1,5.1,1,1,1.43,
attention,kvq-2,2,2,32,8,128,2,16384,10,0.100000,0.1,1,1,1,3.1,1,1,40.0,
attention,kvq-2,2,2,8,8,128,1,16384,10,0.200000,0.2,1,1,1,3.1,1,1,20.0,
append,kvq-2,2,2,,8,128,1,4096,3,10.0,,1.0,1.0,,,,,,
EOF

svg=$dir/out.svg
if "$bin" "$dir/eval.csv" "$dir/bench.csv" "$svg" 2> "$dir/err"; then ok; else bad "overview failed: $(cat "$dir/err")"; fi
if [ -s "$svg" ]; then
    has "$svg" '<svg xmlns="http://www.w3.org/2000/svg"'
    count "$svg" '</svg>' 1
    # (a): one line per dump, kNvN configs only (k16v16 and k2v2c0 left out), the references
    # for the dumps REFERENCE.md has (not for mystery_model)
    has "$svg" 'stories260K (Llama)'
    has "$svg" 'MiniLM-L6 (BERT)'
    has "$svg" '>mystery_model</text>'
    count "$svg" '<polyline' 5 # 3 dumps, kvq-2 and kvq-4
    count "$svg" '>KIVI-2</text>' 3 # 2 dumps and the legend
    count "$svg" '>q4_0</text>' 2
    count "$svg" '>k4v4</text>' 2
    count "$svg" '>k2v2c0</text>' 0
    count "$svg" '>k16v16</text>' 0
    # (b): speed-ups at the last N, from GQA on 1 thread only (not the 2-thread or MHA rows)
    has "$svg" 'kvq 2-bit 1.60x'
    has "$svg" 'kvq 4-bit 1.43x'
    has "$svg" 'kvq fp16 1.00x'
    has "$svg" '1 ms at 4K, 4 ms at 16K'
    count "$svg" '40.00x' 0
    # the CPU and the date from bench.csv's '#' lines
    has "$svg" 'Test CPU 9000, measured 2030-01-02 03:04 UTC, kvq 9.9.9'
    if command -v python3 >/dev/null; then
        if python3 -c 'import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.argv[1])' "$svg"; then ok
        else bad "$svg is not well-formed XML"; fi
    fi
fi
# --cpu, --date and --note override and add
if "$bin" --cpu 'Other & CPU' --date 2031 --note 'provisional <draft>' "$dir/eval.csv" "$dir/bench.csv" "$svg"; then
    has "$svg" 'Other &amp; CPU, measured 2031'
    has "$svg" 'provisional &lt;draft&gt;'
else bad "overview with --cpu --date --note failed"; fi
# bad input: a missing column, no fp16 rows, a missing file, a bad number
sed 's/attn_err/attn_error/' "$dir/eval.csv" > "$dir/bad_eval.csv"
grep -v 'kvq-16' "$dir/bench.csv" > "$dir/bad_bench.csv"
sed 's/,0.800000,/,fast,/' "$dir/bench.csv" > "$dir/bad_num.csv"
for args in "$dir/bad_eval.csv $dir/bench.csv" "$dir/eval.csv $dir/bad_bench.csv" "$dir/nope.csv $dir/bench.csv" \
            "$dir/eval.csv $dir/bad_num.csv"; do
    # shellcheck disable=SC2086
    if "$bin" $args "$dir/x.svg" 2>/dev/null; then bad "overview accepted $args"; else ok; fi
done
echo "test_overview: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
