#!/usr/bin/env bash
# `da3 bench --full --stages accuracy` as one job per (method, domain), all in parallel, each in
# its own results folder under $JOBS (default bench_jobs/), then merged into benchmarks/results
# by benchmarks/merge_bench.py. For a GPU machine with many cores: the 45 runs of three methods
# took about 3 minutes on one H100 this way (15 jobs), against hours one after another on a CPU.
#
# usage: benchmarks/bench_jobs.sh SECONDS METHOD... (each job is stopped after SECONDS; what it
# finished is kept, and a second call resumes it)
set -u
secs=$1
shift
jobs=${JOBS:-bench_jobs}
mkdir -p "$jobs"
for m in "$@"; do
  for d in digits clothing animals clipart textures; do
    timeout "$secs" da3 bench --full --device cuda --stages accuracy --threads 1 \
      --methods "$m" --domains "$d" --results "$jobs/$m-$d" --report "$jobs/$m-$d/report.md" \
      >"$jobs/$m-$d.log" 2>&1 &
  done
done
wait
python3 "$(dirname "$0")/merge_bench.py" --tag full "$jobs"/*/
