# The fault cases of docker/e2e.sh --faults (sourced by it, after the main run, on the same stack).
#
# 1. a SuperNode with a key the SuperLink never registered is refused (it exits, never gets an ID);
# 2. the ServerApp executor container is killed after round 1: the interrupted run is reported as
#    failed, the executor is started again and the run resumed (execution.resume=true) from its last
#    checkpoint, with every round logged exactly once;
# 3. an honest SuperNode container and its ClientApp executor are killed in round 2: Flower answers
#    for them once they miss their heartbeats (about a minute), the round completes with the others
#    and metrics.jsonl lists the failure.

wait_round() {  # wait_round RUN_DIR ROUND PID: until metrics.jsonl logs ROUND (or the run ends)
    local metrics="$WORK/runs/$1/metrics.jsonl"
    for _ in $(seq 600); do
        python3 -c "import json, sys; sys.exit(0 if any(json.loads(l)['round'] >= $2 for l in open('$metrics') if l.strip()) else 1)" \
            2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}

FAULT_RUN=(federated.num_clients="$NODES" training.rounds=2 capture.enabled=true "capture.rounds=[1]" capture.clients=all)

step fault-unregistered-key
ROGUE_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
timeout 300 docker run --rm --network host --label "fl-e2e=$PROJECT" \
    -v "$WORK/secrets/certs:/app/certs:ro" -v "$WORK/secrets/rogue:/app/keys/rogue:ro" "flwr/supernode:$VERSION" \
    --root-certificates /app/certs/ca.crt --superlink "$LINK" --auth-supernode-private-key /app/keys/rogue \
    --host 127.0.0.1 --port "$ROGUE_PORT" --max-retries 3 --max-wait-time 30 \
    --node-config "partition-id=9 num-partitions=$NODES malicious=true" >"$WORK/logs/rogue.log" 2>&1
grep -q "Failed to activate SuperNode" "$WORK/logs/rogue.log" || fail "the unregistered node was not refused: $(logs_tail "$WORK/logs/rogue.log" 3)"
grep -q "SuperNode ID" "$WORK/logs/rogue.log" && fail "the unregistered node got a SuperNode ID"
cli commands.compose_stack wait-nodes "$NODES" --timeout 30 >/dev/null 2>&1 || fail "the registered nodes went offline"
say "unregistered key refused ($(grep -c "Failed to activate" "$WORK/logs/rogue.log") refusals)"

step fault-serverapp-resume
cli commands.compose_stack run /src/experiments/smoke.yaml --set "${FAULT_RUN[@]}" --malicious-partitions 2 \
    --out /app/runs/resume --app /src "${STACK[@]}" >"$WORK/logs/resume-first.log" 2>&1 &
FIRST=$!
wait_round resume 1 "$FIRST" || fail "round 1 never logged: $(logs_tail "$WORK/logs/resume-first.log" 2)"
"${COMPOSE[@]}" kill superexec-serverapp >>"$WORK/logs/faults.log" 2>&1 || fail "could not kill the ServerApp executor"
RUN_ID=$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' "$WORK/runs/resume/flwr.log" | head -n 1)
docker run --rm --network host --label "fl-e2e=$PROJECT" -e FLWR_HOME=/app/runs/.flwr -v "$WORK/runs:/app/runs" \
    -v "$WORK/secrets:/app/secrets:ro" --entrypoint flwr "$LAB_IMAGE" stop "$RUN_ID" docker >>"$WORK/logs/faults.log" 2>&1
wait "$FIRST" && fail "the interrupted run was reported as a success"
[ -f "$WORK/runs/resume/summary.json" ] && fail "the interrupted run wrote a summary"
"${COMPOSE[@]}" start superexec-serverapp >>"$WORK/logs/faults.log" 2>&1 || fail "could not restart the ServerApp executor"
cli commands.compose_stack run /src/experiments/smoke.yaml --set "${FAULT_RUN[@]}" execution.resume=true \
    --malicious-partitions 2 --out /app/runs/resume --app /src "${STACK[@]}" >"$WORK/logs/resume-second.log" 2>&1 \
    || fail "the resumed run: $(logs_tail "$WORK/logs/resume-second.log" 2)"
cli commands.compose_stack check /app/runs/resume --rounds 2 >"$WORK/logs/check-resume.log" 2>&1 \
    || fail "$(logs_tail "$WORK/logs/check-resume.log" 2)"
say "ServerApp executor killed after round 1 (run $RUN_ID), resumed: $(tail -n 1 "$WORK/logs/check-resume.log")"

step fault-supernode-stopped
cli commands.compose_stack run /src/experiments/smoke.yaml --set "${FAULT_RUN[@]}" --malicious-partitions 2 \
    --out /app/runs/dead-node --app /src "${STACK[@]}" >"$WORK/logs/dead-node.log" 2>&1 &
RUN=$!
wait_round dead-node 1 "$RUN" || fail "round 1 never logged: $(logs_tail "$WORK/logs/dead-node.log" 2)"
t0=$(date +%s)
"${COMPOSE[@]}" kill supernode-0 superexec-clientapp-0 >>"$WORK/logs/faults.log" 2>&1 || fail "could not kill supernode-0"
wait "$RUN" || fail "the run with a dead SuperNode: $(logs_tail "$WORK/logs/dead-node.log" 2)"
cli commands.compose_stack check /app/runs/dead-node --rounds 2 --failures >"$WORK/logs/check-dead-node.log" 2>&1 \
    || fail "$(logs_tail "$WORK/logs/check-dead-node.log" 2)"
say "supernode-0 killed in round 2: the run completed $(( $(date +%s) - t0 )) s later, failure logged: $(tail -n 1 "$WORK/logs/check-dead-node.log")"
