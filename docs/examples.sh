#!/bin/sh
# Regenerates every example output that README.md and docs/ quote, from the
# current build, against Debian's redis-server and the test suite's tt-peer
# in a network namespace of its own:
#
#   cargo build -p tcptrace -p tcptrace-tests
#   docs/examples.sh          # as root; needs redis-server, curl and jq
#
# The outputs go to docs/examples/, and each is copied into the pages that
# quote it: a fenced block right after a line `<!-- example FILE -->` is
# replaced with FILE. Times, pids, ports and namespace inodes differ from
# run to run; the shape of each output does not. `docs/examples.sh --copy`
# only copies the outputs already in docs/examples/ into the pages (after
# editing a page, say). Do not run it during a bench: its tracer's programs
# would run on the bench's transitions too.
#
# tcptrace runs in the host's namespaces and filters on the example's
# namespace (--netns): started through `ip netns exec` it would find no
# cgroup2 mount, and so no socket callback.
set -eu

cd "$(dirname "$0")/.."
BIN=${TCPTRACE_BIN:-$PWD/target/debug/tcptrace}
PEER=${TT_PEER_BIN:-$PWD/target/debug/tt-peer}
OUT=$PWD/docs/examples
NS=tt-docs
mkdir -p "$OUT"

# Puts each example into the pages that quote it: a fenced block right after
# a line `<!-- example FILE -->` is replaced with FILE.
copy_into_pages() {
    for page in README.md docs/*.md; do
        grep -q '^<!-- example ' "$page" || continue
        awk -v dir="$OUT" '
            /^<!-- example [^ ]+ -->$/ {
                print; file = dir "/" $3
                getline; print
                while ((getline line < file) > 0) print line
                close(file)
                while ((getline) > 0) if ($0 ~ /^```$/) { print; break }
                next
            }
            { print }' "$page" >"$page.new" && mv "$page.new" "$page"
    done
}

if [ "${1:-}" = --copy ]; then
    copy_into_pages
    exit 0
fi

WORK=$(mktemp -d /tmp/tcptrace-docs.XXXXXX)

in_ns() { ip netns exec "$NS" "$@"; }

cleanup() {
    for p in $(ip netns pids "$NS" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    sleep 0.2
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NS"
in_ns ip link set lo up
NETNS=/run/netns/$NS
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing

# Starts tcptrace in the background with its stdout and stderr in files
# named after $1, and waits until it says it is tracing.
start_tracer() {
    name=$1; shift
    (cd "$WORK" && exec "$BIN" --netns "$NETNS" "$@" >"$name.out" 2>"$name.err") &
    TRACER=$!
    for _ in $(seq 100); do
        grep -q '^tcptrace: tracing' "$WORK/$name.err" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "tcptrace did not start:" >&2; cat "$WORK/$name.err" >&2; exit 1
}

stop_tracer() { kill -INT "$TRACER"; wait "$TRACER" || true; }

redis() { # port, extra args
    port=$1; shift
    in_ns redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --logfile "$WORK/redis-$port.log" --pidfile "$WORK/redis-$port.pid" "$@"
    until in_ns redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
}

# 1. What a line says: a server, the client that asks it to shut down, a
# refused connect.
# Waits for the log line, not a ping: a ping's connection would show.
in_ns redis-server --port 6389 --bind 127.0.0.1 --save '' --appendonly no \
    --logfile "$WORK/first.log" &
until grep -q 'Ready to accept' "$WORK/first.log" 2>/dev/null; do sleep 0.05; done
start_tracer first --port 6389 -w first.tcpt
sleep 0.3
in_ns redis-cli -p 6389 shutdown nosave >/dev/null 2>&1 || true
sleep 0.3
in_ns redis-cli -p 6389 ping >/dev/null 2>&1 || true
sleep 0.3
stop_tracer
{ echo "# tcptrace --netns $NETNS --port 6389 -w first.tcpt"; cat "$WORK/first.out" "$WORK/first.err"; } >"$OUT/first.txt"
{
    echo '$ tcptrace read first.tcpt --format json --state CLOSE_WAIT'
    "$BIN" read "$WORK/first.tcpt" --format json --state CLOSE_WAIT
} >"$OUT/json.txt"
"$BIN" read "$WORK/first.tcpt" -w "$WORK/first.jsonl"
{
    echo '$ tcptrace read first.tcpt -w first.jsonl; head -1 first.jsonl; tail -1 first.jsonl'
    head -1 "$WORK/first.jsonl"
    tail -1 "$WORK/first.jsonl"
    echo '$ ls -l first.tcpt first.jsonl'
    (cd "$WORK" && ls -l first.tcpt first.jsonl) | awk '{print $1, $5, $9}'
} >"$OUT/jsonl.txt"

# 2. A restart traced as a command, under a client connecting every 10 ms,
# recorded with rotation.
redis 6390
(while :; do in_ns redis-cli -p 6390 ping >/dev/null 2>&1 || true; sleep 0.01; done) &
LOAD=$!
sleep 0.5
cat >"$WORK/restart-redis" <<EOF
#!/bin/sh
ip netns exec $NS redis-cli -p 6390 shutdown nosave
sleep 0.2
ip netns exec $NS redis-server --port 6390 --bind 127.0.0.1 --save '' --appendonly no \\
    --daemonize yes --logfile redis-6390.log --pidfile redis-6390.pid
EOF
chmod +x "$WORK/restart-redis"
(
    cd "$WORK"
    "$BIN" --netns "$NETNS" --port 6390 -q -w restart.tcpt \
        --rotate-size 16K --rotate-keep 10 -- ./restart-redis >restart.out 2>restart.err || true
)
kill "$LOAD"; wait "$LOAD" 2>/dev/null || true
{
    echo "# tcptrace --netns $NETNS --port 6390 -q -w restart.tcpt --rotate-size 16K --rotate-keep 10 -- ./restart-redis"
    cat "$WORK/restart.err"
    echo '$ cat restart-redis'
    cat "$WORK/restart-redis"
    echo '$ ls -l restart.tcpt*'
    (cd "$WORK" && ls -l restart.tcpt*) | awk '{print $1, $5, $9}'
} >"$OUT/restart.txt"
{
    echo '$ tcptrace report restart.tcpt*'
    (cd "$WORK" && "$BIN" report restart.tcpt*)
} >"$OUT/report.txt"

# 3. One connection, both of its sockets: one the new server served.
tuple() { # jq filter selecting a client row
    (cd "$WORK" && "$BIN" read restart.tcpt* --format json) |
        jq -r "select($1) | \"\(.laddr):\(.lport),\(.raddr):\(.rport)\"" | sed -n 50p
}
served=$(tuple '.lport != 6390 and .lport != 0 and .new == "FIN_WAIT1"')
{
    echo "\$ tcptrace report restart.tcpt* --follow $served"
    (cd "$WORK" && "$BIN" report restart.tcpt* --follow "$served")
} >"$OUT/follow.txt"
in_ns redis-cli -p 6390 shutdown nosave >/dev/null 2>&1 || true

# 4. A CLOSE_WAIT leak: a server forks per connection, the parent closes its
# copy, the child keeps the socket after the client has gone.
start_tracer stuck --port 7000 --stuck 2s -q
in_ns "$PEER" server 127.0.0.1:7000 --mode fork-leak --hold-ms 5000 --name leaky-app >/dev/null &
SERVER=$!
sleep 0.3
in_ns "$PEER" client 127.0.0.1:7000 --mode close
sleep 3
in_ns ss -tanp state close-wait >"$WORK/ss.txt"
wait "$SERVER" || true
stop_tracer
{
    echo "# tcptrace --netns $NETNS --port 7000 --stuck 2s -q"
    cat "$WORK/stuck.err"
    echo "# ip netns exec $NS ss -tanp state close-wait    (while it was stuck)"
    cat "$WORK/ss.txt"
} >"$OUT/stuck.txt"

# 5. Prometheus metrics, after a few connections.
redis 6391
start_tracer metrics --port 6391 -q --metrics 127.0.0.1:9911
for _ in 1 2 3; do in_ns redis-cli -p 6391 ping >/dev/null; done
in_ns redis-cli -p 6391 blpop nothing 2 >/dev/null 2>&1 &
sleep 0.5
curl -s http://127.0.0.1:9911/metrics >"$WORK/metrics.txt"
{
    echo "# tcptrace --netns $NETNS --port 6391 -q --metrics 127.0.0.1:9911 &"
    echo "\$ curl -s http://127.0.0.1:9911/metrics | grep -v '^#' | grep -e CLOSE_WAIT -e _sockets -e refused"
    grep -v '^#' "$WORK/metrics.txt" | grep -e CLOSE_WAIT -e _sockets -e refused
} >"$OUT/metrics-short.txt"
{
    echo '$ grep ^Cap /proc/$(pidof tcptrace)/status    (root, once attached)'
    grep ^Cap "/proc/$TRACER/status"
    echo "\$ capsh --decode=$(awk '/^CapEff/ {print $2}' "/proc/$TRACER/status")"
    capsh --decode="$(awk '/^CapEff/ {print $2}' "/proc/$TRACER/status")"
} >"$OUT/capabilities.txt"
stop_tracer
in_ns redis-cli -p 6391 shutdown nosave >/dev/null 2>&1 || true
{
    echo "# tcptrace --netns $NETNS --port 6391 -q --metrics 127.0.0.1:9911 &"
    echo '$ curl -s http://127.0.0.1:9911/metrics    (3 connections closed, 1 open)'
    cat "$WORK/metrics.txt"
} >"$OUT/metrics.txt"

# 6. Owners on a multi-process server: nginx, a master and two workers.
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 2;
pid $WORK/nginx/nginx.pid;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    server { listen 127.0.0.1:8080; location / { return 200 "hello"; } }
}
EOF
nginx_in_ns() {
    in_ns /usr/sbin/nginx -p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" "$@"
}
nginx_in_ns
sleep 0.3
start_tracer owners --port 8080
in_ns curl -s http://127.0.0.1:8080/ >/dev/null
sleep 0.2
in_ns bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080; sleep 1.5' &
HOLD=$!
sleep 0.7
in_ns ss -tanp state established '( sport = :8080 )' >"$WORK/owners-ss.txt"
wait "$HOLD"
sleep 0.3
stop_tracer
{
    echo "# tcptrace --netns $NETNS --port 8080    (a curl, then a connection held open 1.5 s)"
    cat "$WORK/owners.out"
    master=$(cat "$WORK/nginx/nginx.pid")
    echo '$ ps -o pid,ppid,args --pid $(cat nginx.pid) --ppid $(cat nginx.pid)'
    ps -o pid,ppid,args --pid "$master" --ppid "$master"
    echo "# ip netns exec $NS ss -tanp state established '( sport = :8080 )'    (while it was open)"
    cat "$WORK/owners-ss.txt"
} >"$OUT/owners.txt"
nginx_in_ns -s stop

# 7. Without privileges.
{
    echo '$ tcptrace --port 6389    (as an unprivileged user)'
    setpriv --reuid=nobody --regid=nogroup --clear-groups "$BIN" --port 6389 2>&1 || echo "(exit status $?)"
} >"$OUT/unprivileged.txt"

# Derived pieces some pages quote alone.
grep -m1 'time-wait table' "$OUT/first.txt" >"$OUT/timewait-line.txt"
grep -m1 'snapshot' "$OUT/first.txt" >"$OUT/snapshot-line.txt"
sed -n 2p "$OUT/json.txt" >"$OUT/json-row.txt"
sed '/^\$ cat/,$d' "$OUT/restart.txt" >"$OUT/restart-summary.txt"
{
    sed -n '/^\$ ls/,$p' "$OUT/restart.txt"
    echo '$ tcptrace report restart.tcpt* | head -4'
    sed -n '2,5p' "$OUT/report.txt"
} >"$OUT/rotation.txt"

copy_into_pages
echo "examples written to $OUT and copied into the pages that quote them"
