# The run queue behind train_all.sh and e2e_all.sh (sourced by them, not run on its own).
#
# A sweep registers its runs with sweep_add (folder, label, the run it needs first, command), then calls
# sweep_execute, which
#   - skips a run whose results are already complete (parse_results.py --score FOLDER says so), so a killed sweep
#     restarts where it stopped; an interrupted run resumes inside itself where its script supports it;
#   - but first moves aside (FOLDER.replaced-<time>) a run folder that another command made (FOLDER/.sweep_command
#     differs: other epochs, learning rate, data...), so its results are never taken for this command's;
#   - runs JOBS runs at once: on a GPU machine each pinned to its own GPU (CUDA_VISIBLE_DEVICES), on a CPU-only
#     machine each with its share of the cores (OMP/MKL threads = cores / JOBS);
#   - sends everything a run prints to FOLDER/log.txt and prints one line per finished run (label, score, seconds),
#     plus one sweep-level progress bar with an ETA (redrawn in place on a terminal);
#   - keeps going when a run fails, and lists the failed runs at the end (SWEEP_FAILED).
# Hooks (function names): SWEEP_BEFORE_RUN FOLDER (before a run starts), SWEEP_AFTER_RUN FOLDER (after it succeeded).
# Needs bash >= 5.1 (wait -n -p).

SWEEP_OUT=() SWEEP_LABEL=() SWEEP_NEEDS=() SWEEP_CMD=() SWEEP_FAILED=()

sweep_options() {  # the sweep scripts' own flags: --jobs N | --jobs=N, --dry-run; everything else -> SWEEP_REST
  SWEEP_REST=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --jobs) JOBS=${2:?--jobs needs a number or auto}; shift 2 ;;
      --jobs=*) JOBS=${1#--jobs=}; shift ;;
      --dry-run|--dry_run) DRY_RUN=1; shift ;;
      *) SWEEP_REST+=("$1"); shift ;;
    esac
  done
}

sweep_add() {  # sweep_add FOLDER LABEL NEEDS(folder or "") COMMAND-STRING (run by bash, from the repo root)
  SWEEP_OUT+=("$1") SWEEP_LABEL+=("$2") SWEEP_NEEDS+=("$3") SWEEP_CMD+=("$4")
}

sweep_quote() { printf '%q ' "$@"; }  # a command line as one string that bash -c runs word for word

sweep_gpus() {  # the GPU ids runs may use, one per line: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -v '^ *$' | grep -v '^-' || true
  elif command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi -L 2> /dev/null | sed -n 's/^GPU \([0-9]*\):.*/\1/p' || true
  fi
}

sweep_slots() {  # JOBS (a number or auto) -> SWEEP_JOBS and one environment (SWEEP_SLOT_ENV) per slot
  local gpus cores jobs=${JOBS:-1} i threads
  mapfile -t gpus < <(sweep_gpus)
  cores=$(nproc 2> /dev/null || echo 1)
  if [ "$jobs" = auto ]; then
    # One run per GPU. On CPU: one single-threaded run per core up to 4 cores (small GLUE/E2E steps do not scale
    # across threads, and each run's single-threaded start-up then overlaps another run's compute: measured in
    # docs/sweeps.md), 4 threads per run above that.
    if [ ${#gpus[@]} -gt 0 ]; then jobs=${#gpus[@]}; elif [ "$cores" -le 4 ]; then jobs=$cores
    else jobs=$((cores / 4)); fi
  fi
  if ! [[ "$jobs" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: JOBS must be a positive number or auto, got '$jobs'" >&2; exit 2
  fi
  SWEEP_JOBS=$jobs SWEEP_SLOT_ENV=()
  if [ ${#gpus[@]} -gt 0 ]; then
    if [ "$jobs" -gt ${#gpus[@]} ]; then
      echo "note: JOBS=$jobs on ${#gpus[@]} GPUs: some runs share a GPU" >&2
    fi
    for ((i = 0; i < jobs; i++)); do SWEEP_SLOT_ENV+=("CUDA_VISIBLE_DEVICES=${gpus[i % ${#gpus[@]}]}"); done
    SWEEP_WHERE="$jobs at once, one per GPU (${gpus[*]})"
  else
    threads=$((cores / jobs)); [ "$threads" -ge 1 ] || threads=1
    [ "$jobs" -le "$cores" ] || echo "note: JOBS=$jobs is more than the $cores cores: runs share cores" >&2
    for ((i = 0; i < jobs; i++)); do
      SWEEP_SLOT_ENV+=("OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads CUDA_VISIBLE_DEVICES=")
    done
    SWEEP_WHERE="$jobs at once on CPU, $threads thread(s) each ($cores cores)"
  fi
}

sweep_time() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

sweep_bar() {  # sweep_bar FINISHED TOTAL: the one progress line, redrawn in place on a terminal
  local done=$1 total=$2 width=30 filled elapsed eta=""
  [ -t 1 ] || return 0
  elapsed=$((SECONDS - SWEEP_START))
  filled=$((total > 0 ? done * width / total : width))
  if [ "$SWEEP_RAN" -gt 0 ] && [ "$done" -lt "$total" ]; then
    eta=", ETA $(sweep_time $(((total - done) * elapsed / SWEEP_RAN)))"
  fi
  printf '\r\033[K[%s%s] %d/%d runs, %s%s' "$(printf '%*s' "$filled" '' | tr ' ' '#')" \
    "$(printf '%*s' $((width - filled)) '' | tr ' ' '.')" "$done" "$total" "$(sweep_time "$elapsed")" "$eta"
}

sweep_say() {  # a line above the progress bar
  if [ -t 1 ]; then printf '\r\033[K'; fi
  echo "$@"
}

sweep_command_record() {  # sweep_command_record INDEX: the run's command as kept in its folder, the interpreter
  # ($PY: .venv/bin/python, $PYTHON or python) left out, so a new .venv or PYTHON=... changes no run's record
  local cmd=${SWEEP_CMD[$1]} py
  if [ -n "${PY:-}" ]; then py=$(printf '%q' "$PY"); cmd=${cmd//"$py "/"PYTHON "}; fi
  printf '%s' "$cmd"
}

sweep_set_aside_changed() {  # folders another command made, and those built on them, are moved out of the way
  local i changed=1 why aside
  declare -A replaced=()
  while [ "$changed" = 1 ]; do  # repeated for chains: a run that needs a replaced run is replaced too
    changed=0
    for i in "${!SWEEP_OUT[@]}"; do
      [ -d "${SWEEP_OUT[i]}" ] || continue
      if [ -f "${SWEEP_OUT[i]}/.sweep_command" ] &&
         [ "$(cat "${SWEEP_OUT[i]}/.sweep_command")" != "$(sweep_command_record "$i")" ]; then
        why="was made by another command (see its .sweep_command)"
      elif [ -n "${SWEEP_NEEDS[i]}" ] && [ -n "${replaced[${SWEEP_NEEDS[i]}]:-}" ]; then
        why="was built on ${SWEEP_NEEDS[i]}, which runs again"
      else
        continue
      fi
      aside="${SWEEP_OUT[i]}.replaced-$(date +%Y%m%d-%H%M%S)"
      mv "${SWEEP_OUT[i]}" "$aside"
      replaced[${SWEEP_OUT[i]}]=1 changed=1
      echo "${SWEEP_LABEL[i]}: its folder $why; moved to $aside, running it again"
    done
  done
}

sweep_score() {  # the run's headline score ("accuracy 80.39"), or a non-zero exit when it is not complete
  "$PY" parse_results.py --score "$1"
}

sweep_start_run() {  # sweep_start_run INDEX SLOT: start in the background, everything it prints into its log
  local i=$1 slot=$2 out=${SWEEP_OUT[$1]}
  mkdir -p "$out"
  sweep_command_record "$i" > "$out/.sweep_command.tmp" && mv "$out/.sweep_command.tmp" "$out/.sweep_command"
  [ -z "${SWEEP_BEFORE_RUN:-}" ] || "$SWEEP_BEFORE_RUN" "$out" >> "$out/log.txt" 2>&1
  {
    echo "=== $(date '+%F %T') ${SWEEP_LABEL[i]} (slot $slot: ${SWEEP_SLOT_ENV[slot]})"
    echo "=== ${SWEEP_CMD[i]}"
  } >> "$out/log.txt"
  # set -m below gives each run its own process group, so an interrupted sweep can stop a run with its children.
  env ${SWEEP_SLOT_ENV[slot]} bash -c "${SWEEP_CMD[i]}" >> "$out/log.txt" 2>&1 < /dev/null &
  SWEEP_PID_RUN[$!]=$i SWEEP_PID_SLOT[$!]=$slot SWEEP_RUN_START[$i]=$SECONDS
}

sweep_kill_running() {  # stop the runs this sweep started (each its own process group)
  local pid
  for pid in "${!SWEEP_PID_RUN[@]}"; do kill -TERM -- "-$pid" 2> /dev/null || true; done
  wait 2> /dev/null || true
}

sweep_stop_all() {  # Ctrl-C / kill: stop the runs we started, keep what they finished
  trap - INT TERM EXIT
  sweep_kill_running
  sweep_say "interrupted: ${#SWEEP_PID_RUN[@]} running run(s) stopped; rerun the same command to continue"
  exit 130
}

sweep_finish_run() {  # sweep_finish_run PID EXIT-STATUS: one line for the run, its slot freed
  local pid=$1 rc=$2 i slot out secs score why
  i=${SWEEP_PID_RUN[$pid]} slot=${SWEEP_PID_SLOT[$pid]} out=${SWEEP_OUT[$i]}
  unset "SWEEP_PID_RUN[$pid]" "SWEEP_PID_SLOT[$pid]"
  SWEEP_FREE+=("$slot")
  secs=$((SECONDS - SWEEP_RUN_START[i]))
  SWEEP_FINISHED=$((SWEEP_FINISHED + 1)) SWEEP_RAN=$((SWEEP_RAN + 1))
  if [ "$rc" -eq 0 ] && score=$(sweep_score "$out" 2> "$out/.score_error"); then
    rm -f "$out/.score_error"
    SWEEP_STATE[$i]=done
    sweep_say "[$SWEEP_FINISHED/$SWEEP_TOTAL] ${SWEEP_LABEL[i]}: $score  ${secs}s"
    [ -z "${SWEEP_AFTER_RUN:-}" ] || "$SWEEP_AFTER_RUN" "$out"
  else
    SWEEP_STATE[$i]=failed
    SWEEP_FAILED+=("$out")
    if [ "$rc" -ne 0 ]; then
      why="exit $rc: $(sweep_last_error "$out/log.txt")"
    else
      why="finished but its results are not usable: $(tail -1 "$out/.score_error" | cut -c1-200 || true)"
    fi
    rm -f "$out/.score_error"
    sweep_say "[$SWEEP_FINISHED/$SWEEP_TOTAL] ${SWEEP_LABEL[i]}: FAILED after ${secs}s ($why; log: $out/log.txt)"
  fi
}

sweep_last_error() {  # the last line of a log that reports an error (the scripts print one), shortened
  { grep -iE '(^|: )error|Error:|Traceback' "$1" || tail -1 "$1"; } 2> /dev/null | tail -1 | cut -c1-200 || true
}

sweep_next_run() {  # SWEEP_NEXT = a pending run that may start now (its dependency done); 1 when none may
  local i
  sweep_mark_blocked
  for i in "${!SWEEP_OUT[@]}"; do
    [ "${SWEEP_STATE[i]}" = pending ] || continue
    if [ -n "${SWEEP_NEEDS[i]}" ] && [ "$(sweep_state_of "${SWEEP_NEEDS[i]}")" != done ]; then continue; fi
    SWEEP_NEXT=$i; return 0
  done
  return 1
}

sweep_state_of() {  # the state of the run writing to this folder; "done" for a folder outside the sweep
  local j
  for j in "${!SWEEP_OUT[@]}"; do
    if [ "${SWEEP_OUT[j]}" = "$1" ]; then echo "${SWEEP_STATE[j]}"; return; fi
  done
  echo done
}

sweep_mark_blocked() {  # pending runs whose dependency failed fail too, without starting (repeated for chains)
  local i changed=1
  while [ "$changed" = 1 ]; do
    changed=0
    for i in "${!SWEEP_OUT[@]}"; do
      [ "${SWEEP_STATE[i]}" = pending ] && [ -n "${SWEEP_NEEDS[i]}" ] || continue
      [ "$(sweep_state_of "${SWEEP_NEEDS[i]}")" = failed ] || continue
      SWEEP_STATE[$i]=failed SWEEP_FAILED+=("${SWEEP_OUT[i]}") SWEEP_FINISHED=$((SWEEP_FINISHED + 1)) changed=1
      sweep_say "[$SWEEP_FINISHED/$SWEEP_TOTAL] ${SWEEP_LABEL[i]}: FAILED (needs ${SWEEP_NEEDS[i]}, which failed)"
    done
  done
}

sweep_execute() {
  local i pid rc slot running=0 score skipped=0
  sweep_slots
  SWEEP_TOTAL=${#SWEEP_OUT[@]} SWEEP_FINISHED=0 SWEEP_RAN=0 SWEEP_START=$SECONDS SWEEP_STATE=() SWEEP_FREE=()
  declare -g -A SWEEP_PID_RUN=() SWEEP_PID_SLOT=()
  declare -g -a SWEEP_RUN_START=()
  sweep_set_aside_changed
  for i in "${!SWEEP_OUT[@]}"; do
    if score=$(sweep_score "${SWEEP_OUT[i]}" 2> /dev/null); then
      SWEEP_STATE[$i]=done skipped=$((skipped + 1)) SWEEP_FINISHED=$((SWEEP_FINISHED + 1))
      echo "[$SWEEP_FINISHED/$SWEEP_TOTAL] ${SWEEP_OUT[i]}: done, skipped ($score)"
    else
      SWEEP_STATE[$i]=pending
    fi
  done
  echo "$((SWEEP_TOTAL - skipped)) runs to do ($skipped already finished), $SWEEP_WHERE; each run's output in <run>/log.txt"
  for ((slot = 0; slot < SWEEP_JOBS; slot++)); do SWEEP_FREE+=("$slot"); done
  set -m  # each run in its own process group (see sweep_stop_all)
  trap sweep_stop_all INT TERM
  trap sweep_kill_running EXIT  # should this shell die, it takes its runs with it
  while :; do
    while [ ${#SWEEP_FREE[@]} -gt 0 ] && sweep_next_run; do
      i=$SWEEP_NEXT slot=${SWEEP_FREE[0]} SWEEP_FREE=("${SWEEP_FREE[@]:1}")
      SWEEP_STATE[$i]=running
      sweep_start_run "$i" "$slot"
    done
    sweep_mark_blocked
    sweep_bar "$SWEEP_FINISHED" "$SWEEP_TOTAL"
    [ ${#SWEEP_PID_RUN[@]} -gt 0 ] || break
    rc=0
    wait -n -p pid "${!SWEEP_PID_RUN[@]}" || rc=$?
    sweep_finish_run "$pid" "$rc"
  done
  set +m
  trap - INT TERM EXIT
  sweep_bar "$SWEEP_FINISHED" "$SWEEP_TOTAL"
  if [ -t 1 ]; then echo; fi
  echo "sweep finished in $(sweep_time $((SECONDS - SWEEP_START))): $SWEEP_RAN ran now, $skipped skipped" \
       "(finished before), ${#SWEEP_FAILED[@]} failed"
}
