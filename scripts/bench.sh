#!/usr/bin/env bash
# Runs every benchmark and writes their figures to docs/benchmarks.md (with the machine and the
# date), between its `<!-- bench.sh: begin -->` and `<!-- bench.sh: end -->` lines: the rest of
# the file (measurements taken by hand, with their analysis) is kept. Nothing is asserted about
# time: the figures are for reading, next to the anchors each benchmark measures in the same run
# (the echo server for reads, the SDK way for ingest, A idle for fairness between workspaces).
#
#   scripts/bench.sh            # full sizes (tens of minutes on 2 cores)
#   scripts/bench.sh --quick    # laptop sizes (a few minutes)
#   scripts/bench.sh --smoke    # CI: tiny sizes, output to target/bench-smoke.md, docs untouched
#
# PostgreSQL runs use SHARPSEND_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test);
# each benchmark gets a fresh database under it, dropped afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-full}"
case "$mode" in
  full|--full) mode=full ;;
  --quick) mode=quick ;;
  --smoke) mode=smoke ;;
  *) echo "usage: $0 [--quick|--smoke]" >&2; exit 2 ;;
esac

case "$mode" in
  full)
    reads=(--secs 3); outbox=(--updates 100000 --people 20000 --sizes 20000 --call-samples 20)
    rates=(100 1000); criteria=(--profiles 1000000 --runs 3)
    segments=(--profiles 1000000 --segments 100 --rate 1000 --secs 120)
    metrics=(--targets 1000 --segments 1000 --app-rate 10); journey=(--members 50000)
    backfill=(--profiles 1000000 --sizes 100000); webhooks=(--events 50000 --scoring-events 1000000 --sizes 100000 --analytics-events 0)
    analytics=(--analytics-events 1456000); export=(--rows 1000000,10000000)
    fairness=(--backlog 1000000) ;;
  quick)
    reads=(--secs 1); outbox=(--updates 20000 --people 5000 --sizes 0 --call-samples 10)
    rates=(1000); criteria=(--profiles 100000 --runs 1)
    segments=(--profiles 100000 --segments 100 --rate 1000 --secs 30)
    metrics=(--targets 50 --segments 100 --app-rate 10); journey=(--members 5000)
    backfill=(--profiles 100000 --sizes 20000); webhooks=(--events 10000 --scoring-events 100000 --sizes 20000 --analytics-events 0)
    analytics=(--analytics-events 100000); export=(--rows 100000,1000000)
    fairness=(--backlog 100000) ;;
  smoke)
    reads=(--secs 0.2); outbox=(--updates 2000 --people 500 --sizes 0 --call-samples 2 --sdk-sample 20)
    rates=(1000); criteria=(--profiles 2000 --runs 1)
    segments=(--profiles 2000 --segments 5 --rate 100 --batch 20 --secs 2 --tracers 2 --settle-secs 20)
    metrics=(--targets 5 --segments 5 --app-rate 50); journey=(--members 200)
    backfill=(--profiles 2000 --sizes 500 --sim-people 200); webhooks=(--events 200 --senders 5 --scoring-events 2000 --sizes 500 --analytics-events 0)
    analytics=(--analytics-events 2000 --analytics-runs 2)
    export=(--rows 2000,10000 --per-send 1000 --insert-chunk 5000)
    fairness=(--backlog 3000 --people 500 --batch 1000 --repeats 2 --pause-ms 100) ;;
esac

export SHARPSEND_TEST_POSTGRES_URL="${SHARPSEND_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
target="${CARGO_TARGET_DIR:-target}"
packages=(-p sharpsend-tests -p sharpsend-server -p sharpsend-scheduler -p cio-sim)
if [[ $mode == smoke ]]; then
  # CI: the debug build `cargo test` already made; only that the benchmarks run is checked.
  cargo build --locked --bins "${packages[@]}"
  bin="$target/debug"
else
  cargo build --release --locked --bins "${packages[@]}"
  bin="$target/release"
fi

if [[ $mode == smoke ]]; then out="$target/bench-smoke.md"; else out=docs/benchmarks.md; fi
body="$(mktemp)"
load_at_start="$(cut -d' ' -f1-3 /proc/loadavg)"

# A fresh PostgreSQL database for one benchmark: sets $pg_url. Not called in a subshell, so that
# the counter advances and the exit trap knows every database to drop.
pg_base="${SHARPSEND_TEST_POSTGRES_URL%/*}"
created=()
fresh_pg() {
  local name="sharpsend_bench_$$_${#created[@]}"
  psql -q "$SHARPSEND_TEST_POSTGRES_URL" -c "CREATE DATABASE $name" >/dev/null
  created+=("$name")
  pg_url="$pg_base/$name"
}
drop_pg() {
  for name in "${created[@]}"; do
    psql -q "$SHARPSEND_TEST_POSTGRES_URL" -c "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null || true
  done
}
trap 'rm -f "$body"; drop_pg' EXIT

section() { printf '\n### %s\n\n' "$1" >>"$body"; echo "=== $1" >&2; }
# Runs a benchmark, its output (stdout) into the report as a code block unless it is markdown.
run() {
  local markdown="$1"; shift
  if [[ $markdown == md ]]; then
    "$@" | tee -a "$body"
  else
    { echo '```'; "$@"; echo '```'; } | tee -a "$body"
  fi
}

section "Reads vs a bare tonic echo server (SQLite)"
run md "$bin/bench-reads" "${reads[@]}"
section "Reads vs a bare tonic echo server (PostgreSQL)"
fresh_pg
run md "$bin/bench-reads" "${reads[@]}" --database-url "$pg_url"

for rate in "${rates[@]}"; do
  section "Ingest, Track API at $rate requests/s (SQLite)"
  run text "$bin/bench-outbox" "${outbox[@]}" --track-rate "$rate"
  section "Ingest, Track API at $rate requests/s (PostgreSQL)"
  fresh_pg
  run text "$bin/bench-outbox" "${outbox[@]}" --track-rate "$rate" --database-url "$pg_url"
done

section "Sweeps: metrics-poll and segment-sync (SQLite)"
run text "$bin/bench-metrics" "${metrics[@]}"
# These two make (and drop) their own test databases under SHARPSEND_TEST_POSTGRES_URL.
section "Profile backfill from an export (PostgreSQL)"
run text "$bin/bench-backfill" "${backfill[@]}"
section "Reporting webhooks and engagement scoring (PostgreSQL)"
run text "$bin/bench-webhooks" "${webhooks[@]}"
section "Journey fan-out"
run text "$bin/bench-journey" "${journey[@]}"
section "Criteria over profiles"
run text "$bin/bench-criteria" "${criteria[@]}"
section "Managed segments under sustained attribute updates (PostgreSQL)"
fresh_pg
run text "$bin/bench-segments" "${segments[@]}" --database-url "$pg_url"
section "Assignment analytics and report export (PostgreSQL; its own test database)"
run text "$bin/bench-webhooks" --only-analytics "${analytics[@]}"
section "Report export at scale over a generated history (PostgreSQL; its own test database)"
run text "$bin/bench-export" "${export[@]}"
section "Fairness: one workspace's backlog vs another's update and send (PostgreSQL)"
fresh_pg
run text "$bin/bench-fairness" "${fairness[@]}" --database-url "$pg_url"

generated="$(mktemp)"
{
  echo "<!-- bench.sh: begin (rewritten by every run of scripts/bench.sh; the rest of the file is kept) -->"
  echo "## The last \`scripts/bench.sh$([[ $mode == full ]] || echo " --$mode")\` run"
  echo
  echo "Written on $(date -u '+%Y-%m-%d %H:%M UTC')."
  echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))," \
    "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, $(uname -sr)," \
    "load average at the start: $load_at_start."
  # The release profile can be overridden from the environment (e.g. a quicker build without
  # LTO); say which build the figures are from.
  echo "Build: $([[ $mode == smoke ]] && echo debug || echo "release, LTO ${CARGO_PROFILE_RELEASE_LTO:-fat}, codegen units ${CARGO_PROFILE_RELEASE_CODEGEN_UNITS:-1}")."
  echo
  echo "Figures are for reading, not asserted. Compare each with the anchor measured in the same"
  echo "run (the echo server for reads, the one-request-per-update SDK way for ingest): on a shared"
  echo "machine absolute figures move with the load."
  cat "$body"
  echo
  echo "<!-- bench.sh: end -->"
} >"$generated"
if [[ -f $out ]] && grep -q '^<!-- bench.sh: begin' "$out"; then
  awk -v generated="$generated" '
    /^<!-- bench.sh: begin/ { while ((getline line < generated) > 0) print line; skip = 1; next }
    /^<!-- bench.sh: end -->/ { skip = 0; next }
    !skip { print }' "$out" >"$out.new"
else
  { echo "# Benchmarks"; echo; cat "$generated"; } >"$out.new"
fi
rm -f "$generated"
mv "$out.new" "$out"
echo "wrote $out" >&2
