# Shared by torchrun_single_node.sh and torchrun_multi_node.sh; source it, do not run it.
#
# run_torchrun NPROC_PER_NODE TORCHRUN_OPTION ... -- TRAINER_ARG ...
#   Starts torchrun with one training process per NPROC_PER_NODE, each wrapped by
#   training_process.py, and returns the node's exit code:
#     0   training finished on every local rank
#     85  every local rank saved a checkpoint and stopped on the preemption signal
#         (PREEMPTED_EXIT_CODE); resume the run with --resume
#     2   the trainer rejected its configuration or command line: at least one local rank
#         exited 2 (INVALID_ARGUMENTS_EXIT_CODE), and every other rank with a recorded exit
#         code exited 2 too or was stopped by torchrun's SIGTERM (143)
#     other  torchrun's own exit code (a failed or killed rank)
#   SIGUSR1 sent to this script is forwarded to the training processes; torchrun itself
#   ignores SIGUSR1. SIGTERM and SIGINT are left to torchrun, which shares this
#   script's process group and forwards them itself, so send them to the whole group
#   (Ctrl-C, scancel, kill -TERM -PGID).
#
# Environment: TORCHRUN (default: torchrun on PATH), LOOKAROUND_TRAIN_MODULE (default:
# lookaround_dist.cli.train; tests put a stand-in trainer here).

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREEMPTED_EXIT_CODE=85
# The trainer's exit code for an invalid configuration or command line (argparse's too).
INVALID_ARGUMENTS_EXIT_CODE=2
# The exit code that training_process.py records for a trainer killed by SIGTERM (128 + 15).
# torchrun sends SIGTERM to the other ranks as soon as one rank fails.
STOPPED_EXIT_CODE=143
# The trainer's own options (lookaround_dist.cli.train). parse_options passes these on and
# rejects every other --option, so a mistyped option fails before torchrun starts.
TRAINER_OPTIONS="config resume dry-run world-size"

log() {
    echo "[launch $(hostname -s) $(date +%H:%M:%S)] $*" >&2
}

# Prints the option names of a space-separated list with their dashes, comma-separated.
format_options() {
    local name list=""
    for name in $1; do
        list+="${list:+, }--$name"
    done
    echo "$list"
}

# parse_options "NAME ..." ARG ...
#   Reads the wrapper's own options, given by name without the dashes: "--max-restarts V"
#   and "--max-restarts=V" both set the shell variable max_restarts to V. The trainer's
#   options (TRAINER_OPTIONS) and every argument that is not a --option (config
#   overrides, option values, a bare --) go, in order, to the array trainer_args.
#   -h and --help print the calling script's header comment and exit 0. An unknown
#   --option or a wrapper option without its value exits 2.
parse_options() {
    local names=" $1 " arg name value
    shift
    trainer_args=()
    while [[ $# -gt 0 ]]; do
        arg="$1"
        case "$arg" in
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
            --*) name="${arg#--}"; name="${name%%=*}" ;;
            *) name="" ;;
        esac
        if [[ -n "$name" && "$names" != *" $name "* && " $TRAINER_OPTIONS " != *" $name "* ]]; then
            echo "error: unknown option '--$name'. Valid options are this script's" \
                "($(format_options "$names")) and the trainer's ($(format_options "$TRAINER_OPTIONS"))," \
                "plus section.key=value config overrides. See --help." >&2
            exit 2
        fi
        if [[ -z "$name" || "$names" != *" $name "* ]]; then
            trainer_args+=("$arg")
            shift
            continue
        fi
        if [[ "$arg" == *=* ]]; then
            value="${arg#*=}"
            shift
        elif [[ $# -ge 2 ]]; then
            value="$2"
            shift 2
        else
            echo "error: $arg needs a value (see --help)" >&2
            exit 2
        fi
        printf -v "${name//-/_}" '%s' "$value"
    done
}

# Exits 2 unless the --max-restarts value is a non-negative integer.
check_max_restarts() {
    if ! [[ "$1" =~ ^[0-9]+$ ]]; then
        echo "error: --max-restarts must be a non-negative integer, got '$1'" >&2
        exit 2
    fi
}

# Prints the number of CUDA devices this process may use (0 without CUDA or torch).
count_gpus() {
    local python="${PYTHON:-python3}"
    "$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

# Print the number of training processes: the given --nproc value, else the number of
# visible GPUs. Prints an error and returns 2 when neither is a positive integer.
resolve_nproc() {
    local nproc="$1"
    if [[ -z "$nproc" ]]; then
        nproc="$(count_gpus)"
        if (( nproc == 0 )); then
            echo "error: no CUDA device found; pass --nproc N to train with N CPU processes" >&2
            return 2
        fi
    fi
    if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: --nproc must be a positive integer, got '$nproc'" >&2
        return 2
    fi
    echo "$nproc"
}

forward_usr1_to_training_processes() {
    local pid_file pid
    for pid_file in "$EXIT_CODE_DIR"/*.pid; do
        [[ -e "$pid_file" ]] || continue
        pid="$(<"$pid_file")"
        log "forwarding SIGUSR1 to training process $pid ($(basename "$pid_file" .pid))"
        kill -USR1 "$pid" 2>/dev/null || log "training process $pid has already exited"
    done
}

# Prints the node's exit code from torchrun's and the recorded per-rank exit codes.
node_exit_code() {
    local torchrun_code="$1" nproc="$2" exit_file rank_code
    local count=0 preempted=0 invalid=0 stopped=0
    for exit_file in "$EXIT_CODE_DIR"/*.exit; do
        [[ -e "$exit_file" ]] || continue
        count=$((count + 1))
        rank_code="$(<"$exit_file")"
        if [[ "$rank_code" == "$PREEMPTED_EXIT_CODE" ]]; then
            preempted=$((preempted + 1))
        elif [[ "$rank_code" == "$INVALID_ARGUMENTS_EXIT_CODE" ]]; then
            invalid=$((invalid + 1))
        elif [[ "$rank_code" == "$STOPPED_EXIT_CODE" ]]; then
            stopped=$((stopped + 1))
        fi
    done
    if (( count == nproc && preempted == nproc )); then
        echo "$PREEMPTED_EXIT_CODE"
    elif (( invalid > 0 && invalid + stopped == count )); then
        # Every rank reads the same configuration, but a slower rank may be stopped by
        # torchrun before it gets to reject it. torchrun itself exits 1 and prints a
        # traceback for the failed ranks, so this line names the cause.
        local detail="$invalid of $nproc training processes exited with code $INVALID_ARGUMENTS_EXIT_CODE"
        if (( stopped > 0 )); then
            detail+=" and torchrun stopped the other $stopped"
        fi
        log "error: the trainer rejected its configuration or command line: $detail." \
            "See the trainer's error above."
        echo "$INVALID_ARGUMENTS_EXIT_CODE"
    elif (( torchrun_code == 0 && preempted > 0 )); then
        # Some ranks finished and others stopped for preemption: the run is incomplete,
        # and only the ranks that stopped wrote a checkpoint, so it is not resumable as is.
        log "ranks disagree: $preempted of $nproc stopped for preemption, $((count - preempted)) finished"
        echo 1
    else
        echo "$torchrun_code"
    fi
}

run_torchrun() {
    local nproc="$1"
    shift
    local torchrun_options=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do
        torchrun_options+=("$1")
        shift
    done
    shift  # the "--" between torchrun options and trainer arguments

    EXIT_CODE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/lookaround-exit-codes.XXXXXX")"
    export LOOKAROUND_EXIT_CODE_DIR="$EXIT_CODE_DIR"
    local module="${LOOKAROUND_TRAIN_MODULE:-lookaround_dist.cli.train}"

    log "torchrun ${torchrun_options[*]} -m $module $*"
    # torchrun would die from SIGUSR1 (it does not handle it), so it starts with the
    # signal ignored. training_process.py sets its own handler, which replaces the ignore.
    (
        trap '' USR1
        exec "${TORCHRUN:-torchrun}" "${torchrun_options[@]}" \
            "$LAUNCH_DIR/training_process.py" "$module" "$@"
    ) &
    local torchrun_pid=$!
    trap forward_usr1_to_training_processes USR1
    trap 'log "SIGTERM: waiting for torchrun to stop its training processes"' TERM
    trap 'log "SIGINT: waiting for torchrun to stop its training processes"' INT

    # A trapped signal interrupts wait with a code above 128, so wait again while
    # torchrun runs. When it exited during the interrupted wait, the next wait returns
    # its real status; 127 means the status was already returned.
    local torchrun_code status
    while true; do
        wait "$torchrun_pid"
        torchrun_code=$?
        if kill -0 "$torchrun_pid" 2>/dev/null; then
            continue
        fi
        wait "$torchrun_pid" 2>/dev/null
        status=$?
        if (( status != 127 )); then
            torchrun_code=$status
        fi
        break
    done
    trap - USR1 TERM INT

    local code
    code="$(node_exit_code "$torchrun_code" "$nproc")"
    rm -rf "$EXIT_CODE_DIR"
    log "torchrun exited with code $torchrun_code; node exit code $code"
    return "$code"
}
