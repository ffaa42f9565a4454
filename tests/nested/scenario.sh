#!/bin/sh
# The MCP session the nested harness runs inside its L1 guest (busybox sh; also runs on any
# host with `capsule` on PATH and a built image). It drives `capsule serve` over stdio with
# newline-delimited JSON-RPC, one request at a time, and prints one line per step:
#   NESTED STEP <name> ok|FAIL <ms> [what was wrong]
# then `NESTED DONE pass=N fail=M`. A tool result with "isError":true fails its step.
#
# Steps: doctor, initialize, the first run_command (the template's boot, warm-up, snapshot
# and restore), run_code, a matplotlib PNG, the file tools, pause/resume keeping a variable,
# fork count=2 with the parent used afterwards, create from the template, a 2-vCPU sandbox
# (when this machine has 2 CPUs), kill_sandbox, and a server restart after which a paused
# sandbox resumes with its state.
#
# Environment: CAPSULE_STATE_DIR and CAPSULE_CACHE_DIR as for `capsule serve`; NESTED_TMP
# (default /tmp) for the pipes; NESTED_READ_TIMEOUT_S (or nested_read_timeout_s=; default 600)
# per reply;
# NESTED_EXPECT_VIRT (default svm) what `capsule doctor` must report (svm, vmx or pvm);
# NESTED_SOAK_S (or nested_soak_s= on L1's kernel command line; default 0): seconds of a soak
# in which a fork of a running parent and the parent are used in turn.

TMP=${NESTED_TMP:-/tmp}
READ_TIMEOUT_S=${NESTED_READ_TIMEOUT_S:-${nested_read_timeout_s:-600}}
EXPECT_VIRT=${NESTED_EXPECT_VIRT:-svm}
# The kernel hands init unknown `name=value` parameters as environment variables.
SOAK_S=${NESTED_SOAK_S:-${nested_soak_s:-0}}
PASS=0
FAIL=0
ID=0
REPLY=
WHY=

now_ms() {
    read -r up _ </proc/uptime
    echo "${up%.*}${up#*.}0"
}

# Starts `capsule serve` on a pair of pipes: requests on fd 3, replies on fd 4.
start_session() {
    rm -f "$TMP/mcp.in" "$TMP/mcp.out"
    mkfifo "$TMP/mcp.in" "$TMP/mcp.out"
    capsule serve <"$TMP/mcp.in" >"$TMP/mcp.out" 2>>"$TMP/serve.log" &
    SERVE_PID=$!
    exec 3>"$TMP/mcp.in" 4<"$TMP/mcp.out"
}

end_session() {
    exec 3>&- 4<&-
    wait "$SERVE_PID" 2>/dev/null
}

# Sends request $1 with params $2 and waits for its reply (into REPLY); notifications and
# server requests in between are skipped.
rpc() {
    ID=$((ID + 1))
    echo "{\"jsonrpc\":\"2.0\",\"id\":$ID,\"method\":\"$1\",\"params\":$2}" >&3
    while read -r -t "$READ_TIMEOUT_S" line <&4; do
        case "$line" in
        *"\"id\":$ID,"* | *"\"id\":$ID}"*)
            REPLY=$line
            return 0
            ;;
        esac
    done
    REPLY=
    WHY="no reply to $1 within ${READ_TIMEOUT_S}s"
    return 1
}

notify() {
    echo "{\"jsonrpc\":\"2.0\",\"method\":\"$1\",\"params\":$2}" >&3
}

# Calls tool $1 with arguments $2; fails on a protocol error or an error result.
call() {
    echo "  call $1 $2" | cut -c1-160
    rpc tools/call "{\"name\":\"$1\",\"arguments\":$2}" || return 1
    case "$REPLY" in
    *'"isError":true'* | *'"error":{'*)
        WHY="$1: $(echo "$REPLY" | cut -c1-400)"
        return 1
        ;;
    esac
    return 0
}

# Whether the last reply holds $1.
holds() {
    case "$REPLY" in
    *"$1"*) return 0 ;;
    esac
    WHY="expected $1 in: $(echo "$REPLY" | cut -c1-400)"
    return 1
}

# Sandbox ids in the last reply's structured content, in order, without repeats.
ids() {
    echo "$REPLY" | grep -o '"sandbox_id":"sb-[0-9a-f]*"' | cut -d'"' -f4 | awk '!seen[$0]++'
}

step() {
    name=$1
    shift
    WHY=
    started=$(now_ms)
    if "$@"; then
        PASS=$((PASS + 1))
        echo "NESTED STEP $name ok $(($(now_ms) - started)) ms"
    else
        FAIL=$((FAIL + 1))
        echo "NESTED STEP $name FAIL $(($(now_ms) - started)) ms $WHY"
    fi
}

doctor() {
    capsule doctor 2>&1 | sed 's/^/  doctor: /'
    report=$(capsule doctor --json 2>/dev/null)
    echo "$report" | grep -q "\"virtualization\": *\"$EXPECT_VIRT\"" || {
        WHY="doctor does not report $EXPECT_VIRT: $(echo "$report" | grep '"virtualization"')"
        return 1
    }
    echo "$report" | grep -q '"can_run_vms": *true' || {
        WHY="doctor: can_run_vms is not true"
        return 1
    }
    # Only PVM caps Linux guests' vCPUs; with VT-x/AMD-V there is no limit beyond the VMM's.
    case "$EXPECT_VIRT" in
    svm | vmx) echo "$report" | grep -q '"max_linux_vcpus": *null' || {
        WHY="doctor: $EXPECT_VIRT with a vCPU limit: $(echo "$report" | grep max_linux_vcpus)"
        return 1
    } ;;
    esac
}

initialize() {
    rpc initialize '{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"nested-harness","version":"1"}}' ||
        return 1
    holds '"serverInfo"' || return 1
    notify notifications/initialized '{}'
}

first_command() {
    call run_command '{"command":"echo hello from L2; uname -m"}' && holds 'hello from L2' || return 1
    PARENT=$(ids | head -1)
}

run_code() {
    call run_code '{"code":"x = 41\nx + 1"}' && holds '"42"'
}

plot() {
    call run_code '{"code":"import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"}' &&
        holds '"type":"image"' && holds 'image/png'
}

files() {
    call write_file '{"path":"notes.txt","content":"written in L2"}' || return 1
    call read_file '{"path":"notes.txt"}' && holds 'written in L2' || return 1
    call list_files '{"path":"."}' && holds 'notes.txt'
}

pause_resume() {
    call pause "{\"sandbox_id\":\"$PARENT\"}" || return 1
    call resume "{\"sandbox_id\":\"$PARENT\"}" || return 1
    call run_code '{"code":"x"}' && holds '"41"'
}

fork_two() {
    call fork "{\"sandbox_id\":\"$PARENT\",\"count\":2}" || return 1
    CHILDREN=$(ids | grep -v "$PARENT")
    [ "$(echo "$CHILDREN" | wc -l)" = 2 ] || {
        WHY="fork gave $(echo "$CHILDREN" | wc -l) children: $(echo "$REPLY" | cut -c1-300)"
        return 1
    }
    for child in $CHILDREN; do
        call run_code "{\"code\":\"x += 1\nx\",\"sandbox_id\":\"$child\"}" && holds '"42"' || return 1
        call run_command "{\"command\":\"echo child > child.txt\",\"sandbox_id\":\"$child\"}" || return 1
    done
    # The parent runs on after its fork, untouched by its children.
    call run_code "{\"code\":\"x\",\"sandbox_id\":\"$PARENT\"}" && holds '"41"' || return 1
    call run_command "{\"command\":\"test ! -e child.txt && echo parent-clean\",\"sandbox_id\":\"$PARENT\"}" &&
        holds 'parent-clean' || return 1
    for child in $CHILDREN; do
        call kill_sandbox "{\"sandbox_id\":\"$child\"}" || return 1
    done
}

from_template() {
    call create_sandbox '{"make_default":false}' || return 1
    FRESH=$(ids | head -1)
    call run_command "{\"command\":\"test ! -e notes.txt && echo fresh\",\"sandbox_id\":\"$FRESH\"}" && holds 'fresh' ||
        return 1
    call kill_sandbox "{\"sandbox_id\":\"$FRESH\"}"
}

two_vcpus() {
    call create_sandbox '{"make_default":false,"vcpus":2}' || return 1
    wide=$(ids | head -1)
    call run_command "{\"command\":\"nproc\",\"sandbox_id\":\"$wide\"}" && holds '"stdout":"2\n"' || return 1
    call run_code "{\"code\":\"sum(range(10**6))\",\"sandbox_id\":\"$wide\"}" && holds '499999500000' || return 1
    call kill_sandbox "{\"sandbox_id\":\"$wide\"}"
}

# A fork of a running parent, then both used in turn for SOAK_S seconds: cells that change a
# variable in each, and commands, every answer checked.
soak() {
    call fork "{\"sandbox_id\":\"$PARENT\",\"count\":1}" || return 1
    kid=$(ids | grep -v "$PARENT" | head -1)
    call run_code "{\"code\":\"n = 0\",\"sandbox_id\":\"$PARENT\"}" || return 1
    call run_code "{\"code\":\"n = 1000\",\"sandbox_id\":\"$kid\"}" || return 1
    until_ms=$(($(now_ms) + SOAK_S * 1000))
    rounds=0
    while [ "$(now_ms)" -lt "$until_ms" ]; do
        rounds=$((rounds + 1))
        call run_code "{\"code\":\"n += 1\\nn\",\"sandbox_id\":\"$PARENT\"}" >/dev/null && holds "\"$rounds\"" || return 1
        call run_code "{\"code\":\"n += 1\\nn\",\"sandbox_id\":\"$kid\"}" >/dev/null && holds "\"$((1000 + rounds))\"" ||
            return 1
        call run_command "{\"command\":\"echo round $rounds > round.txt; cat round.txt\",\"sandbox_id\":\"$kid\"}" >/dev/null &&
            holds "round $rounds" || return 1
    done
    echo "  soak: $rounds rounds of 3 calls in ${SOAK_S}s"
    call kill_sandbox "{\"sandbox_id\":\"$kid\"}" >/dev/null
}

restart() {
    call pause "{\"sandbox_id\":\"$PARENT\"}" || return 1
    echo "  ending the session"
    end_session
    echo "  capsule shutdown"
    capsule shutdown >>"$TMP/serve.log" 2>&1 || {
        WHY="capsule shutdown failed"
        return 1
    }
    echo "  a new session"
    start_session
    initialize || return 1
    call list_sandboxes '{}' && holds "$PARENT" && holds '"paused"' || return 1
    call run_code "{\"code\":\"x\",\"sandbox_id\":\"$PARENT\"}" && holds '"41"'
}

echo "NESTED BEGIN $(nproc) cpu(s), $(uname -r)"
step doctor doctor
start_session
step initialize initialize
step first_run_command first_command
step run_code run_code
step matplotlib_png plot
step file_tools files
step pause_resume pause_resume
step fork_2_parent_used fork_two
step create_from_template from_template
if [ "$SOAK_S" -gt 0 ]; then
    step "soak_fork_${SOAK_S}s" soak
fi
if [ "$(nproc)" -ge 2 ] && capsule doctor --json 2>/dev/null | grep -q '"max_linux_vcpus": *null'; then
    step two_vcpu_sandbox two_vcpus
fi
step server_restart restart
step kill_sandbox call kill_sandbox "{\"sandbox_id\":\"$PARENT\"}"
end_session
capsule shutdown >>"$TMP/serve.log" 2>&1
echo "NESTED DONE pass=$PASS fail=$FAIL"
[ "$FAIL" = 0 ]
