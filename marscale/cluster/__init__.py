"""Running a job on several nodes: the launch wrapper behind launch/*.sh (host checks,
remote environment, signals, exit status) and the network interface a rank talks over."""
