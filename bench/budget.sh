# Sourced by bench/gpu.sh and bench/gpu_stack.sh: a time budget for the whole script, shared by sections.
# Set T0 (start, Unix s), END (when everything must be over) and BUDGET_S before sourcing.
#
# section NAME SECONDS CMD...: run CMD with at most SECONDS (and no later than END). CMD sees
# DEADLINE (Unix s, 15 s before its share ends: start nothing new after it); `timeout` interrupts it at
# the end of its share and kills it 10 s later. A section with under MIN_SECTION_S (default 20) left is
# skipped with a note. Sets SECTION_RC to CMD's exit status (0 when skipped).
section() {
  local name=$1 share=$2 now deadline
  shift 2
  SECTION_RC=0
  now=$(date +%s)
  deadline=$((now + share < END ? now + share : END))
  if [ $((deadline - now)) -lt "${MIN_SECTION_S:-20}" ]; then
    echo "== $name: skipped (time guard: $((END - now)) s of the ${BUDGET_S} s budget left)"
    SECTION_RC=skipped
    return 0
  fi
  echo "== $name: up to $((deadline - now)) s (starting $((now - T0)) s into the ${BUDGET_S} s budget)"
  DEADLINE=$((deadline - 15)) timeout --signal=INT --kill-after=10 $((deadline - now)) "$@" || SECTION_RC=$?
  case $SECTION_RC in
    0) ;;
    124 | 130 | 137) echo "== $name: stopped by the time guard after $(($(date +%s) - now)) s (exit $SECTION_RC)" ;;
    *) echo "== $name: exit status $SECTION_RC" ;;
  esac
  echo "== $name: done in $(($(date +%s) - now)) s"
}
