"""One job on a cluster: hosts → roles (trainer, inference servers), GPU ids, ports, command
lines; the launcher that runs them under Slurm (or on one machine); the memory planner."""
