#!/usr/bin/env bash
# `da3 bench --full --stages accuracy` as one job per (method, domain), all in parallel, each in
# its own results folder under $JOBS (default bench_jobs/), then merged into $RESULTS (default
# benchmarks/results) by benchmarks/merge_bench.py. For a GPU machine with many cores: on one
# H100 with 16 cores, 15 jobs (three methods, three seeds each) took about 3 minutes.
#
# usage: benchmarks/bench_jobs.sh SECONDS METHOD...
#   each job is stopped after SECONDS; what it finished is kept, and a second call resumes it.
#   DOMAINS="clipart textures" narrows the domains; SEEDS=3-9 trains other seeds than the
#   preset's (merge those into a folder of their own: RESULTS=benchmarks/results/more_seeds).
set -u
secs=$1
shift
jobs=${JOBS:-bench_jobs}
domains=${DOMAINS:-digits clothing animals clipart textures}
seeds=${SEEDS:+--seeds $SEEDS}
mkdir -p "$jobs"
for m in "$@"; do
  for d in $domains; do
    # shellcheck disable=SC2086
    timeout "$secs" da3 bench --full --device cuda --stages accuracy --threads 1 $seeds \
      --methods "$m" --domains "$d" --results "$jobs/$m-$d" --report "$jobs/$m-$d/report.md" \
      >"$jobs/$m-$d.log" 2>&1 &
  done
done
wait
python3 "$(dirname "$0")/merge_bench.py" --tag full --results "${RESULTS:-benchmarks/results}" \
  "$jobs"/*/
