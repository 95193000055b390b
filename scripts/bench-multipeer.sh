#!/usr/bin/env bash
# Small packets between one gateway and two peers at once, in a three-cluster sandbox: the
# case the batched socket calls (sendmmsg/recvmmsg) are for. Prints, per run, the packets
# delivered and the system calls gateway 1 made (perf stat), to compare two builds:
#
#   scripts/bench-multipeer.sh [CAUSEWAY_BINARY] [ROUNDS]
#
# fan-out: pod 1 sends to pods 2 and 3; fan-in: pods 2 and 3 send to pod 1 (64-byte UDP,
# unlimited rate, 5 s). Needs root, iperf3 and perf (linux-perf). Not part of the test suite.
set -euo pipefail
bin=${1:-./target/release/causeway}
rounds=${2:-2}
command -v perf >/dev/null || { echo "perf is needed (apt install linux-perf)" >&2; exit 1; }
"$bin" sandbox down >/dev/null 2>&1 || true
"$bin" sandbox up --clusters 3 >/dev/null
trap '"$bin" sandbox down >/dev/null 2>&1 || true' EXIT
gw1=$(pgrep -f -- "--cluster-id cluster-1" | head -1)
tmp=$(mktemp -d)
client() { # name namespace server port
    ip netns exec "$2" iperf3 -c "$3" -p "$4" -u -l 36 -b 0 -t 5 -J >"$tmp/$1.json" 2>/dev/null &
}
events=task-clock
for e in sendmsg sendmmsg sendto recvmsg recvmmsg recvfrom; do events+=",syscalls:sys_enter_$e"; done
for dir in fan-out fan-in; do
    for _ in $(seq "$rounds"); do
        for c in 1 2 3; do
            for port in 5201 5202; do
                ip netns exec "cw-c$c-pod" iperf3 -s -D -1 -p "$port" >/dev/null 2>&1
            done
        done
        sleep 0.5
        if [ "$dir" = fan-out ]; then
            client a cw-c1-pod 10.2.2.2 5201
            client b cw-c1-pod 10.3.2.2 5201
        else
            client a cw-c2-pod 10.1.2.2 5201
            client b cw-c3-pod 10.1.2.2 5202
        fi
        perf stat -e "$events" -p "$gw1" -o "$tmp/stat" -- sleep 4
        wait
        python3 - "$dir" "$tmp" <<'PY'
import json, re, sys
d, tmp = sys.argv[1], sys.argv[2]
pps = 0.0
for n in "ab":
    e = json.load(open(f"{tmp}/{n}.json"))["end"]["sum"]
    pps += (e["packets"] - e["lost_packets"]) / e["seconds"]
calls = {}
for line in open(f"{tmp}/stat"):
    m = re.match(r"\s*([\d.,]+)\s+(?:msec\s+)?(\S+)", line)
    if m and (m.group(2) == "task-clock" or "sys_enter" in m.group(2)):
        calls[m.group(2).replace("syscalls:sys_enter_", "")] = float(m.group(1).replace(",", ""))
send = sum(calls.get(k, 0) for k in ("sendmsg", "sendmmsg", "sendto"))
recv = sum(calls.get(k, 0) for k in ("recvmsg", "recvmmsg"))
pkts = pps * 4
print(f"{d}: {pps / 1000:.1f} kpps delivered; gateway 1 per packet: "
      f"{send / pkts:.3f} send calls, {recv / pkts:.3f} receive calls "
      f"({', '.join(f'{k}={v:.0f}' for k, v in calls.items() if v)})")
PY
        pkill -f "iperf3 -s" || true
        sleep 0.3
    done
done
