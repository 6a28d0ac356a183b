#!/usr/bin/env bash
# Smoke test of `sharpsend-server --dev` with a real grpcurl: list, describe, health, ListSegments
# with the dev key (and a lower-case `bearer`), SendAssignment (twice: one send), a refused one
# with readable field violations and ErrorInfo reason, criteria in the message form (`all_of`), a
# padded job name refused, and the same call without a key must fail with Unauthenticated. Then
# SIGTERM must stop the server cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${SMOKE_PORT:-50599}"
ADDR="127.0.0.1:${PORT}"
WORK="$(mktemp -d)"
LOG="${WORK}/server.log"
fail() { echo "smoke: FAIL: $*"; echo "--- server log ---"; tail -n 50 "${LOG}" || true; exit 1; }

cargo build --quiet --bin sharpsend-server
DATABASE_URL="sqlite://${WORK}/smoke.db?mode=rwc" SHARPSEND_LISTEN="${ADDR}" \
  "${CARGO_TARGET_DIR:-target}/debug/sharpsend-server" --dev >"${LOG}" 2>&1 &
PID=$!
cleanup() { kill "${PID}" 2>/dev/null || true; rm -rf "${WORK}"; }
trap cleanup EXIT

for _ in $(seq 1 120); do
  if grpcurl -plaintext -max-time 2 "${ADDR}" grpc.health.v1.Health/Check >/dev/null 2>&1; then break; fi
  kill -0 "${PID}" 2>/dev/null || fail "server exited during start-up"
  sleep 0.5
done

grpcurl -plaintext "${ADDR}" list >"${WORK}/list" || fail "list"
grep -qx "sharpsend.cio.v1.SegmentService" "${WORK}/list" || fail "list lacks SegmentService: $(cat "${WORK}/list")"
grep -qx "grpc.health.v1.Health" "${WORK}/list" || fail "list lacks Health"
echo "smoke: list ok"

grpcurl -plaintext "${ADDR}" describe sharpsend.cio.v1.SegmentService >"${WORK}/describe" || fail "describe"
for rpc in ListSegments GetSegment SyncSegments ValidateTargeting; do
  grep -q "rpc ${rpc}" "${WORK}/describe" || fail "describe lacks ${rpc}"
done
echo "smoke: describe ok"

grpcurl -plaintext "${ADDR}" grpc.health.v1.Health/Check | grep -q '"SERVING"' || fail "health is not SERVING"
echo "smoke: health ok"

grpcurl -plaintext -H 'authorization: Bearer dev-key' -d '{"page_size": 100}' \
  "${ADDR}" sharpsend.cio.v1.SegmentService/ListSegments >"${WORK}/segments" || fail "ListSegments with key"
grep -q '"Growth Investors"' "${WORK}/segments" || fail "ListSegments lacks Growth Investors: $(head -c 500 "${WORK}/segments")"
grep -q '"memberCount"' "${WORK}/segments" || fail "ListSegments lacks member counts"
echo "smoke: ListSegments with key ok ($(grep -c '"id"' "${WORK}/segments") segments)"

grpcurl -plaintext -H 'authorization: bearer dev-key' -d '{"page_size": 1}' \
  "${ADDR}" sharpsend.cio.v1.SegmentService/ListSegments >/dev/null || fail "a lower-case bearer scheme was refused"
echo "smoke: lower-case bearer ok"

SEND='{"assignment_id":"smoke-1","title":"Smoke","subject":"Smoke test","segment_ids":[4],
  "variations":[{"segment_id":4,"body":"<p>Hello</p>"}],"broadcast":{"broadcast_id":3}}'
grpcurl -plaintext -H 'authorization: Bearer dev-key' -d "${SEND}" \
  "${ADDR}" sharpsend.cio.v1.CampaignService/SendAssignment >"${WORK}/send" || fail "SendAssignment"
grep -q '"SEND_STATE_SUBMITTED"' "${WORK}/send" || fail "SendAssignment not submitted: $(cat "${WORK}/send")"
grep -q '"created": true' "${WORK}/send" || fail "SendAssignment did not create: $(cat "${WORK}/send")"
SEND_ID="$(grep -m1 '"id": "snd_' "${WORK}/send" | sed 's/.*"\(snd_[^"]*\)".*/\1/')"
grpcurl -plaintext -H 'authorization: Bearer dev-key' -d "${SEND}" \
  "${ADDR}" sharpsend.cio.v1.CampaignService/SendAssignment >"${WORK}/again" || fail "SendAssignment again"
grep -q "\"${SEND_ID}\"" "${WORK}/again" || fail "a repeated approval made another send: $(cat "${WORK}/again")"
grep -q '"created": true' "${WORK}/again" && fail "a repeated approval was created again"
echo "smoke: SendAssignment once ok (${SEND_ID})"

if grpcurl -plaintext -H 'authorization: Bearer dev-key' -d '{"title":"Smoke","segment_ids":[4],"broadcast":{"broadcast_id":3}}' \
  "${ADDR}" sharpsend.cio.v1.CampaignService/SendAssignment >"${WORK}/bad" 2>&1; then
  fail "SendAssignment without an assignment id succeeded"
fi
grep -q "InvalidArgument" "${WORK}/bad" || fail "bad SendAssignment: $(cat "${WORK}/bad")"
grep -q '"field": "assignment_id"\|"field":"assignment_id"' "${WORK}/bad" \
  || fail "field violations not readable through reflection: $(cat "${WORK}/bad")"
grep -q '"reason": "INVALID_FIELD"\|"reason":"INVALID_FIELD"' "${WORK}/bad" \
  || fail "ErrorInfo reason not readable through reflection: $(cat "${WORK}/bad")"
echo "smoke: InvalidArgument with readable field violations and ErrorInfo ok"

grpcurl -plaintext -H 'authorization: Bearer dev-key' \
  -d '{"criteria":{"all_of":{"criteria":[{"segment":{"id":4}},{"negate":{"attribute":{"field":"unsubscribed","operator":"ATTRIBUTE_OPERATOR_EQ","value":{"bool_value":true}}}}]}},"sample_size":1}' \
  "${ADDR}" sharpsend.cio.v1.SegmentService/PreviewSegment >"${WORK}/preview" 2>&1 || fail "PreviewSegment (message form): $(cat "${WORK}/preview")"
grep -q '"evaluatedAt"' "${WORK}/preview" || fail "PreviewSegment answered oddly: $(cat "${WORK}/preview")"
echo "smoke: criteria message form (all_of / negate) ok"

if grpcurl -plaintext -H 'authorization: Bearer dev-key' -d '{"job":" segment-sync"}' \
  "${ADDR}" sharpsend.cio.v1.OpsService/RunJob >"${WORK}/job" 2>&1; then
  fail "RunJob ran a padded job name"
fi
grep -q "InvalidArgument" "${WORK}/job" || fail "padded RunJob: $(cat "${WORK}/job")"
echo "smoke: padded job name refused ok"

if grpcurl -plaintext "${ADDR}" sharpsend.cio.v1.SegmentService/ListSegments >"${WORK}/nokey" 2>&1; then
  fail "ListSegments without a key succeeded"
fi
grep -q "Unauthenticated" "${WORK}/nokey" || fail "ListSegments without a key: $(cat "${WORK}/nokey")"
echo "smoke: ListSegments without key rejected ok"

kill -TERM "${PID}"
for _ in $(seq 1 40); do kill -0 "${PID}" 2>/dev/null || break; sleep 0.25; done
kill -0 "${PID}" 2>/dev/null && fail "server did not stop on SIGTERM"
wait "${PID}" || fail "server exited non-zero after SIGTERM"
echo "smoke: graceful shutdown ok"
echo "smoke: 11 passed, 0 failed"
