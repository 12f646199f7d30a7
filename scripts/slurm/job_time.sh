# Sourced by the Slurm job scripts (scripts/slurm/pretrain.sbatch, the sweeps' sweep.sbatch):
# the job's time left, and the --exit-duration-in-mins that stops a run by the clock
# EXIT_MARGIN_MINUTES (default 10) before the limit, should the signal before it not arrive.

# The job's time left in whole minutes (squeue's %L: [days-][hours:]minutes:seconds); nothing
# for UNLIMITED or when squeue cannot tell.
minutes_left() {
    local left
    left="$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null)" || return 0
    left="${left//[[:space:]]/}"
    [[ "$left" =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]] || return 0
    echo $(( 10#${BASH_REMATCH[2]:-0} * 1440 + 10#${BASH_REMATCH[4]:-0} * 60
             + 10#${BASH_REMATCH[5]} ))
}

# "--exit-duration-in-mins N", or nothing when the time left is unknown or under the margin.
exit_duration_flags() {
    local left
    left="$(minutes_left)"
    if [ -n "$left" ] && [ $(( left - ${EXIT_MARGIN_MINUTES:-10} )) -gt 0 ]; then
        echo "--exit-duration-in-mins $(( left - ${EXIT_MARGIN_MINUTES:-10} ))"
    fi
}
