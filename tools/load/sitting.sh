#!/usr/bin/env bash
# One sitting of the fan-out workloads of BENCHMARKS.md, on zonecast and on the Nchan
# peer, each run on a fresh server pinned to one core with `zonecast-load` pinned to
# the other; then one summary line per run.
#
#   tools/load/sitting.sh [--order zn|nz|z|n|znf|...] [--small] [--acks prompt|delayed] [WORKLOAD...]
#
# WORKLOAD: sse80 ws40 b2b1k sse10k ws10k (the default: all five). --order: the
# servers each workload runs on, in that order: z zonecast, n Nchan, f the floor
# (`zonecast-load floor`: one write per delivery and nothing else, driven as Nchan is;
# its CPU per delivery is what any server pays here). --small: a few subscribers
# and changes (CI runs it so, to keep the script working). At the end, zonecast
# against each other server that ran: ratios of deliveries/s and CPU per delivery,
# differences of p99.
# Environment: ZONECAST_BIN, LOAD_BIN (default target/release/…), SERVER_CORE (0),
# TOOL_CORE (1), PORT (18080, zonecast's; the floor's is PORT+10), NCHAN_RUN (the
# peer's run.sh, default ../shared/peers/nchan/run.sh next to this repository), OUT
# (a directory for the full reports; default a new temporary one).
# Needs: a release build (`cargo build --release --workspace`); for Nchan,
# `apt-get install -y nginx-light libnginx-mod-nchan`. Do not run it beside other
# work on the machine (a build, CI): every figure is a share of one core.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ORDER=zn SMALL=0 ACKS=prompt
WORKLOADS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --order) ORDER=$2; shift 2 ;;
        --small) SMALL=1; shift ;;
        --acks) ACKS=$2; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        sse80|ws40|b2b1k|sse10k|ws10k) WORKLOADS+=("$1"); shift ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ ${#WORKLOADS[@]} -gt 0 ] || WORKLOADS=(sse80 ws40 b2b1k sse10k ws10k)
[[ $ORDER =~ ^[znf]+$ ]] || { echo "--order: letters z (zonecast), n (Nchan), f (the floor)" >&2; exit 2; }
ZONECAST_BIN=${ZONECAST_BIN:-$REPO/target/release/zonecast}
LOAD_BIN=${LOAD_BIN:-$REPO/target/release/zonecast-load}
SERVER_CORE=${SERVER_CORE:-0} TOOL_CORE=${TOOL_CORE:-1} PORT=${PORT:-18080}
NCHAN_RUN=${NCHAN_RUN:-$REPO/../shared/peers/nchan/run.sh}
OUT=${OUT:-$(mktemp -d /tmp/zonecast-sitting.XXXXXX)}
mkdir -p "$OUT"
for bin in "$ZONECAST_BIN" "$LOAD_BIN"; do
    [ -x "$bin" ] || { echo "$bin missing: cargo build --release --workspace" >&2; exit 1; }
done
if [[ $ORDER == *n* ]] && [ ! -x "$NCHAN_RUN" ]; then
    echo "the Nchan peer's run.sh is not at $NCHAN_RUN (set NCHAN_RUN, or --order z)" >&2
    exit 1
fi
ulimit -n 20000

# The arguments of one workload for one server (Nchan publishes back to back more
# slowly, so it gets fewer changes for about as long a run).
args() {
    local w=$1 who=$2 subs changes rate transport=sse
    case "$w" in
        sse80) subs=1000 changes=2400 rate=80 ;;
        ws40) subs=1000 changes=1200 rate=40 transport=ws ;;
        b2b1k) subs=1000 changes=3000 rate=0; [ "$who" = z ] || changes=1000 ;;
        sse10k) subs=10000 changes=1000 rate=0; [ "$who" = z ] || changes=300 ;;
        ws10k) subs=10000 changes=1000 rate=0 transport=ws; [ "$who" = z ] || changes=300 ;;
    esac
    if [ "$SMALL" = 1 ]; then
        subs=$((subs / 100)) changes=$((changes / 20))
        [ "$rate" = 0 ] || rate=$((rate / 4))
    fi
    echo --subscribers "$subs" --changes "$changes" --rate "$rate" --transport "$transport" --acks "$ACKS"
}

ZC_PID=
stop_zonecast() {
    [ -n "$ZC_PID" ] || return 0
    kill "$ZC_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$ZC_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$ZC_PID" 2>/dev/null || true
    ZC_PID=
}
stop_nchan() { [[ $ORDER == *n* ]] && "$NCHAN_RUN" stop >/dev/null 2>&1 || true; }
FLOOR_PID=
stop_floor() {
    [ -n "$FLOOR_PID" ] || return 0
    kill "$FLOOR_PID" 2>/dev/null || true
    wait "$FLOOR_PID" 2>/dev/null || true
    FLOOR_PID=
}
trap 'stop_zonecast; stop_nchan; stop_floor' EXIT

# A fresh zonecast on SERVER_CORE with an empty SQLite file; sets ZC_PID and ZC_KEY.
start_zonecast() {
    local dir=$OUT/zonecast
    rm -rf "$dir" && mkdir -p "$dir"
    # A server left running on PORT would answer for the fresh one.
    if curl -s -o /dev/null "http://127.0.0.1:$PORT/readyz"; then
        echo "something already listens on 127.0.0.1:$PORT (a server left running?); stop it or set PORT" >&2
        exit 1
    fi
    taskset -c "$SERVER_CORE" "$ZONECAST_BIN" --bind "127.0.0.1:$PORT" \
        --database-url "sqlite://$dir/zc.db?mode=rwc" --no-demo --admin-key-file "$dir/key" \
        --write-rate 0 --connect-rate 0 --max-connections 19000 --max-connections-per-ip 19000 \
        > "$dir/server.log" 2>&1 &
    ZC_PID=$!
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
        kill -0 "$ZC_PID" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
        sleep 0.1
    done
    curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null || { echo "zonecast did not get ready" >&2; exit 1; }
    ZC_KEY=$(cat "$dir/key")
}

# A fresh Nchan on SERVER_CORE; sets NC_PID (its worker).
start_nchan() {
    stop_nchan
    rm -f /tmp/zc-bench-nchan/*.pid
    CPU=$SERVER_CORE setsid "$NCHAN_RUN" > "$OUT/nchan.log" 2>&1 &
    for _ in $(seq 100); do [ -s /tmp/zc-bench-nchan/worker.pid ] && break; sleep 0.1; done
    # One worker (the peer's configuration); the file lists them space-separated.
    read -r NC_PID _ < /tmp/zc-bench-nchan/worker.pid 2>/dev/null || NC_PID=
    [ -n "$NC_PID" ] || { echo "Nchan did not start:" >&2; cat "$OUT/nchan.log" >&2; exit 1; }
}

# A fresh floor server on SERVER_CORE, at PORT+10; sets FLOOR_PID and FLOOR_URL.
start_floor() {
    local addr=127.0.0.1:$((PORT + 10))
    taskset -c "$SERVER_CORE" "$LOAD_BIN" floor --bind "$addr" > "$OUT/floor.log" 2>&1 &
    FLOOR_PID=$! FLOOR_URL=http://$addr
    for _ in $(seq 100); do
        grep -q listening "$OUT/floor.log" 2>/dev/null && return 0
        kill -0 "$FLOOR_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "the floor did not start:" >&2; cat "$OUT/floor.log" >&2; exit 1
}

# The figures of one report, on one line.
summary() {
    awk -v name="$1" '
        /^deliveries:/ { d = $3; sub(/^\(/, "", d); sub(/\/s\);$/, "", d); bad = $5 "/" $7 "/" $11; gsub(/,/, "", bad) }
        /^publish → receive:/ { for (i = 1; i <= NF; i++) if ($i == "p99") r = $(i + 1) }
        /^publish → socket:/ { for (i = 1; i <= NF; i++) if ($i == "p99") s = $(i + 1) }
        /^server [0-9]+:/ { for (i = 1; i <= NF; i++) if ($i == "µs") c = $(i - 1) }
        /^load generator CPU:/ { t = $4 }
        END { printf "%-24s %10s/s  p99 %6s / %6s ms  %5s µs/delivery  tool %s  missing/dup/disorder %s\n",
                     name, d, r, s, c, t, bad }' "$2"
}

FAILED=0
run() {
    local w=$1 who=$2 name report target
    report="$OUT/$w-$who.txt"
    # Each server: started fresh, and how the tool reaches it (the floor as Nchan).
    case "$who" in
    z) name=zonecast; start_zonecast
       target=(--publish "http://127.0.0.1:$PORT" --key "$ZC_KEY" --server-pid "$ZC_PID") ;;
    n) name=nchan; start_nchan
       target=(--server nchan --publish http://127.0.0.1:8091 --server-pid "$NC_PID") ;;
    f) name=floor; start_floor
       target=(--server nchan --publish "$FLOOR_URL" --server-pid "$FLOOR_PID") ;;
    esac
    # shellcheck disable=SC2046
    taskset -c "$TOOL_CORE" "$LOAD_BIN" fanout "${target[@]}" $(args "$w" "$who") > "$report" 2>&1 \
        || { echo "the run failed: $report"; FAILED=1; }
    "stop_$name"
    summary "$w $name" "$report" | tee -a "$OUT/summary.txt"
}

# zonecast against the others, per workload, from the summary lines: deliveries/s and
# CPU per delivery as ratios, p99 (receive / socket) as differences in ms.
compare() {
    awk '
        { sub(/\/s$/, "", $3); d[$1, $2] = $3; r[$1, $2] = $5; s[$1, $2] = $7; c[$1, $2] = $9
          if (!($1 in seen)) { seen[$1] = 1; order[++n] = $1 } }
        END {
            for (i = 1; i <= n; i++) {
                w = order[i]
                if (!((w, "zonecast") in d)) continue
                for (k = 1; k <= 2; k++) {
                    o = k == 1 ? "nchan" : "floor"
                    if (!((w, o) in d) || d[w, o] == 0 || c[w, o] == 0) continue
                    printf "%-7s zonecast against %-6s deliveries/s %6.2fx  CPU per delivery %5.2fx  p99 %+7.1f / %+7.1f ms\n",
                        w, o, d[w, "zonecast"] / d[w, o], c[w, "zonecast"] / c[w, o],
                        r[w, "zonecast"] - r[w, o], s[w, "zonecast"] - s[w, o]
                }
            }
        }' "$1"
}

echo "sitting $(date -u +%FT%TZ): order $ORDER, acks $ACKS, server core $SERVER_CORE, tool core $TOOL_CORE; reports in $OUT"
: > "$OUT/summary.txt"
for w in "${WORKLOADS[@]}"; do
    for who in $(echo "$ORDER" | fold -w1); do
        run "$w" "$who"
    done
done
compare "$OUT/summary.txt"
exit "$FAILED"
